"""On a CUDA machine: peers train on the GPU, in bf16 autocast, with messages
still crossing as CPU arrays. Skipped (with the reason) where there is no GPU."""

from __future__ import annotations

import math

import pytest

from conftest import synthetic_config

pytestmark = pytest.mark.gpu


def test_peer_trains_on_the_gpu_in_bf16_and_publishes_cpu_messages():
    from cohort.peer import Peer

    config = synthetic_config(None, "run.device=cuda", "run.precision=bf16", "method.name=amln")
    learner, teacher = Peer(0, config), Peer(1, config)
    assert learner.describe()["device"].startswith("cuda")
    message = teacher.publish(0)
    assert all(not hasattr(t, "device") for t in (message.logits, *message.blocks))  # numpy, i.e. host memory
    learner.publish(0)
    terms = learner.learn(0, message)
    assert all(math.isfinite(v) for v in terms.values())
    assert next(learner.model.parameters()).is_cuda
