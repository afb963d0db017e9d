"""Time one training step (publish + learn) of one ResNet-20 peer, per method.

Fashion-MNIST shapes (1x28x28, 10 classes), batch 128, one torch thread, seeded
synthetic images (the data's content does not change the cost), on ``run.device``
auto: a GPU where there is one, and the timers wait for it. The teacher's message
comes from a second peer, as in a 2-peer cyclic cohort; only the learning peer's
publish + learn is timed. AMLN's ablation cases show where its extra time goes.

    python tools/bench_step.py [--steps 20] [--threads 1] [--memory-format channels_last|contiguous]
                               [--precision fp32|bf16|auto] [--compile]
    python tools/bench_step.py --matrix [--only dml,afd,amln]   # methods x {NCHW, channels-last} x {fp32, bf16}
    python tools/bench_step.py --phases --precision bf16 --only amln   # where each step's time goes
    python tools/bench_step.py --precision bf16 --only "amln (full" --cudnn-benchmark   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not
from cohort.config import load_config  # noqa: E402
from cohort.peer import Peer  # noqa: E402

VARIANTS = {
    "vanilla": ["method.name=vanilla"],
    "dml": ["method.name=dml"],
    "afd": ["method.name=afd"],
    "amln (full, case E)": ["method.name=amln"],
    "amln L_C+L_KL (case B)": ["method.name=amln", "method.feature=false", "method.adversarial=false"],
    "amln + L_F only (case C)": ["method.name=amln", "method.adversarial=false"],
    "amln + L_D only (case D)": ["method.name=amln", "method.feature=false"],
    "amln D every step": ["method.name=amln", "method.disc_every=1"],
    "amln D every 2nd step": ["method.name=amln", "method.disc_every=2"],
    "amln D and C at each block's size and D every step (as printed)": [
        "method.name=amln",
        "method.block_resolution=block",
        "method.disc_every=1",
    ],
    "mcl": ["method.name=mcl"],
    "lmcl (no meta step)": ["method.name=lmcl", "method.meta_every=0"],
    "lmcl (meta step every step)": ["method.name=lmcl", "method.meta_every=1"],
}
BASE = [
    "cohort.backend=local",
    "data.name=synthetic",
    "data.train_subset=null",
    "data.synthetic.image_size=28",
    "data.synthetic.train_size=4096",
    "data.synthetic.test_size=16",
    "data.batch_size=128",
]


LAYOUTS_AND_PRECISIONS = {
    "NCHW fp32": ["run.memory_format=contiguous", "run.precision=fp32"],
    "channels-last fp32": ["run.memory_format=channels_last", "run.precision=fp32"],
    "NCHW bf16": ["run.memory_format=contiguous", "run.precision=bf16"],
    "channels-last bf16": ["run.memory_format=channels_last", "run.precision=bf16"],
}


def build(overrides: list[str]) -> tuple[Peer, Peer]:
    """The learning peer 0 and its teacher, peer 1, at full distillation weight."""
    full_weight = [] if "method.name=vanilla" in overrides else ["method.rampup_epochs=0", "method.rampup_min_steps=0"]
    config = load_config(None, [*BASE, *overrides, *full_weight])
    return Peer(0, config), Peer(1, config)


def synchronize(peer: Peer) -> None:
    """Wait for the peer's device, so that a timer stopped next sees all its work."""
    if peer.device.type == "cuda":
        torch.cuda.synchronize(peer.device)


def timed_step(learner: Peer, teacher: Peer, step: int) -> float:
    """Seconds of the learner's publish + learn at ``step``."""
    message = teacher.publish(step)
    teacher._pending = None  # the teacher does not learn here; only its message is needed
    synchronize(learner)
    start = time.perf_counter()
    learner.publish(step)
    learner.learn(step, message)
    synchronize(learner)
    return time.perf_counter() - start


CYCLE = 4  # steps per window of typical(): the longest update schedule a variant has (D every 4th step)


