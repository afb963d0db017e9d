"""tools/bench_step.py's phase split: each phase is what Peer.learn calls, and the
timer leaves the peer as it found it."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from helpers import REPO

CRITIC_PHASES = ("critic losses", "critic backward", "critic step")


def bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "tools" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["vanilla", "amln"])
def test_phase_timer_splits_each_step_into_the_calls_of_learn(method):
    bench = bench_step()
    learner, teacher = bench.build([f"method.name={method}", "data.batch_size=8", "data.synthetic.image_size=16"])
    backward, scheduled_step = torch.Tensor.backward, vars(learner.optimizer)["step"]  # the scheduler's wrapper
    timer = bench.PhaseTimer(learner)
    for step in range(2):
        timer.step(teacher, step)
    assert all(len(timer.seconds[phase]) == 2 for phase in bench.PHASES)
    assert all(timer.seconds[phase][-1] > 0 for phase in ("publish", "losses", "backward", "step"))
    critics = [timer.seconds[phase][-1] for phase in CRITIC_PHASES]
    assert all(c > 0 for c in critics) if method == "amln" else critics == [0.0] * 3
    assert torch.Tensor.backward is backward
    assert not {"losses", "extras_step"} & set(vars(learner.method)) and "publish" not in vars(learner)
    assert vars(learner.optimizer)["step"] is scheduled_step
    learner.publish(2)  # still a working peer, whose scheduler still sees its optimizer's steps
    assert set(learner.learn(2, teacher.publish(2))) >= {"ce", "loss"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.scheduler.step()
