"""One Tune trial = one cohort: the trainable, its resources and its reporting.

The trainable builds the trial's experiment (the sweep's base plus the sampled
values), trains it with ``cohort.coordinator.Cohort`` in the trial's folder, and
after every epoch reports the validation metrics with the cohort checkpoint as a
``ray.tune.Checkpoint``. A retried trial (a peer died) starts from that checkpoint
through the library's resume path, so the same resume rule applies.

Resources: one small bundle for the trial's driver plus one bundle per peer; the Ray
backend places peer j in bundle j + 1 of the trial's placement group.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune

from cohort.backends import peer_bundle
from cohort.callbacks import Callback
from cohort.checkpoint import checkpoint_name, latest_checkpoint
from cohort.config import Config
from cohort.coordinator import Cohort, train
from cohort.metrics import MetricsLog, epoch_values

from .schema import trial_config

DRIVER_BUNDLE = {"CPU": 0.01}  # the trial's driver only waits on its peers
RUN_FOLDER = "run"  # the cohort's run directory inside the trial folder


def trial_bundles(config: Config) -> list[dict[str, float]]:
    """The trial's driver bundle, then one bundle per peer as the Ray backend asks for
    it (``cohort.gpus_per_peer`` is fixed for the whole sweep before trials start)."""
    peer = peer_bundle(config.cohort.cpus_per_peer, config.cohort.gpus_per_peer or 0.0)
    return [DRIVER_BUNDLE] + [peer] * config.cohort.size


def trial_resources(base: dict[str, Any]):
    """``tune.with_resources`` callable: the trial's placement group from its config."""

    def resources(params: dict[str, Any]) -> tune.PlacementGroupFactory:
        return tune.PlacementGroupFactory(trial_bundles(trial_config(base, params)), strategy="PACK")

    return resources


def epoch_report(metrics: MetricsLog, epoch: int, size: int) -> dict[str, float]:
    """What a trial reports after an epoch: each peer's val and test top-1 and the
    summaries Tune compares trials on (validation only)."""
    values = epoch_values(metrics.frame(), epoch)
    report: dict[str, float] = {"epoch": epoch}
    for split in ("val", "test"):
        tops = [values[(j, split, "top1")] for j in range(size)]
        report |= {f"{split}_top1_peer{j}": top for j, top in enumerate(tops)}
        report[f"{split}_top1_mean"] = sum(tops) / size
        report[f"{split}_top1_best"] = max(tops)
        report[f"{split}_ensemble_top1"] = values[(None, split, "ensemble_top1")]
    return report


class TuneReporter(Callback):
    """Reports every epoch to Tune, with the cohort checkpoint when one was written,
    and where the trial ran: its placement group, its bundles, its peers' groups."""

    def on_start(self, cohort: Cohort, first_epoch: int) -> None:
        self.cohort = cohort
        group = ray.util.get_current_placement_group()
        self.placement: dict[str, Any] = {
            "placement_group": group.id.hex() if group else "",
            "trial_bundles": len(group.bundle_specs) if group else 0,
            "trial_cpus": sum(b.get("CPU", 0.0) for b in group.bundle_specs) if group else 0.0,
            "peer_groups": ",".join(cohort.backend.placement_groups()),
            "epochs_planned": cohort.config.optim.epochs,
        }

    def on_epoch(self, epoch: int, metrics: MetricsLog) -> None:
        run_dir = self.cohort.run_dir
        report = epoch_report(metrics, epoch, self.cohort.size) | self.placement
        source = latest_checkpoint(run_dir)
        if source is None or source.name != checkpoint_name(epoch):
            tune.report(report)
            return
        with tempfile.TemporaryDirectory() as staging:
            staging = Path(staging)
            shutil.copytree(source, staging / "checkpoints" / source.name)
            for name in ("config.yaml", "metrics.parquet"):
                shutil.copy2(run_dir / name, staging / name)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(staging))


def restore_run(run_dir: Path, checkpoint: tune.Checkpoint) -> None:
    """Lay a reported checkpoint out as a run directory that ``fit(resume=True)`` reads."""
    shutil.rmtree(run_dir, ignore_errors=True)
    with checkpoint.as_directory() as source:
        shutil.copytree(source, run_dir)


# What every trial runs under: its peers are Ray actors in the trial's placement group,
# and a dead peer fails the trial, which Tune retries from its last checkpoint
# (the sweep's max_failures), so there is one retry policy.
TRIAL_SETTINGS = {"cohort.backend": "ray", "run.max_failures": 0}


def run_trial(params: dict[str, Any], base: dict[str, Any], callbacks: tuple[Callback, ...] = ()) -> None:
    """The trainable: one cohort for the sampled ``params`` (dotted keys); ``callbacks``
    are added to the trial's cohort (they are pickled into the trial). A retried trial
    continues from its last reported checkpoint through ``cohort.train(resume=True)``."""
    run_dir = Path(tune.get_context().get_trial_dir()) / RUN_FOLDER
    config = trial_config(base, params | TRIAL_SETTINGS | {"run.out_dir": str(run_dir)})
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        restore_run(run_dir, checkpoint)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a previous attempt that never reported
    train(config, resume=checkpoint is not None, callbacks=[TuneReporter(), *callbacks], log=print)
