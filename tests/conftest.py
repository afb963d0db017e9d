"""Shared fixtures: one Ray instance per session, small synthetic configs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cohort.config import Config, load_config

os.environ.setdefault("COHORT_PROGRESS", "0")  # no progress bars in test logs

REPO = Path(__file__).resolve().parents[1]
FASHION_INSTALLED = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()


def synthetic_config(tmp_path: Path | None = None, *overrides: str) -> Config:
    """A tiny, fast cohort on seeded synthetic data (16x16, 1 channel, 10 classes)."""
    base = [
        "data.name=synthetic",
        "data.train_subset=null",
        "data.batch_size=16",
        "data.synthetic.train_size=64",
        "data.synthetic.test_size=32",
        "cohort.backend=local",
        "optim.epochs=1",
        "optim.milestones=[]",
    ]
    if tmp_path is not None:
        base.append(f"run.out_dir={tmp_path / 'run'}")
    return load_config(None, [*base, *overrides])


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path: equal digests mean
    nothing in the folder was touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


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
