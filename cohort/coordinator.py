"""Cohort: the driver. Epochs, steps in flight, evaluation, checkpoint cadence, recovery.

It runs the same Peer objects through any backend (``cohort.backends``): "local" (every
peer in this process, the reference) or "ray" (an actor per peer, messages passed actor
to actor as ObjectRefs, so the driver never fetches features). What a person sees is a
callback (``cohort.console.ConsoleReporter``); so is Ray Tune's reporting.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backends import BACKENDS, Backend, PeerFailure
from .callbacks import Callback
from .checkpoint import (
    check_output_dir,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_text,
)
from .config import Config, ConfigError, check_resume, read_run_config
from .export import export_best_peer
from .metrics import MetricsLog, epoch_values, read_metrics
from .pairing import make_pairing
from .peer import topk_accuracy


class TrainingStopped(RuntimeError):
    """Training cannot continue (non-finite loss, too many peer failures, the cluster gone)."""


@dataclass
class RunResult:
    run_dir: Path
    best_peer: int
    best_peer_path: Path
    best_top1: float  # the best peer's final-epoch top-1 on ``selected_on``
    final_top1: list[float]  # every peer's final-epoch test top-1
    ensemble_top1: float  # final-epoch test top-1 of the averaged probabilities
    selected_on: str  # "val" or "test"


@dataclass
class StepTotals:
    """One peer's logged values summed over an epoch's steps, each with the number of
    steps that logged it, so a term logged on some steps only (AMLN's D with
    ``disc_every`` > 1) is averaged over those steps, not diluted by the others."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts.update(values.keys())

    def means(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


class Cohort:
    """Trains the cohort a validated Config describes into ``run_dir``.

    ``callbacks`` see the run start, every completed step, every epoch and the end;
    ``log`` gets the driver's own events (recoveries).
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        callbacks: Sequence[Callback] = (),
        log=print,
    ) -> None:
        self.config, self.run_dir = config, Path(run_dir)
        self.callbacks, self.log = list(callbacks), log
        self.size = config.cohort.size
        self.pairing = make_pairing(config.cohort.pairing, config.run.seed)
        self.metrics = MetricsLog(self.run_dir.name)
        self.failures = 0
        self.backend: Backend | None = None
        self.last_states: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------- lifecycle

    def fit(self, resume: bool = False) -> RunResult:
        """Train until ``optim.epochs``, surviving up to ``run.max_failures`` peer failures."""
        try:
            self.start_backend()  # fails before any file is written
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                write_text(self.run_dir / "config.yaml", self.config.to_yaml())
            epoch = self.restore() if resume else 0
            for callback in self.callbacks:
                callback.on_start(self, epoch)
            while epoch < self.config.optim.epochs:
                try:
                    self.train_epoch(epoch)
                    epoch += 1
                except PeerFailure as failure:
                    epoch = self.recover(failure)
            result = self.finish()
            for callback in self.callbacks:
                callback.on_finish(result)
            return result
        finally:
            if self.backend is not None:
                self.backend.shutdown()
                self.backend = None

    def start_backend(self, backend: Backend | None = None) -> None:
        """Start the peers (``backend``, or the configured one) and learn their layout."""
        self.backend = backend if backend is not None else BACKENDS[self.config.cohort.backend](self.config)
        self.describe = self.backend.get([self.backend.call(0, "describe")])[0]

    def recover(self, failure: PeerFailure) -> int:
        self.failures += 1
        if self.failures > self.config.run.max_failures:
            raise TrainingStopped(
                f"{failure}; giving up after {self.failures - 1} recoveries (run.max_failures="
                f"{self.config.run.max_failures}); resume later with --resume {self.run_dir}"
            ) from failure
        source = latest_checkpoint(self.run_dir)
        kept = source.name if source else "the initial weights"
        self.log(
            f"[cohort] {failure}; rebuilding the cohort from {kept} "
            f"(failure {self.failures} of at most {self.config.run.max_failures})"
        )
        try:
            with suppress(Exception):  # a dead cluster cannot even kill its actors
                self.backend.shutdown()
            self.backend = None
            self.start_backend()
            return self.restore()
        except Exception as error:  # the config fitted at the start: the cluster is gone or changed
            if not isinstance(error, ConfigError):
                error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise TrainingStopped(
                f"{failure}, and the cohort cannot be rebuilt: {error}; the run keeps {kept}; "
                f"resume with --resume {self.run_dir} once the cluster is back"
            ) from None

    def restore(self) -> int:
        """Load the newest complete checkpoint into the peers; the epoch to resume at."""
        source = latest_checkpoint(self.run_dir)
        self.metrics = MetricsLog.read(self.run_dir / "metrics.parquet", self.run_dir.name)
        if source is None:
            self.metrics.keep_until(0)
            return 0
        states, meta = load_checkpoint(source)
        self.backend.get([self.backend.call(j, "load_state", state) for j, state in enumerate(states)])
        self.metrics.keep_until(meta["epoch"])
        return int(meta["epoch"])

    # ----------------------------------------------------------------- epochs

    def train_epoch(self, epoch: int) -> None:
        """One epoch (0-based ``epoch``; reported 1-based): steps, eval, checkpoint."""
        spe = self.describe["steps_per_epoch"]
        teachers = [self.pairing.teachers(j, self.size, epoch) for j in range(self.size)]
        totals = [StepTotals() for _ in range(self.size)]
        self.run_steps(range(epoch * spe, (epoch + 1) * spe), teachers, totals)
        self.backend.get([self.backend.call(j, "finish_epoch", epoch) for j in range(self.size)])
        self.record_epoch(epoch + 1, [t.means() for t in totals])

    def run_steps(self, steps: range, teachers: list[tuple[int, ...]], totals: list[StepTotals]) -> None:
        """Publish then learn for each step, at most ``cohort.max_steps_in_flight``
        steps outstanding; each completed step's terms are added to its peer's
        ``totals`` and passed to the callbacks, in step order."""
        backend, limit = self.backend, self.config.cohort.max_steps_in_flight
        in_flight: deque[tuple[int, list[Any]]] = deque()
        with self._drained_on_error(in_flight):
            for step in steps:
                published = [backend.call(j, "publish", step) for j in range(self.size)]
                learned = [
                    backend.call(j, "learn", step, *[published[t] for t in teachers[j]]) for j in range(self.size)
                ]
                in_flight.append((step, learned))
                del published  # actors hold the messages until their learn calls finish
                while len(in_flight) >= limit:
                    self._complete(*in_flight.popleft(), totals)
            while in_flight:
                self._complete(*in_flight.popleft(), totals)

    def _complete(self, step: int, handles: list[Any], totals: list[StepTotals]) -> None:
        terms = self.backend.get(handles)
        for total, values in zip(totals, terms, strict=True):
            total.add(values)
        for callback in self.callbacks:
            callback.on_step(step, terms)

    @contextmanager
    def _drained_on_error(self, in_flight: deque[tuple[int, list[Any]]]) -> Iterator[None]:
        """On a failed step, wait out the steps still in flight and drop their
        errors, so the first failure is the one reported (and Ray logs no
        "unhandled error" for the rest)."""
        try:
            yield
        except BaseException:
            for _, handles in in_flight:
                for handle in handles:
                    with suppress(Exception):
                        self.backend.get([handle])
            in_flight.clear()
            raise

    def record_epoch(self, epoch: int, train: list[dict[str, float]]) -> None:
        backend = self.backend
        for j, values in enumerate(train):
            self.metrics.add(epoch, j, "train", values)
        splits = ["val", "test"] if self.describe["has_val"] else ["test"]
        for split in splits:
            results = backend.get([backend.call(j, "evaluate", split) for j in range(self.size)])
            for j, (values, _, _) in enumerate(results):
                self.metrics.add(epoch, j, split, values)
            mean_probs = torch.stack([probs for _, probs, _ in results]).mean(0)
            ensemble = topk_accuracy(mean_probs, results[0][2])["top1"]
            self.metrics.add(epoch, None, split, {"ensemble_top1": ensemble})
        self.metrics.write(self.run_dir / "metrics.parquet")
        if epoch % self.config.run.checkpoint_every == 0 or epoch == self.config.optim.epochs:
            self.save(epoch)
        for callback in self.callbacks:
            callback.on_epoch(epoch, self.metrics)

    def save(self, epoch: int) -> Path:
        states = self.backend.get([self.backend.call(j, "state") for j in range(self.size)])
        meta = {
            "epoch": epoch,
            "step": epoch * self.describe["steps_per_epoch"],
            "peer_count": self.size,
            "peers": [self.peer_metadata(j) for j in range(self.size)],
            "config": self.config.model_dump(mode="json"),
        }
        self.last_states = states
        return save_checkpoint(self.run_dir / "checkpoints" / checkpoint_name(epoch), states, meta)

    def peer_metadata(self, j: int) -> dict[str, Any]:
        d = self.describe
        return {
            "architecture": self.config.cohort.model_names[j],
            "num_classes": d["num_classes"],
            "in_channels": d["in_channels"],
            "image_size": d["image_size"],
            "mean": list(d["mean"]),
            "std": list(d["std"]),
            "dataset": self.config.data.name,
        }

    # ---------------------------------------------------------------- finish

    def finish(self) -> RunResult:
        """Export the best peer by final-epoch accuracy (val split if any)."""
        frame = read_metrics(self.run_dir / "metrics.parquet")
        states = self.last_states
        if states is None:  # resumed a finished run: the final checkpoint has them
            states, _ = load_checkpoint(latest_checkpoint(self.run_dir))
        path = self.run_dir / "best_peer.safetensors"
        metadata = [self.peer_metadata(j) for j in range(self.size)]
        best, score, split = export_best_peer(path, frame, states, metadata)
        from .report import write_curves  # matplotlib loads only when a run ends

        write_curves(self.run_dir)
        final = epoch_values(frame, int(frame["epoch"].max()))
        return RunResult(
            run_dir=self.run_dir,
            best_peer=best,
            best_peer_path=path,
            best_top1=score,
            final_top1=[final[(j, "test", "top1")] for j in range(self.size)],
            ensemble_top1=final[(None, "test", "ensemble_top1")],
            selected_on=split,
        )


# ------------------------------------------------------------------ public API


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.method.name}"


def prepare_run_dir(config: Config, resume: bool) -> Path:
    """The run's directory; refuses to overwrite a previous run unless resuming, and
    refuses a path that is a file or cannot be written."""
    run_dir = Path(config.run.out_dir) if config.run.out_dir is not None else default_run_dir(config)
    check_output_dir(run_dir, "run.out_dir")
    holds_run = (run_dir / "config.yaml").exists()
    if resume and not holds_run:
        raise ConfigError(f"--resume: {run_dir} holds no run (no config.yaml)")
    if not resume and holds_run:
        raise ConfigError(
            f"run.out_dir: {run_dir} already holds a run; continue it with --resume {run_dir} "
            "or choose another run.out_dir"
        )
    return run_dir


def train(
    config: Config,
    resume: bool = False,
    callbacks: Sequence[Callback] | None = None,
    log=print,
) -> RunResult:
    """Train a cohort as ``config`` says and return where its results are.

    ``resume=True`` continues the run in ``config.run.out_dir`` from its last complete
    checkpoint; ``config`` may then differ from the run's own config.yaml only in keys
    that do not change the maths (``cohort.config.RESUMABLE_KEYS``). ``callbacks``
    default to the console reporter writing through ``log``. Checks the run directory,
    the resume rule and the dataset before starting any peer.
    """
    from .console import ConsoleReporter
    from .data import check_available

    run_dir = prepare_run_dir(config, resume)
    if resume:
        check_resume(read_run_config(run_dir), config)
    check_available(config.data)
    callbacks = [ConsoleReporter(log)] if callbacks is None else callbacks
    return Cohort(config, run_dir, callbacks=callbacks, log=log).fit(resume=resume)
