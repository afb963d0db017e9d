"""tools/bench_step.py's phase split (each phase is what Peer.learn calls, and the
timer leaves the peer as it found it) and typical step; tools/grad_trace.py runs."""

from __future__ import annotations

import csv
import importlib.util
import math
import warnings

import pytest
import torch

from helpers import REPO

CRITIC_PHASES = ("critic losses", "critic backward", "critic step")


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_step():
    return load_tool("bench_step")


@pytest.mark.parametrize("method", ["vanilla", "amln"])
def test_phase_timer_splits_each_step_into_the_calls_of_learn(method):
    bench = bench_step()
    every_step = ["method.disc_every=1"] if method == "amln" else []  # D's update in both steps timed
    learner, teacher = bench.build(
        [f"method.name={method}", *every_step, "data.batch_size=8", "data.synthetic.image_size=16"]
    )
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


def test_typical_step_is_the_median_window_mean_so_a_sparse_critic_update_is_averaged_in():
    bench = bench_step()
    assert bench.CYCLE == 4
    every_step = [1.0, 1.0, 9.0, 1.0] + [1.0] * 8  # window means 3, 1, 1: the median ignores the outlier
    assert bench.typical(every_step) == pytest.approx(1.0)
    every_fourth = [5.0, 1.0, 1.0, 1.0] * 3  # D's update on one step in four: charged its mean, 2.0
    assert bench.typical(every_fourth) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        bench.typical([1.0] * 6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grad_trace_measures_every_amln_term_per_block_in_either_precision(tmp_path, precision):
    trace = load_tool("grad_trace")
    out = tmp_path / "trace.csv"
    small = ["data.name=synthetic", "data.train_subset=null", "data.synthetic.train_size=32"]
    small += ["data.synthetic.test_size=16", "data.batch_size=16", "method.name=amln", f"run.precision={precision}"]
    threads = torch.get_num_threads()
    try:
        trace.main(["--every", "1", "--max-steps", "2", "--out", str(out), *small])
    finally:
        torch.set_num_threads(threads)  # its peers set the process's threads (--threads); later tests expect ours
    rows = list(csv.DictReader(out.open()))
    assert [(r["step"], r["peer"]) for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    for name in ("g_ce", "g_kl", "g_feat", "g_adv", "g_feat_b0", "g_adv_b2", "dacc_b1"):
        assert all(math.isfinite(float(r[name])) for r in rows), name
    assert all(float(r["g_ce"]) > 0 and float(r["g_adv_b0"]) > 0 for r in rows)


def test_bench_extras_rewrites_compute_what_cohort_computes():
    """tools/bench_extras.py times fused rewrites of L_F and L_D's peer side against
    cohort's per-block code: each must be the same function (value, gradients into every
    block and every container parameter, and the containers' running statistics), or
    its timing compares nothing."""
    bench = load_tool("bench_extras")
    learner, teacher = bench.build(["method.name=amln", "run.precision=fp32", "data.batch_size=8"])
    blocks, calls = bench.variants(learner, teacher)
    norms = [m for m in learner.extras.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    containers = list(learner.extras["align"].parameters())
    assert len(blocks) == 3 and len(norms) == 3
    initial = [{k: v.clone() for k, v in n.state_dict().items()} for n in norms]
    for fused, plain in bench.PAIRS.items():
        results = []
        for name in (plain, fused):
            for norm, state in zip(norms, initial):
                norm.load_state_dict(state)
            value = calls[name]()
            inputs = [*blocks, *containers] if fused.startswith("L_F") else blocks
            gradients = torch.autograd.grad(value, inputs)
            stats = [{k: v.clone() for k, v in n.state_dict().items()} for n in norms]
            results.append((float(value), gradients, stats))
        (a, grads_a, stats_a), (b, grads_b, stats_b) = results
        assert b == pytest.approx(a, rel=1e-5), fused
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(grads_a, grads_b)), fused
        for x, y in zip(stats_a, stats_b):
            assert all(torch.allclose(x[k], y[k]) for k in x), fused
        if fused.startswith("L_F"):  # the containers' statistics moved, in both alike
            assert all(not torch.equal(x["running_mean"], s["running_mean"]) for x, s in zip(stats_a, initial))
