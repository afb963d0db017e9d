"""Shared fixtures: one Ray instance per session; helpers live in tests/helpers.py."""

from __future__ import annotations

import os

import pytest

from helpers import FASHION_INSTALLED

os.environ.setdefault("COHORT_PROGRESS", "0")  # no progress bars in test logs


@pytest.fixture(scope="session")
def ray_session():
    """The session's single Ray instance, sized like this machine (2 CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def fashion_required():
    if not FASHION_INSTALLED:
        pytest.fail("Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist (the README's test command does)")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where CUDA is present; elsewhere they skip with a reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
