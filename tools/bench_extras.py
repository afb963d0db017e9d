"""Time AMLN's extras on the learner's side, as cohort computes them and as the
rewrites tried instead, interleaved in one process: L_F (the three alignment
containers and their distances) and L_D's peer side (the three discriminators),
each forward and backward into the block features, on one ResNet-20 peer's real
pooled blocks (default AMLN: ``block_resolution`` final, so every block is 7x7).

Rewrites (same functions of the same parameters, up to float rounding):
- "fused": the three blocks' passes as one. For D, each conv layer's three weights
  as one block-diagonal conv over the concatenated blocks (112 channels); for the
  containers, the three depthwise convs and BatchNorms as one over the concatenated
  blocks (both per-channel, so exact), the pointwise convs per block.
- "compiled": the per-block code under ``torch.compile`` (compile time printed).
And one that changes numerics under bf16, for comparison: the containers in the
autocast dtype (cohort keeps them in fp32, docs/benchmarks.md).

    python tools/bench_extras.py [--steps 30] [--precision bf16|fp32] [--no-compile]

On a GPU the timers wait for the device. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_step import build, synchronize  # noqa: E402

from cohort.methods import functional as L  # noqa: E402
from cohort.methods.extras import AlignmentContainer, FeatureDiscriminator  # noqa: E402
from cohort.peer import Peer  # noqa: E402


def discriminator_layers(disc: FeatureDiscriminator, width: int) -> list[tuple[Tensor, Tensor, int, int]]:
    """D's four convs as (weight, bias, stride, padding): sigma for this width, then the body."""
    convs = [disc.reduce[str(width)], *[m for m in disc.body if isinstance(m, torch.nn.Conv2d)]]
    return [(c.weight, c.bias, c.stride[0], c.padding[0]) for c in convs]


def fused_discriminator_scores(
    discriminators: Sequence[FeatureDiscriminator], blocks: Sequence[Tensor]
) -> list[Tensor]:
    """Every D_b(f_b) in one pass of block-diagonal convs over the concatenated blocks."""
    per_block = [discriminator_layers(d, b.shape[1]) for d, b in zip(discriminators, blocks, strict=True)]
    x = torch.cat(list(blocks), dim=1)
    depth_of_d = len(per_block[0])
    for depth, layers in enumerate(zip(*per_block, strict=True)):
        weights = [w for w, _, _, _ in layers]
        stacked = torch.block_diag(*[w.flatten(1) for w in weights])
        weight = stacked.view(stacked.shape[0], -1, *weights[0].shape[-2:])
        x = F.conv2d(x, weight, torch.cat([b for _, b, _, _ in layers]), layers[0][2], layers[0][3])
        if 0 < depth < depth_of_d - 1:  # ReLU after the two body convs, as in D.body
            x = F.relu(x)
    return list(x.mean(dim=(2, 3)).split([layers[-1][0].shape[0] for layers in per_block], dim=1))


def fused_alignment(containers: Sequence[AlignmentContainer], blocks: Sequence[Tensor]) -> list[Tensor]:
    """Every C_b(f_b): the depthwise convs and BatchNorms as one (both act per channel),
    the pointwise convs per block; the running statistics are written back."""
    widths = [b.shape[1] for b in blocks]
    norms = [c.norm for c in containers]
    first = containers[0].depthwise
    if any((c.depthwise.stride, c.depthwise.padding) != (first.stride, first.padding) for c in containers):
        raise ValueError("fused_alignment needs every container's depthwise conv alike (block_resolution final)")
    if any((n.momentum, n.eps, n.training) != (norms[0].momentum, norms[0].eps, True) for n in norms):
        raise ValueError("fused_alignment needs the containers' BatchNorms alike and in training mode")
    with torch.autocast(blocks[0].device.type, enabled=False):
        x = torch.cat(list(blocks), dim=1).float()
        weight = torch.cat([c.depthwise.weight for c in containers])
        x = F.conv2d(x, weight, None, first.stride, first.padding, groups=x.shape[1])
        mean, var = torch.cat([n.running_mean for n in norms]), torch.cat([n.running_var for n in norms])
        x = F.batch_norm(
            x, mean, var, torch.cat([n.weight for n in norms]), torch.cat([n.bias for n in norms]),
            True, norms[0].momentum, norms[0].eps,
        )  # fmt: skip
        with torch.no_grad():
            for norm, m, v in zip(norms, mean.split(widths), var.split(widths), strict=True):
                norm.running_mean.copy_(m)
                norm.running_var.copy_(v)
                norm.num_batches_tracked.add_(1)
        return [c.pointwise(part) for c, part in zip(containers, x.split(widths, dim=1), strict=True)]


