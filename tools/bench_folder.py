"""Image-folder loading against a ResNet-18 training step.

Generates an ImageFolder of small JPEGs, then measures, interleaved in one process:
- "per-step loader": a new DataLoader (and new worker processes) for every training
  batch, as FolderSplit did before streaming (``FolderSplit.batch``);
- "streamed": one DataLoader per epoch whose batch sampler is the batch plan
  (``PeerData.train_batch``, what peers use);
- "compute": a ResNet-18 forward + backward + SGD step on a batch already in memory;
- "step": streamed loading plus that compute, as a peer runs it.

    python tools/bench_folder.py --images 2000 --size 64 --workers 2 --steps 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohort.config import load_config  # noqa: E402
from cohort.data import load_data  # noqa: E402
from cohort.models import create_model  # noqa: E402


def make_folders(root: Path, images: int, size: int, classes: int = 10) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in range(count):
            folder = root / split / f"class_{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i:05d}.jpg", quality=90)


def seconds_per_batch(fetch, steps: range) -> float:
    start = time.perf_counter()
    for step in steps:
        fetch(step)
    return (time.perf_counter() - start) / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="batches per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one CPU per peer, as under cohort.cpus_per_peer=1

    with tempfile.TemporaryDirectory() as tmp:
        make_folders(Path(tmp), args.images, args.size)
        config = load_config(
            None,
            [
                "data.name=imagenet",
                f"data.root={tmp}",
                f"data.batch_size={args.batch}",
                "data.train_subset=null",
                f"data.workers={args.workers}",
            ],
        )
        data = load_data(config.data, seed=0)
        plan = data.plan
        model = create_model("resnet18", data.info.num_classes, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fixed_x, fixed_y = data.train_batch(0)

        def compute(x, y) -> None:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x).logits, y).backward()
            optimizer.step()

        rows: dict[str, list[float]] = {"per-step loader": [], "streamed": [], "compute": [], "step": []}
        spe = plan.steps_per_epoch
        for round_ in range(args.rounds):
            steps = range(round_ * spe, round_ * spe + min(args.steps, spe))
            rows["per-step loader"].append(
                seconds_per_batch(lambda s: data.train.batch(plan.positions(s), plan.augment_seed(s)), steps)
            )
            rows["streamed"].append(seconds_per_batch(data.train_batch, steps))
            rows["compute"].append(seconds_per_batch(lambda s: compute(fixed_x, fixed_y), steps))
            later = range(steps.start + spe // 2, steps.start + spe // 2 + len(steps))
            rows["step"].append(seconds_per_batch(lambda s: compute(*data.train_batch(s)), later))

    print(
        f"ImageFolder of {args.images} JPEGs {args.size}x{args.size}, batch {args.batch}, "
        f"{args.workers} workers, resized to {data.info.image_size}; ResNet-18, 1 thread"
    )
    print("| what | s / batch (median of rounds) | batches / s |")
    print("| --- | ---: | ---: |")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {1 / median:.2f} |")
    step, compute_only = statistics.median(rows["step"]), statistics.median(rows["compute"])
    print(f"step / compute = {step / compute_only:.3f} (1.0: loading is fully hidden behind the step)")


if __name__ == "__main__":
    main()
