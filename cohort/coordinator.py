"""Cohort: drives N peers through publish/learn steps, evaluates, checkpoints.

Two backends run the same Peer objects through the same driver loop:
- "local": every peer in this process, called one after the other (the reference);
- "ray": every peer a Ray actor; each step's messages go actor to actor as
  ObjectRefs, so the driver never fetches features, and a bounded number of steps
  is in flight at once.
A backend is three calls: ``call(j, method, *args)`` returns a handle (a value
locally, an ObjectRef under Ray), ``get(handles)`` waits for values, ``shutdown()``.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import checkpoint_name, export_peer, latest_checkpoint, load_checkpoint, save_checkpoint, write_text
from .config import Config, ConfigError
from .metrics import MetricsLog, epoch_values, read_metrics
from .pairing import make_pairing
from .peer import NonFiniteLossError, Peer, topk_accuracy


class PeerFailure(RuntimeError):
    """A peer actor died or raised; the cohort can be rebuilt from a checkpoint.

    ``secondary``: this peer failed only because another one did.
    """

    def __init__(self, message: str, secondary: bool = False) -> None:
        super().__init__(message)
        self.secondary = secondary


class TrainingStopped(RuntimeError):
    """Training cannot continue (non-finite loss, or too many peer failures)."""


@dataclass
class RunResult:
    run_dir: Path
    best_peer: int
    best_peer_path: Path
    final_top1: list[float]
    ensemble_top1: float
    selected_on: str


# ------------------------------------------------------------------- backends


class LocalBackend:
    """All peers in this process; calls run immediately and return values."""

    name = "local"

    def __init__(self, config: Config, peer_class: type[Peer] = Peer) -> None:
        self.peers = [peer_class(j, config, threads=config.run.threads) for j in range(config.cohort.size)]

    def call(self, j: int, method: str, *args: Any) -> Any:
        return getattr(self.peers[j], method)(*args)

    def get(self, handles: list[Any]) -> list[Any]:
        return handles

    def shutdown(self) -> None:
        self.peers = []


class RayBackend:
    """One Ray actor per peer, gang-scheduled with a placement group.

    Messages travel in ``Message.to_wire`` form (numpy arrays, moved out of band);
    ``actor_env`` adds environment variables to every actor (benchmarks use it to
    compare Ray's own tensor settings).
    """

    name = "ray"

    def __init__(self, config: Config, peer_class: type[Peer] = Peer, actor_env: dict[str, str] | None = None) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray, self._remove_pg = ray, remove_placement_group
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (set by `ray job submit`) or a new in-process instance
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        cpus, gpus = check_resources(config, ray.cluster_resources(), nodes)
        bundle = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
        self.group = placement_group([bundle] * config.cohort.size, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=120)
        if not ready:
            remove_placement_group(self.group)
            raise ConfigError(
                f"cohort: waited 120 s for {config.cohort.size} x {bundle} on the Ray cluster; "
                "the resources exist but are held by other work"
            )
        remote_peer = ray.remote(peer_class)
        threads = max(1, int(cpus))
        self.actors = [
            remote_peer.options(
                num_cpus=cpus,
                num_gpus=gpus,
                max_restarts=0,
                runtime_env={"env_vars": actor_env} if actor_env else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=j),
            ).remote(j, config, threads)
            for j in range(config.cohort.size)
        ]

    def call(self, j: int, method: str, *args: Any) -> Any:
        return getattr(self.actors[j], method).remote(*args)

    def get(self, handles: list[Any]) -> list[Any]:
        """Values of ``handles`` (one per peer, in peer order); on failure, the root
        cause among all of them (see ``root_cause``)."""
        ray = self._ray
        try:
            return ray.get(handles)
        except ray.exceptions.RayError:
            errors = []
            for j, handle in enumerate(handles):  # fetch every one, so no failed result goes unhandled
                try:
                    ray.get(handle)
                except ray.exceptions.RayError as error:
                    errors.append(self._translate(error, j))
            raise root_cause(errors) from None

    def _translate(self, error: Exception, j: int) -> Exception:
        ray = self._ray
        if isinstance(error, ray.exceptions.RayActorError) and not isinstance(error, ray.exceptions.RayTaskError):
            return PeerFailure(f"peer {j}'s actor died ({type(error).__name__})")
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, NonFiniteLossError):
            return cause
        if isinstance(cause, ray.exceptions.RayError):  # a message it needed was lost with its sender
            return PeerFailure(f"peer {j} lost a teacher's message ({type(cause).__name__})", secondary=True)
        first_line = str(cause).splitlines()[0] if str(cause) else ""
        return PeerFailure(f"peer {j} raised {type(cause).__name__}: {first_line}")

    def shutdown(self) -> None:
        for actor in getattr(self, "actors", []):
            self._ray.kill(actor)
        self.actors = []
        if getattr(self, "group", None) is not None:
            self._remove_pg(self.group)
            self.group = None


def root_cause(errors: list[Exception]) -> Exception:
    """The error to report from one step's failures: a peer whose own loss went
    non-finite before one that only read a non-finite teacher; a peer that died or
    raised before one that only lost its teacher's message."""
    non_finite = [e for e in errors if isinstance(e, NonFiniteLossError)]
    origins = [e for e in non_finite if not e.bad_teachers]
    primary = [e for e in errors if not getattr(e, "secondary", False)]
    return (origins or non_finite or primary or errors)[0]


def check_resources(config: Config, total: dict[str, float], nodes: list[dict[str, float]]) -> tuple[float, float]:
    """Per-peer (CPUs, GPUs); a one-line error naming the numbers if the cluster can
    never fit the cohort (so the run fails at once instead of waiting forever)."""
    c = config.cohort
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    gpus = c.gpus_per_peer if c.gpus_per_peer is not None else (1.0 if have_gpu >= 1 else 0.0)
    need_cpu, need_gpu = c.size * c.cpus_per_peer, c.size * gpus
    if need_cpu > have_cpu + 1e-9:
        raise ConfigError(
            f"cohort.cpus_per_peer: {c.size} peers x {c.cpus_per_peer:g} CPU = {need_cpu:g} CPUs, but the "
            f"Ray cluster has {have_cpu:g}; lower cohort.cpus_per_peer (e.g. {have_cpu / c.size:g}) or cohort.size"
        )
    if need_gpu > have_gpu + 1e-9:
        raise ConfigError(
            f"cohort.gpus_per_peer: {c.size} peers x {gpus:g} GPU = {need_gpu:g} GPUs, but the Ray cluster "
            f"has {have_gpu:g}; set cohort.gpus_per_peer=0 for CPU or a fraction to share GPUs"
        )
    if nodes and not any(n.get("CPU", 0) >= c.cpus_per_peer and n.get("GPU", 0) >= gpus for n in nodes):
        raise ConfigError(
            f"cohort.cpus_per_peer: no single Ray node has {c.cpus_per_peer:g} CPUs and {gpus:g} GPUs for one peer"
        )
    return c.cpus_per_peer, gpus


BACKENDS: dict[str, Callable[[Config], Any]] = {"local": LocalBackend, "ray": RayBackend}


# --------------------------------------------------------------------- driver


class Cohort:
    """Trains the cohort a validated Config describes into ``run_dir``."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        on_step: Callable[[int], None] | None = None,
        on_epoch: Callable[[int, MetricsLog], None] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.config, self.run_dir = config, Path(run_dir)
        self.on_step, self.on_epoch, self.log = on_step, on_epoch, log
        self.size = config.cohort.size
        self.pairing = make_pairing(config.cohort.pairing, config.run.seed)
        self.metrics = MetricsLog(self.run_dir.name)
        self.failures = 0
        self.backend: Any = None

    # ------------------------------------------------------------- lifecycle

    def fit(self, resume: bool = False) -> RunResult:
        """Train until ``optim.epochs``, surviving up to ``run.max_failures`` peer failures."""
        try:
            self.start_backend()  # fails before any file is written
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                write_text(self.run_dir / "config.yaml", self.config.to_yaml())
            epoch = self.restore() if resume else 0
            while epoch < self.config.optim.epochs:
                try:
                    self.train_epoch(epoch)
                    epoch += 1
                except PeerFailure as failure:
                    epoch = self.recover(failure)
            return self.finish()
        finally:
            if self.backend is not None:
                self.backend.shutdown()
                self.backend = None

    def start_backend(self, backend: Any = None) -> None:
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
        self.log(
            f"[cohort] {failure}; rebuilding the cohort from "
            f"{source.name if source else 'the initial weights'} "
            f"(failure {self.failures} of at most {self.config.run.max_failures})"
        )
        self.backend.shutdown()
        self.backend = None
        self.start_backend()
        return self.restore()

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
        sums: list[dict[str, float]] = [{} for _ in range(self.size)]
        progress = tqdm(
            total=spe,
            desc=f"epoch {epoch + 1}/{self.config.optim.epochs}",
            unit="step",
            file=sys.stderr,
            mininterval=0.5 if sys.stderr.isatty() else 30,
            leave=False,
            disable=os.environ.get("COHORT_PROGRESS", "1") == "0",
        )
        with progress:
            self.run_steps(range(epoch * spe, (epoch + 1) * spe), teachers, lambda r: self._collect(r, sums, progress))
        self.backend.get([self.backend.call(j, "finish_epoch", epoch) for j in range(self.size)])
        self.record_epoch(epoch + 1, [{k: v / spe for k, v in s.items()} for s in sums])

    def run_steps(
        self,
        steps: range,
        teachers: list[tuple[int, ...]],
        on_result: Callable[[list[dict[str, float]]], None],
    ) -> None:
        """Publish then learn for each step, at most ``cohort.max_steps_in_flight``
        steps outstanding; ``on_result`` gets every step's per-peer loss terms in order."""
        backend, limit = self.backend, self.config.cohort.max_steps_in_flight
        in_flight: deque[list[Any]] = deque()
        with self._drained_on_error(in_flight):
            for step in steps:
                published = [backend.call(j, "publish", step) for j in range(self.size)]
                in_flight.append(
                    [backend.call(j, "learn", step, *[published[t] for t in teachers[j]]) for j in range(self.size)]
                )
                del published  # actors hold the messages until their learn calls finish
                while len(in_flight) >= limit:
                    on_result(backend.get(in_flight.popleft()))
                if self.on_step is not None:
                    self.on_step(step)
            while in_flight:
                on_result(backend.get(in_flight.popleft()))

    @contextmanager
    def _drained_on_error(self, in_flight: deque[list[Any]]) -> Iterator[None]:
        """On a failed step, wait out the steps still in flight and drop their
        errors, so the first failure is the one reported (and Ray logs no
        "unhandled error" for the rest)."""
        try:
            yield
        except BaseException:
            for handles in in_flight:
                for handle in handles:
                    with suppress(Exception):
                        self.backend.get([handle])
            in_flight.clear()
            raise

    def _collect(self, results: list[dict[str, float]], sums: list[dict[str, float]], progress) -> None:
        for j, terms in enumerate(results):
            for name, value in terms.items():
                sums[j][name] = sums[j].get(name, 0.0) + value
        progress.set_postfix(loss=" ".join(f"{r['loss']:.3f}" for r in results), refresh=False)
        progress.update(1)

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
        self.print_epoch(epoch, splits[-1])
        if epoch % self.config.run.checkpoint_every == 0 or epoch == self.config.optim.epochs:
            self.save(epoch)
        if self.on_epoch is not None:
            self.on_epoch(epoch, self.metrics)

    def print_epoch(self, epoch: int, split: str) -> None:
        latest = epoch_values(self.metrics.frame(), epoch)
        names, total = self.config.cohort.model_names, self.config.optim.epochs
        for j in range(self.size):
            self.log(
                f"epoch {epoch}/{total}  peer {j} ({names[j]})  train loss {latest[(j, 'train', 'loss')]:.4f}  "
                f"{split} top-1 {100 * latest[(j, split, 'top1')]:.2f}%  "
                f"top-5 {100 * latest[(j, split, 'top5')]:.2f}%  loss {latest[(j, split, 'loss')]:.4f}"
            )
        self.log(f"epoch {epoch}/{total}  ensemble {split} top-1 {100 * latest[(None, split, 'ensemble_top1')]:.2f}%")

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
        """Pick the best peer by final-epoch accuracy (val split if any) and export it."""
        frame = read_metrics(self.run_dir / "metrics.parquet")
        split = "val" if self.describe["has_val"] else "test"
        last = int(frame["epoch"].max())
        final = epoch_values(frame, last)
        selection = {j: final[(j, split, "top1")] for j in range(self.size)}
        best = max(range(self.size), key=lambda j: (selection[j], -j))
        states = getattr(self, "last_states", None)
        if states is None:  # resumed a finished run: the final checkpoint has them
            states, _ = load_checkpoint(latest_checkpoint(self.run_dir))
        metadata = self.peer_metadata(best) | {
            "peer": best,
            "epoch": last,
            "selected_on": f"final-epoch {split} top1",
            "top1": selection[best],
        }
        path = export_peer(self.run_dir / "best_peer.safetensors", states[best]["model"], metadata)
        name = self.config.cohort.model_names[best]
        self.log(f"best peer: {best} ({name}, final-epoch {split} top-1 {100 * selection[best]:.2f}%) -> {path}")
        return RunResult(
            run_dir=self.run_dir,
            best_peer=best,
            best_peer_path=path,
            final_top1=[final[(j, "test", "top1")] for j in range(self.size)],
            ensemble_top1=final[(None, "test", "ensemble_top1")],
            selected_on=split,
        )


# ------------------------------------------------------------------ public API


def default_run_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.method.name}"


def prepare_run_dir(config: Config, resume: bool) -> Path:
    """The run's directory; refuses to overwrite a previous run unless resuming."""
    run_dir = Path(config.run.out_dir) if config.run.out_dir is not None else default_run_dir(config)
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
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, MetricsLog], None] | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train a cohort as ``config`` says and return where its results are.

    Checks the run directory and the dataset before starting any peer.
    """
    from .data import check_available

    run_dir = prepare_run_dir(config, resume)
    check_available(config.data)
    return Cohort(config, run_dir, on_step=on_step, on_epoch=on_epoch, log=log).fit(resume=resume)