def typical(seconds: list[float]) -> float:
    """The median over consecutive windows of CYCLE steps of each window's mean: the
    median step for variants doing the same work every step, and the mean step, not
    the cheap or the dear one, for those whose critics update every 2nd or 4th step."""
    if not seconds or len(seconds) % CYCLE:
        raise ValueError(f"--steps must be a positive multiple of {CYCLE}, not {len(seconds)}")
    windows = [seconds[k : k + CYCLE] for k in range(0, len(seconds), CYCLE)]
    return statistics.median(statistics.fmean(window) for window in windows)


def time_steps(overrides: list[str], steps: int, warmup: int = 3) -> float:
    """Typical seconds (``typical``) of one variant's publish + learn."""
    learner, teacher = build(overrides)
    times = [timed_step(learner, teacher, step) for step in range(warmup + steps)]
    return typical(times[warmup:])


def time_interleaved(variants: dict[str, list[str]], steps: int, warmup: int = 3) -> dict[str, float]:
    """Typical seconds per variant (``typical``), taking one step of each in turn, so that drift in
    the machine's speed (this VM drifts by up to 10% over minutes) hits all alike."""
    pairs = {name: build(overrides) for name, overrides in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(warmup + steps):
        for name, (learner, teacher) in pairs.items():
            times[name].append(timed_step(learner, teacher, step))
    return {name: typical(t[warmup:]) for name, t in times.items()}


def first_step_seconds(overrides: list[str]) -> float:
    """Seconds of a fresh peer's first publish + learn (includes torch.compile's work)."""
    learner, teacher = build(overrides)
    return timed_step(learner, teacher, 0)


PHASES = ("publish", "losses", "backward", "step", "critic losses", "critic backward", "critic step", "rest")


class PhaseTimer:
    """Seconds per phase of one learner's steps, measured by wrapping the calls that
    ``Peer.learn`` makes (the method's losses and ``extras_step``, each ``backward``, the
    optimizers' ``step``) rather than copying its code. Every backward after the peer's
    counts as the critics', as does L-MCL's meta step's optimizer step; "rest" is what
    lies between. On a GPU each phase waits for the device, so the phases add up to a
    little more than the plain step timer's step."""

    def __init__(self, learner: Peer) -> None:
        self.learner, self.seconds = learner, {phase: [] for phase in PHASES}
        self._current: dict[str, float] = {}
        self._backwards = 0

    def _timed(self, phase: str, call):
        def wrapper(*args, **kwargs):
            synchronize(self.learner)
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                synchronize(self.learner)
                self._current[phase] = self._current.get(phase, 0.0) + time.perf_counter() - start

        return wrapper

    def step(self, teacher: Peer, step: int) -> None:
        """One ``timed_step`` of the learner, split into ``PHASES``."""
        learner, self._current, self._backwards = self.learner, {}, 0
        backward = torch.Tensor.backward

        def counted_backward(tensor, *args, **kwargs):
            self._backwards += 1
            phase = "backward" if self._backwards == 1 else "critic backward"
            return self._timed(phase, backward)(tensor, *args, **kwargs)

        patches = {
            (learner, "publish"): "publish",
            (learner.method, "losses"): "losses",
            (learner.method, "extras_step"): "critic losses",
            (learner.optimizer, "step"): "step",
        }
        if learner.critic_optimizer is not None:
            patches[(learner.critic_optimizer, "step")] = "critic step"
        with contextlib.ExitStack() as patched:  # each original comes back, the schedulers' step wrappers too
            for (owner, name), phase in patches.items():
                patched.enter_context(mock.patch.object(owner, name, self._timed(phase, getattr(owner, name))))
            patched.enter_context(mock.patch.object(torch.Tensor, "backward", counted_backward))
            total = timed_step(learner, teacher, step)
        self._current["rest"] = total - sum(self._current.values())
        for phase in PHASES:
            self.seconds[phase].append(self._current.get(phase, 0.0))


def print_phases(variants: dict[str, list[str]], steps: int, warmup: int = 3) -> None:
    """Typical ms per phase (``typical``) of each variant's step, variants interleaved step by step."""
    timers: dict[str, tuple[PhaseTimer, Peer]] = {}
    for name, overrides in variants.items():
        learner, teacher = build(overrides)
        timers[name] = (PhaseTimer(learner), teacher)
    for step in range(warmup + steps):
        for timer, teacher in timers.values():
            timer.step(teacher, step)
    print(
        f"ms per phase, median over {CYCLE}-step windows of their mean, {steps} steps, variants interleaved "
        "(the total is the sum of the phases)"
    )
    print("| method | " + " | ".join(PHASES) + " | total |")
    print("| --- |" + " ---: |" * (len(PHASES) + 1))
    for name, (timer, _) in timers.items():
        phases = [1000 * typical(timer.seconds[phase][warmup:]) for phase in PHASES]
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in phases) + f" | {sum(phases):.1f} |")


