"""Command line: ``python -m tuning.sweep --config configs/sweeps/NAME.yaml [key=value ...]``
or ``python -m tuning.sweep --resume SWEEP_DIR``.

A Ray Tune sweep in which every trial is a whole cohort. Under ``ray job submit`` the
driver joins the job's cluster (RAY_ADDRESS); otherwise Ray starts in this process.
At the end the sweep folder holds results.parquet/.md, summary.md (mean ± std over
seeds), sweep.png and the best trial's best peer as best_peer.safetensors.

Exit codes: 0 done, 1 some trial failed beyond its retries, 2 bad input (sweep file,
experiment keys, resources), detected before any trial starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import yaml

from cohort.checkpoint import CheckpointError, check_output_dir, write_text
from cohort.config import ConfigError
from cohort.data import DataError, check_available

from .schema import SweepConfig, load_sweep, resolved, trial_config

SWEEP_FILE = "sweep.yaml"  # the resolved sweep, written into the sweep folder (for --resume)

EXAMPLES = """examples:
  python -m tuning.sweep --config configs/sweeps/beta-size.yaml
  python -m tuning.sweep --config configs/sweeps/beta-size.yaml samples=2 fixed.optim.epochs=1
  python -m tuning.sweep --resume runs/sweeps/20261123-101500-beta-size
  python -m tuning.sweep --report runs/sweeps/20261123-101500-beta-size   # rewrite its outputs
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tuning.sweep",
        description="Search experiment keys with Ray Tune; every trial trains a whole cohort.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="sweep file (configs/sweeps/*.yaml)")
    parser.add_argument("--resume", type=Path, metavar="SWEEP_DIR", help="continue an interrupted sweep")
    parser.add_argument(
        "--report", type=Path, metavar="SWEEP_DIR", help="rewrite a sweep's results and plots from its Tune state"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. samples=4 fixed.optim.epochs=1")
    return parser.parse_args(argv)


def sweep_dir_for(sweep: SweepConfig) -> Path:
    if sweep.out_dir is not None:
        return Path(sweep.out_dir)
    return Path("runs") / "sweeps" / f"{time.strftime('%Y%m%d-%H%M%S')}-{sweep.name}"


def resolve(args: argparse.Namespace) -> tuple[SweepConfig, dict[str, Any], Path]:
    """The sweep, its trials' base experiment and its folder; every check that needs no Ray."""
    existing, flag = (args.resume, "--resume") if args.resume is not None else (args.report, "--report")
    if existing is not None:
        if args.config is not None or args.overrides or (args.resume and args.report):
            raise ConfigError(f"{flag}: takes the sweep's own sweep.yaml; drop --config, overrides and other modes")
        sweep_dir = existing.resolve()
        if not (sweep_dir / SWEEP_FILE).is_file():
            raise ConfigError(f"{flag}: {existing} holds no sweep (no {SWEEP_FILE})")
        sweep, base = load_sweep(sweep_dir / SWEEP_FILE)
        return sweep, base, sweep_dir
    if args.config is None:
        raise ConfigError("--config: give a sweep file, e.g. --config configs/sweeps/beta-size.yaml")
    sweep, base = load_sweep(args.config, args.overrides)
    sweep_dir = sweep_dir_for(sweep)
    check_output_dir(sweep_dir, "out_dir")
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"out_dir: {sweep_dir} already holds files; continue it with --resume {sweep_dir}")
    check_available(trial_config(base, {}).data)
    return sweep, base, sweep_dir.resolve()


def example_trials(sweep: SweepConfig, base: dict[str, Any]) -> list[Any]:
    """One trial config per example value of each searched key (the longest budget,
    the largest cohort, ... are among them)."""
    return [trial_config(base, {key: value}) for key, d in sweep.space.items() for value in d.examples()]


def check_fits(sweep: SweepConfig, base: dict[str, Any]) -> None:
    """Refuse, with the numbers, a sweep whose largest trial the cluster can never
    hold (Tune alone would leave it PENDING forever)."""
    import ray

    from .trial import trial_bundles

    total = ray.cluster_resources()
    need_most_first = sorted(example_trials(sweep, base), key=lambda c: -sum(b["CPU"] for b in trial_bundles(c)))
    for config in need_most_first:
        bundles = trial_bundles(config)
        for resource in ("CPU", "GPU"):
            need = sum(b.get(resource, 0.0) for b in bundles)
            have = total.get(resource, 0.0)
            if need > have + 1e-9:
                peers = config.cohort.size
                key = "space.cohort.size" if "cohort.size" in sweep.space else f"cohort.{resource.lower()}s_per_peer"
                raise ConfigError(
                    f"{key}: a trial of {peers} peers needs {need:g} {resource}s "
                    f"({peers} x {bundles[1].get(resource, 0):g} for its peers + {bundles[0].get(resource, 0):g} "
                    f"for its driver), but the Ray cluster has {have:g}; lower cohort.{resource.lower()}s_per_peer "
                    "or the cohort size"
                )


def resolve_gpus(base: dict[str, Any]) -> None:
    """Fix ``cohort.gpus_per_peer`` for every trial now (1 per peer when the cluster has
    GPUs), so each trial's bundles and its backend agree."""
    import ray

    from cohort.backends import peer_gpus

    cohort = base.setdefault("cohort", {})
    if cohort.get("gpus_per_peer") is None:
        cohort["gpus_per_peer"] = peer_gpus(trial_config(base, {}), ray.cluster_resources().get("GPU", 0.0))


def build_tuner(sweep: SweepConfig, base: dict[str, Any], sweep_dir: Path, restore: bool, callbacks: tuple = ()):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .space import param_space
    from .trial import run_trial, trial_resources

    trainable = tune.with_parameters(run_trial, base=base, callbacks=tuple(callbacks))
    trainable = tune.with_resources(trainable, trial_resources(base))
    if restore:
        return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
    scheduler = FIFOScheduler()
    if sweep.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(config.optim.epochs for config in example_trials(sweep, base)),
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode="max",
            scheduler=scheduler,
            num_samples=sweep.samples,
            max_concurrent_trials=sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name,
            storage_path=str(sweep_dir.parent),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1,
        ),
    )


def run_sweep(
    sweep: SweepConfig, base: dict[str, Any], sweep_dir: Path, restore: bool = False, trial_callbacks: tuple = ()
):
    """Start (or join) Ray, check the cluster fits, run the Tuner, write the results.
    ``trial_callbacks`` (``cohort.Callback``s) join every trial's cohort."""
    import ray
    from ray import tune

    from .results import write_results

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set by `ray job submit`) or a new in-process instance
    recorded = resolved(sweep, base)  # before this cluster's GPU count is fixed into base
    base = deepcopy(base)
    resolve_gpus(base)
    check_fits(sweep, base)
    if restore and not tune.Tuner.can_restore(str(sweep_dir)):
        raise ConfigError(f"--resume: {sweep_dir} holds no Tune experiment state to restore")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text(sweep_dir / SWEEP_FILE, yaml.safe_dump(recorded.model_dump(mode="json"), sort_keys=False))
    grid = build_tuner(sweep, base, sweep_dir, restore, trial_callbacks).fit()
    return write_results(grid, sweep, sweep_dir)


def report_sweep(sweep: SweepConfig, base: dict[str, Any], sweep_dir: Path):
    """Rewrite results, summary, plots and the best peer from the sweep's Tune state,
    without running anything (e.g. after the reporting code changed)."""
    from ray import tune

    from .results import write_results

    if not tune.Tuner.can_restore(str(sweep_dir)):
        raise ConfigError(f"--report: {sweep_dir} holds no Tune experiment state")
    return write_results(build_tuner(sweep, base, sweep_dir, restore=True).get_results(), sweep, sweep_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep, base, sweep_dir = resolve(args)
        if args.report is not None:
            summary = report_sweep(sweep, base, sweep_dir)
        else:
            print(f"[sweep] {sweep.name}: searching {', '.join(sweep.space)} -> {sweep_dir}", flush=True)
            summary = run_sweep(sweep, base, sweep_dir, restore=args.resume is not None)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.table, flush=True)
    if summary.best_peer_path is not None:
        print(f"[sweep] best peer -> {summary.best_peer_path}", flush=True)
    if summary.failed:
        print(f"error: {summary.failed} trial(s) failed; see their error.txt under {sweep_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "run_sweep"]
