"""Command line: ``python -m cohort.run [--config FILE] [--resume RUN_DIR] [key=value ...]``.

With no arguments it trains the embedded default: a 2-peer cyclic AMLN cohort of
ResNet-20s on Fashion-MNIST, on a Ray instance started in this process. Under
``ray job submit`` it joins the cluster that runs the job (Ray sets RAY_ADDRESS).

Exit codes: 0 done, 1 training stopped (non-finite loss, too many failures),
2 bad input (config, data, resources), detected before any peer starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, apply_override, load_config, read_yaml, validate
from .coordinator import TrainingStopped, train
from .data import DataError, check_available, dataset_info
from .peer import NonFiniteLossError, resolve_device, resolve_precision

EXAMPLES = """examples:
  python -m cohort.run                                   # the embedded default
  python -m cohort.run --config configs/dml_fashion.yaml
  python -m cohort.run method.beta=2 cohort.size=3 cohort.backend=local
  python -m cohort.run --resume runs/20261122-101500-amln
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cohort.run",
        description="Train a cohort of peer networks by online mutual distillation.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML experiment file (defaults: the embedded run)")
    parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last complete checkpoint"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. method.beta=2")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace):
    """The run's Config: a resumed run's own config.yaml plus overrides (which
    ``cohort.train`` checks against the resume rule), else --config + overrides."""
    if args.resume is None:
        return load_config(args.config, args.overrides)
    if args.config is not None:
        raise ConfigError("--resume: takes the run's own config.yaml; drop --config")
    raw = read_yaml(args.resume / "config.yaml") if (args.resume / "config.yaml").is_file() else {}
    if not raw:
        raise ConfigError(f"--resume: {args.resume} holds no run (no config.yaml)")
    for item in [*args.overrides, f"run.out_dir={args.resume}"]:
        apply_override(raw, item)
    return validate(raw)


def describe_plan(config) -> str:
    c, d, m = config.cohort, config.data, config.method
    models = c.models if isinstance(c.models, str) else "/".join(c.models)
    info = dataset_info(d)
    subset = f", first {d.train_subset} training images" if d.train_subset else ""
    r = config.run
    precision = r.precision
    if precision == "auto":
        precision = f"auto: {resolve_precision('auto', resolve_device(r.device))} here"
    return (
        f"training a {c.size}-peer {m.name} cohort ({models}, {c.pairing} pairing) on {d.name} "
        f"({info.channels}x{info.image_size}x{info.image_size}, {info.num_classes} classes{subset}) "
        f"for {config.optim.epochs} epoch(s), backend {c.backend}, precision {precision}, "
        f"{r.memory_format.replace('_', '-')}{', compiled' if r.compile else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = resolve_config(args)
        check_available(config.data)  # before describing it: the plan reads the dataset's layout
        print(f"[cohort] {describe_plan(config)}", flush=True)
        result = train(config, resume=args.resume is not None)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, TrainingStopped) as error:
        print(f"error: training stopped: {error}", file=sys.stderr)
        return 1
    print(
        f"[cohort] done: {result.run_dir}  final test top-1 "
        + " ".join(f"peer {j} {100 * v:.2f}%" for j, v in enumerate(result.final_top1))
        + f"  ensemble {100 * result.ensemble_top1:.2f}%  best peer {result.best_peer} -> {result.best_peer_path}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