def timed(learner: Peer, call: Callable[[], Tensor]) -> float:
    """Seconds of one forward and backward of ``call``, waiting for the learner's device."""
    synchronize(learner)
    start = time.perf_counter()
    call().backward()
    synchronize(learner)
    return time.perf_counter() - start


PAIRS = {  # each rewrite and the cohort code it stands in for: the same value and gradients
    "L_F fused depthwise + BN": "L_F per block (cohort)",
    "L_D peer side fused (block-diagonal D)": "L_D peer side per block (cohort)",
}


def variants(learner: Peer, teacher: Peer) -> tuple[list[Tensor], dict[str, Callable[[], Tensor]]]:
    """The learner's pooled blocks of one step (leaves, so each backward ends at them)
    and each variant's loss on them against the teacher's final block, as ``learn``
    gets it."""
    message = teacher.publish(0)
    learner.publish(0)
    output = learner._pending[1]  # the learner's forward output of this step's batch
    blocks = [b.detach().requires_grad_() for b in learner.method.at_resolution(output.blocks)]
    final = learner.receive([message])[0].blocks[-1]
    key = next(iter(learner.extras["disc"]))
    discriminators, containers = list(learner.extras["disc"][key]), list(learner.extras["align"][key])
    for p in learner.extras["disc"].parameters():
        p.requires_grad_(False)  # as in the peer's step: its loss does not train D

    def alignment_per_block() -> Tensor:
        with learner.autocast():
            return sum(L.alignment_distance(c(b), final) for c, b in zip(containers, blocks, strict=True))

    def alignment_fused() -> Tensor:
        with learner.autocast():
            return sum(L.alignment_distance(a, final) for a in fused_alignment(containers, blocks))

    def alignment_in_autocast_dtype() -> Tensor:  # not the same numerics under bf16: the containers' convs in bf16
        with learner.autocast():
            aligned = [c.pointwise(c.norm(c.depthwise(b))) for c, b in zip(containers, blocks, strict=True)]
            return sum(L.alignment_distance(a, final) for a in aligned)

    def fooling_per_block() -> Tensor:
        with learner.autocast():
            return sum(L.fooling_loss(d(b)) for d, b in zip(discriminators, blocks, strict=True))

    def fooling_fused() -> Tensor:
        with learner.autocast():
            return sum(L.fooling_loss(s) for s in fused_discriminator_scores(discriminators, blocks))

    return blocks, {
        "L_F per block (cohort)": alignment_per_block,
        "L_F fused depthwise + BN": alignment_fused,
        "L_F with the containers in the autocast dtype (bf16 numerics)": alignment_in_autocast_dtype,
        "L_D peer side per block (cohort)": fooling_per_block,
        "L_D peer side fused (block-diagonal D)": fooling_fused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    learner, teacher = build(["method.name=amln", f"run.precision={args.precision}"])
    _, calls = variants(learner, teacher)
    for fused, plain in PAIRS.items():
        with torch.no_grad():
            a, b = float(calls[plain]()), float(calls[fused]())
        print(f"{fused}: value {b:.7g} against {a:.7g} (relative difference {abs(a - b) / abs(a):.1e})")
    if not args.no_compile:
        for name, plain in [("L_F per block, compiled", "L_F per block (cohort)"),
                            ("L_D peer side, compiled", "L_D peer side per block (cohort)")]:  # fmt: skip
            compiled = torch.compile(calls[plain])
            start = time.perf_counter()
            compiled().backward()
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s")
            calls[name] = compiled
    times: dict[str, list[float]] = {name: [] for name in calls}
    for step in range(3 + args.steps):
        for name, call in calls.items():
            seconds = timed(learner, call)
            if step >= 3:
                times[name].append(seconds)
    print(f"\n| forward + backward into the blocks ({learner.device.type}, {learner.precision}, batch 128, "
          f"median of {args.steps}, interleaved) | ms |")  # fmt: skip
    print("| --- | ---: |")
    for name, seconds in times.items():
        print(f"| {name} | {1000 * statistics.median(seconds):.2f} |")


if __name__ == "__main__":
    main()
