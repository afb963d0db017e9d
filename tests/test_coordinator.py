"""The driver: callbacks see completed steps, the resume rule holds on every path,
a vanished cluster stops the run with exit 1, bad output folders are refused."""

from __future__ import annotations

import polars as pl
import pytest

from cohort.backends import ClusterGone, LocalBackend, PeerFailure
from cohort.callbacks import Callback
from cohort.config import ConfigError, check_resume
from cohort.coordinator import Cohort, StepTotals, TrainingStopped, prepare_run_dir, train
from cohort.run import main

from helpers import quiet, synthetic_config, tree_digest


class DeferredBackend(LocalBackend):
    """Like the local backend, but calls run only when ``get`` needs them, each peer's
    in submission order (as Ray actors run them); records completed (peer, method, step)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.completed: set[tuple[int, str, int]] = set()
        self.queues: list[list[Deferred]] = [[] for _ in self.peers]

    def call(self, j, method, *args):
        def run():
            value = LocalBackend.call(self, j, method, *[a.value() if isinstance(a, Deferred) else a for a in args])
            if args:
                self.completed.add((j, method, args[0]))
            return value

        handle = Deferred(run, self.queues[j])
        self.queues[j].append(handle)
        return handle

    def get(self, handles):
        return [handle.value() for handle in handles]


class Deferred:
    """A call that runs when its value is first needed, after its peer's earlier calls."""

    def __init__(self, fn, queue: list[Deferred]) -> None:
        self.fn, self.queue, self.done, self.result = fn, queue, False, None

    def value(self):
        while not self.done:
            earliest = self.queue.pop(0)
            earliest.result, earliest.done = earliest.fn(), True
        return self.result


class RecordSteps(Callback):
    def __init__(self, backend: DeferredBackend) -> None:
        self.backend, self.seen = backend, []

    def on_step(self, step, terms):
        assert all((j, "learn", step) in self.backend.completed for j in range(len(terms))), step
        self.seen.append((step, [t["loss"] for t in terms]))


def test_on_step_fires_when_a_step_has_completed_with_its_terms_in_order(tmp_path):
    config = synthetic_config(tmp_path, "cohort.max_steps_in_flight=3", "optim.epochs=2", "optim.milestones=[1]")
    cohort = Cohort(config, prepare_run_dir(config, resume=False), log=quiet)
    backend = DeferredBackend(config)
    recorder = RecordSteps(backend)
    cohort.callbacks.append(recorder)
    original_start = cohort.start_backend
    cohort.start_backend = lambda backend_=None: original_start(backend)
    cohort.fit()
    assert [step for step, _ in recorder.seen] == list(range(8))  # 64 images / 16 per batch, 2 epochs
    assert all(len(losses) == 2 and all(loss > 0 for loss in losses) for _, losses in recorder.seen)


def test_the_library_refuses_a_resume_whose_maths_differs_and_accepts_a_longer_run(tmp_path):
    first = synthetic_config(tmp_path, "method.name=dml")
    train(first, log=quiet)
    before = tree_digest(tmp_path / "run")
    changed = synthetic_config(tmp_path, "method.name=dml", "optim.lr=0.5")
    with pytest.raises(ConfigError, match=r"^--resume: optim.lr cannot change when resuming .*optim.epochs"):
        train(changed, resume=True, log=quiet)
    assert tree_digest(tmp_path / "run") == before
    longer = synthetic_config(tmp_path, "method.name=dml", "optim.epochs=2", "cohort.max_steps_in_flight=1")
    result = train(longer, resume=True, log=quiet)
    assert (result.run_dir / "checkpoints" / "epoch_002").is_dir()


def test_check_resume_names_nested_method_keys():
    saved = synthetic_config(None, "method.name=amln")
    check_resume(saved, synthetic_config(None, "method.name=amln", "run.max_failures=5"))
    with pytest.raises(ConfigError, match=r"--resume: method.beta cannot change"):
        check_resume(saved, synthetic_config(None, "method.name=amln", "method.beta=2"))


