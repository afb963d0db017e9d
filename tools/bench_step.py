"""Time one training step (publish + learn) of one ResNet-20 peer, per method.

Fashion-MNIST shapes (1x28x28, 10 classes), batch 128, one torch thread, seeded
synthetic images (the data's content does not change the cost). The teacher's
message comes from a second peer, as in a 2-peer cyclic cohort; only the learning
peer's publish + learn is timed. AMLN's ablation cases show where its extra time goes.

    python tools/bench_step.py [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cohort.config import load_config
from cohort.peer import Peer

VARIANTS = {
    "vanilla": ["method.name=vanilla"],
    "dml": ["method.name=dml"],
    "afd": ["method.name=afd"],
    "amln (full, case E)": ["method.name=amln"],
    "amln L_C+L_KL (case B)": ["method.name=amln", "method.feature=false", "method.adversarial=false"],
    "amln + L_F only (case C)": ["method.name=amln", "method.adversarial=false"],
    "amln + L_D only (case D)": ["method.name=amln", "method.feature=false"],
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


def build(overrides: list[str]) -> tuple[Peer, Peer]:
    """The learning peer 0 and its teacher, peer 1, at full distillation weight."""
    full_weight = [] if "method.name=vanilla" in overrides else ["method.rampup_epochs=0"]
    config = load_config(None, [*BASE, *overrides, *full_weight])
    return Peer(0, config), Peer(1, config)


def timed_step(learner: Peer, teacher: Peer, step: int) -> float:
    """Seconds of the learner's publish + learn at ``step``."""
    message = teacher.publish(step)
    teacher._pending = None  # the teacher does not learn here; only its message is needed
    start = time.perf_counter()
    learner.publish(step)
    learner.learn(step, message)
    return time.perf_counter() - start


def time_steps(overrides: list[str], steps: int, warmup: int = 3) -> float:
    """Median seconds of one variant's publish + learn."""
    learner, teacher = build(overrides)
    times = [timed_step(learner, teacher, step) for step in range(warmup + steps)]
    return statistics.median(times[warmup:])


def time_interleaved(variants: dict[str, list[str]], steps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per variant, taking one step of each in turn, so that drift in
    the machine's speed (this VM drifts by up to 10% over minutes) hits all alike."""
    pairs = {name: build(overrides) for name, overrides in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(warmup + steps):
        for name, (learner, teacher) in pairs.items():
            times[name].append(timed_step(learner, teacher, step))
    return {name: statistics.median(t[warmup:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = time_interleaved(VARIANTS, args.steps)
    base = results["vanilla"]
    print(f"| method | step (ms) | x vanilla |   (batch 128, {args.threads} thread(s), median of {args.steps} "
          "steps, variants interleaved)")  # fmt: skip
    print("| --- | ---: | ---: |")
    for name, seconds in results.items():
        print(f"| {name} | {1000 * seconds:.0f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