def chosen_variants(only: str | None) -> dict[str, list[str]]:
    """VARIANTS whose names start with one of ``only``'s comma-separated prefixes (all
    if None); vanilla is always kept, as every ratio's base."""
    wanted = only.split(",") if only else None
    return {
        name: overrides
        for name, overrides in VARIANTS.items()
        if wanted is None or name == "vanilla" or any(name.startswith(w) for w in wanted)
    }


def print_matrix(steps: int, threads: int, extra: list[str], methods: dict[str, list[str]]) -> None:
    variants = {
        (method, layout): [*overrides, *chosen, *extra]
        for method, overrides in methods.items()
        for layout, chosen in LAYOUTS_AND_PRECISIONS.items()
    }
    results = time_interleaved(variants, steps)
    base = results[("vanilla", "NCHW fp32")]
    columns = list(LAYOUTS_AND_PRECISIONS)
    print(
        f"step ms (x vanilla NCHW fp32); batch 128, {threads} thread(s), typical of {steps} steps "
        f"(median of {CYCLE}-step means), interleaved"
    )
    print("| method | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for method in methods:
        cells = [f"{1000 * results[(method, c)]:.0f} ({results[(method, c)] / base:.2f})" for c in columns]
        print(f"| {method} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile each peer's model")
    parser.add_argument("--matrix", action="store_true", help="every method x layout x precision, one table")
    parser.add_argument("--only", help="comma-separated variant names (prefixes), e.g. vanilla,mcl,lmcl")
    parser.add_argument("--phases", action="store_true", help="split each step into publish, losses, backward, ...")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN time its conv algorithms (GPU; not a cohort key yet)"
    )
    args = parser.parse_args()
    if args.steps <= 0 or args.steps % CYCLE:
        parser.error(f"--steps must be a positive multiple of {CYCLE} (steps are timed in windows of {CYCLE})")
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    extra = ["run.compile=true"] if args.compile else []
    if args.compile:
        print(f"first step with compile (vanilla): {first_step_seconds(['method.name=vanilla', *extra]):.1f} s")
    if args.matrix:
        print_matrix(args.steps, args.threads, extra, chosen_variants(args.only))
        return
    chosen = [f"run.memory_format={args.memory_format}", f"run.precision={args.precision}", *extra]
    variants = {name: [*overrides, *chosen] for name, overrides in chosen_variants(args.only).items()}
    if args.phases:
        print_phases(variants, args.steps)
        return
    results = time_interleaved(variants, args.steps)
    base = results["vanilla"]
    print(f"| method | step (ms) | x vanilla |   (batch 128, {args.threads} thread(s), typical of {args.steps} "
          f"steps, variants interleaved; {' '.join(chosen)})")  # fmt: skip
    print("| --- | ---: | ---: |")
    for name, seconds in results.items():
        print(f"| {name} | {1000 * seconds:.0f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