def test_a_cluster_that_is_gone_stops_the_run_keeps_the_checkpoint_and_points_to_resume(tmp_path, monkeypatch):
    config = synthetic_config(tmp_path, "optim.epochs=2", "optim.milestones=[1]", "run.max_failures=3")
    cohort = Cohort(config, prepare_run_dir(config, resume=False), log=quiet)

    class FailOnce(Callback):
        def on_epoch(self, epoch, metrics):
            if epoch == 1:
                monkeypatch.setattr(cohort, "start_backend", gone)
                raise PeerFailure("peer 0's actor died (ActorDiedError)")

    def gone(backend=None):
        raise ClusterGone("the Ray cluster has no CPUs left (it was stopped or lost)")

    cohort.callbacks.append(FailOnce())
    with pytest.raises(TrainingStopped) as stopped:
        cohort.fit()
    message = str(stopped.value)
    assert "cannot be rebuilt: the Ray cluster has no CPUs left" in message
    assert "keeps epoch_001" in message and f"--resume {tmp_path / 'run'}" in message
    assert (tmp_path / "run" / "checkpoints" / "epoch_001" / "meta.json").is_file()


@pytest.mark.parametrize("make_target", ["file", "under_file"])
def test_an_output_folder_that_is_a_file_is_refused_before_anything_starts(tmp_path, capsys, make_target):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    target = blocker if make_target == "file" else blocker / "run"
    assert main(["data.name=synthetic", "cohort.backend=ray", f"run.out_dir={target}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run.out_dir: {target} ") and "file" in err and len(err.splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def test_the_progress_bar_reopens_when_a_recovery_rewinds_the_epoch(monkeypatch):
    from types import SimpleNamespace

    from cohort.console import ConsoleReporter

    monkeypatch.setenv("COHORT_PROGRESS", "1")  # a disabled bar does not count
    reporter = ConsoleReporter(log=quiet)
    config = synthetic_config(None)
    reporter.on_start(SimpleNamespace(config=config, describe={"steps_per_epoch": 4}), 0)
    terms = [{"loss": 1.0}, {"loss": 1.0}]
    for step in (0, 1, 2):
        reporter.on_step(step, terms)
    assert reporter.bar.n == 3
    reporter.on_step(0, terms)  # rebuilt from the checkpoint: the epoch starts again
    assert reporter.bar.n == 1 and reporter.bar_epoch == 0
    reporter.on_step(1, terms)
    reporter.on_step(2, terms)
    reporter.on_step(3, terms)  # the epoch's last step closes its bar
    assert reporter.bar is None


def test_cosine_schedule_follows_the_half_cosine_per_epoch():
    import math

    from cohort.peer import Peer

    config = synthetic_config(None, "optim.schedule=cosine", "optim.epochs=4", "run.precise_bn_batches=0")
    peer = Peer(0, config)
    rates = []
    for epoch in range(4):
        rates.append(peer.optimizer.param_groups[0]["lr"])
        peer.finish_epoch(epoch)
    assert rates == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])


def test_cosine_runs_cannot_resume_with_another_length():
    saved = synthetic_config(None, "optim.schedule=cosine", "optim.epochs=4")
    check_resume(saved, synthetic_config(None, "optim.schedule=cosine", "optim.epochs=4", "run.max_failures=5"))
    with pytest.raises(ConfigError, match="optim.epochs cannot change under optim.schedule=cosine"):
        check_resume(saved, synthetic_config(None, "optim.schedule=cosine", "optim.epochs=6"))


class RecordTerms(Callback):
    def __init__(self) -> None:
        self.steps: list[list[dict[str, float]]] = []

    def on_step(self, step, terms):
        self.steps.append(terms)


def test_an_epochs_train_value_is_the_mean_over_the_steps_that_logged_it(tmp_path):
    config = synthetic_config(tmp_path, "method.name=amln", "method.disc_every=3")  # D at batches 0 and 3 of 4
    recorder = RecordTerms()
    cohort = Cohort(config, prepare_run_dir(config, resume=False), [recorder], log=quiet)
    cohort.fit()
    train = cohort.metrics.frame().filter((pl.col("split") == "train") & (pl.col("epoch") == 1))
    for j in range(2):
        disc = [terms[j]["disc"] for terms in recorder.steps if "disc" in terms[j]]
        loss = [terms[j]["loss"] for terms in recorder.steps]
        assert len(disc) == 2 and len(loss) == 4
        mine = train.filter(pl.col("peer") == j)
        assert mine.filter(pl.col("metric") == "disc")["value"].item() == pytest.approx(sum(disc) / 2)
        assert mine.filter(pl.col("metric") == "loss")["value"].item() == pytest.approx(sum(loss) / 4)


def test_step_totals_average_each_value_over_its_own_steps():
    totals = StepTotals()
    totals.add({"loss": 1.0, "disc": 4.0})
    totals.add({"loss": 3.0})
    assert totals.means() == {"loss": 2.0, "disc": 4.0}
