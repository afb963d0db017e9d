"""Ray Tune sweeps: every trial a whole cohort in its own placement group, results,
best peer, retries from a trial's checkpoint, resume, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

import cohort
from cohort.callbacks import Callback
from tuning.schema import load_sweep
from tuning.sweep import main, run_sweep

from helpers import REPO

SYNTHETIC_BASE = {
    "data": {"name": "synthetic", "train_subset": None, "batch_size": 16, "synthetic": {"train_size": 96}},
    "method": {"name": "dml"},
    "optim": {"epochs": 2, "milestones": []},
}


def write_sweep(folder: Path, **changes) -> Path:
    sweep = {
        "name": "test",
        "base": SYNTHETIC_BASE,
        "fixed": {"cohort.cpus_per_peer": 0.5},
        "space": {"cohort.size": {"grid": [2, 3]}},
        "max_failures": 1,
        "out_dir": str(folder / "sweep"),
    } | changes
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def trial_reports(sweep_dir: Path) -> dict[str, list[dict]]:
    """Every trial's reports (Tune's result.json, one JSON object per line)."""
    return {
        p.parent.name: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        for p in sweep_dir.glob("*/result.json")
    }


def assert_png_with_content(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01, path  # not blank


class KillPeerOnce(Callback):
    """SIGKILLs peer 1's actor at ``step`` the first time (``marker`` remembers)."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_start(self, cohort, first_epoch):
        self.cohort = cohort
        with self.marker.with_suffix(".starts").open("a") as starts:
            starts.write(f"{first_epoch}\n")  # the epoch each attempt starts at

    def on_step(self, step, terms):
        if step == self.step and not self.marker.exists():
            self.marker.write_text("killed")
            pid = self.cohort.backend.get([self.cohort.backend.call(1, "describe")])[0]["pid"]
            os.kill(pid, signal.SIGKILL)


class FailAfterFirstEpochOnce(Callback):
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_epoch(self, epoch, metrics):
        if epoch == 1 and not self.marker.exists():
            self.marker.write_text("failed")
            raise RuntimeError("planned failure after epoch 1")


@pytest.fixture(autouse=True)
def pickle_this_module_by_value():
    """Trials unpickle these callbacks in Ray workers, which cannot import tests/."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------- sweep files


def test_the_sweep_shape_from_the_issue_loads_as_written(tmp_path):
    path = tmp_path / "beta-size.yaml"
    path.write_text(
        """
name: beta-size
base: configs/amln_fashion.yaml
fixed: {data.val_split: 0.1}
space:
  cohort.size: {choice: [2, 3]}
  method.beta: {grid: [0.1, 0.3, 1, 3]}
  method.temperature: {uniform: [2.0, 4.0]}
samples: 1
max_concurrent_trials: 1
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
metric: val_top1_best
max_failures: 1
out_dir: runs/sweeps/beta-size
"""
    )
    cwd = os.getcwd()
    os.chdir(REPO)  # base is a configs/ path
    try:
        sweep, base = load_sweep(path, ["samples=4", "fixed.optim.epochs=1"])
    finally:
        os.chdir(cwd)
    assert (
        sweep.samples == 4 and sweep.scheduler.name == "asha" and sweep.space["method.beta"].values == [0.1, 0.3, 1, 3]
    )
    assert base["optim"]["epochs"] == 1 and base["data"]["val_split"] == 0.1 and base["method"]["name"] == "amln"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "sweeps").glob("*.yaml")))
def test_every_sweep_file_in_configs_loads(name):
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        sweep, base = load_sweep(Path("configs/sweeps") / name)
    finally:
        os.chdir(cwd)
    assert sweep.space and base["data"]["val_split"] > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"space": {"method.temperatur": {"grid": [1, 2]}}},
            "space.method.temperatur: unknown key 'method.temperatur' (did you mean 'temperature'?)",
        ),
        ({"fixed": {"data.val_split": 0}}, "fixed.data.val_split: 0 leaves no validation split"),
        ({"samplez": 3}, "unknown key 'samplez' (did you mean 'samples'?)"),
        (
            {
                "space": {
                    "cohort.size": {"grid": [2, 3]},
                    "cohort.models": {"grid": ["resnet20", ["resnet20", "resnet32"]]},
                }
            },
            "space (cohort.models=['resnet20', 'resnet32'], cohort.size=3): cohort.models lists 2 models",
        ),
        ({"fixed": {"cohort.backend": "local"}}, "fixed: cohort.backend is set by every trial"),
        (
            {"space": {"cohort.size": {"uniform": [2, 4]}}},
            "space.cohort.size: cohort.size: input should be a valid integer",
        ),
        (
            {"space": {"cohort.size": {"grid": [2, 1]}}},
            "space.cohort.size: cohort.size: input should be greater than or equal to 2",
        ),
    ],
)
def test_bad_sweep_files_fail_with_one_line_and_start_nothing(tmp_path, capsys, changes, message):
    path = write_sweep(tmp_path, **changes)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_out_dir_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert main(["--config", str(write_sweep(tmp_path, out_dir=str(blocker)))]) == 2
    assert "out_dir: " in capsys.readouterr().err and blocker.read_text() == "x"


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_trial_the_cluster_can_never_fit_is_refused_before_any_trial_starts(tmp_path, capsys):
    path = write_sweep(tmp_path, fixed={"cohort.cpus_per_peer": 1}, space={"cohort.size": {"grid": [2, 5]}})
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "a trial of 5 peers needs 5.01 CPUs (5 x 1 for its peers + 0.01 for its driver), but the Ray cluster has 2"
        in err
    )
    assert len(err.splitlines()) == 1 and not (tmp_path / "sweep").exists()


# ------------------------------------------------------------------------ sweeps


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_sweep_over_cohort_sizes_writes_results_and_a_loadable_best_peer(tmp_path, capsys):
    assert main(["--config", str(write_sweep(tmp_path))]) == 0
    sweep_dir = tmp_path / "sweep"
    out = capsys.readouterr().out
    assert f"[sweep] best peer -> {sweep_dir / 'best_peer.safetensors'}" in out

    results = pl.read_parquet(sweep_dir / "results.parquet")
    assert sorted(results["cohort.size"].to_list()) == [2, 3]
    assert results["status"].to_list() == ["done", "done"] and results["epochs"].to_list() == [2, 2]
    assert results.filter(pl.col("cohort.size") == 2)["val_top1_peer2"].is_null().all()
    for name in ("results.md", "summary.md"):
        assert "| cohort.size |" in (sweep_dir / name).read_text()

    # each trial: its peers in its own placement group; resources grow with its size
    reports = trial_reports(sweep_dir)
    assert len(reports) == 2
    groups = set()
    for lines in reports.values():
        last = lines[-1]
        size = last["config"]["cohort.size"]
        assert last["peer_groups"].split(",") == [last["placement_group"]] * size
        assert last["trial_bundles"] == size + 1 and last["trial_cpus"] == pytest.approx(0.01 + 0.5 * size)
        groups.add(last["placement_group"])
    assert len(groups) == 2

    # the best trial (on validation) exported its best peer, with the table's test accuracy
    best_row = results.sort("val_top1_best", descending=True).row(0, named=True)
    model = cohort.load_peer(sweep_dir / "best_peer.safetensors")
    meta = cohort.read_peer_metadata(sweep_dir / "best_peer.safetensors")
    assert meta["selected_on"] == "final-epoch val top1" and meta["top1"] == pytest.approx(best_row["val_top1_best"])
    assert meta["test_top1"] == pytest.approx(best_row[f"test_top1_peer{meta['peer']}"])
    assert meta["trial_config"]["cohort"]["size"] == best_row["cohort.size"]
    assert model(cohort_input(meta)).logits.shape == (2, 10)

    assert_png_with_content(sweep_dir / "sweep.png")
    assert_png_with_content(sweep_dir / "curves.png")
    for curves in sweep_dir.glob("*/run/curves.png"):
        assert_png_with_content(curves)
    tables = (sweep_dir / "curves.md").read_text()
    val_table = tables.split("## validation top-1 (%), by epoch")[1].split("##")[0]
    header, _, *rows = [line for line in val_table.splitlines() if line]
    assert [c.strip() for c in header.split("|")[1:-1]] == ["configuration", "1", "2"]
    final_val = {row["cohort.size"]: row["val_top1_mean"] for row in results.to_dicts()}
    for row in rows:  # one trial per size: the epoch-2 cell is that trial's final val_top1_mean
        label, _, last = (c.strip() for c in row.split("|")[1:-1])
        assert float(last) == pytest.approx(100 * final_val[int(label.split("=")[-1])], abs=0.01)


def cohort_input(meta):
    import torch

    return torch.zeros(2, meta["in_channels"], meta["image_size"], meta["image_size"])


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_trial_whose_peer_dies_is_retried_from_its_checkpoint_and_finishes(tmp_path):
    path = write_sweep(tmp_path, space={"cohort.size": {"grid": [2]}})
    sweep, base = load_sweep(path, ["fixed.optim.epochs=3"])
    sweep_dir = Path(sweep.out_dir)
    marker = tmp_path / "killed"
    steps_per_epoch = 5  # 96 images - 10% val = 86, batch 16
    summary = run_sweep(sweep, base, sweep_dir, trial_callbacks=(KillPeerOnce(steps_per_epoch + 2, marker),))
    assert marker.exists() and summary.failed == 0
    (trial,) = [p.parent for p in sweep_dir.glob("*/result.json")]
    assert (trial / "error.txt").is_file()  # the attempt that lost its peer
    assert "ActorDiedError" in (trial / "error.txt").read_text() or "actor died" in (trial / "error.txt").read_text()
    starts = marker.with_suffix(".starts").read_text().split()
    assert starts == ["0", "1"]  # the retry began from epoch 1's checkpoint, not from scratch
    assert trial_reports(sweep_dir)[trial.name][-1]["epoch"] == 3
    results = pl.read_parquet(sweep_dir / "results.parquet")
    assert results["status"].to_list() == ["done"] and results["epochs"].to_list() == [3]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_sweep_that_stopped_on_a_failed_trial_resumes_and_finishes_it(tmp_path, capsys):
    path = write_sweep(tmp_path, space={"cohort.size": {"grid": [2]}}, max_failures=0)
    sweep, base = load_sweep(path)
    sweep_dir = Path(sweep.out_dir)
    marker = tmp_path / "failed"
    summary = run_sweep(sweep, base, sweep_dir, trial_callbacks=(FailAfterFirstEpochOnce(marker),))
    assert marker.exists() and summary.failed == 1
    assert pl.read_parquet(sweep_dir / "results.parquet")["status"].to_list() == ["error"]

    assert main(["--resume", str(sweep_dir)]) == 0
    results = pl.read_parquet(sweep_dir / "results.parquet")
    assert results["status"].to_list() == ["done"] and results["epochs"].to_list() == [2]
    (lines,) = trial_reports(sweep_dir).values()
    assert [line["epoch"] for line in lines] == [1, 2]  # epoch 1 was not trained again
    assert (sweep_dir / "best_peer.safetensors").is_file()

    # --report rewrites every output from Tune's state, training nothing
    for name in ("results.md", "results.parquet", "summary.md", "curves.png", "best_peer.safetensors"):
        (sweep_dir / name).unlink()
    assert main(["--report", str(sweep_dir)]) == 0
    assert pl.read_parquet(sweep_dir / "results.parquet").equals(results)
    assert (sweep_dir / "best_peer.safetensors").is_file() and "| cohort.size |" in (
        sweep_dir / "summary.md"
    ).read_text()
    assert_png_with_content(sweep_dir / "curves.png")
    assert len(trial_reports(sweep_dir)[next(iter(trial_reports(sweep_dir)))]) == 2  # no epoch was trained


@pytest.mark.parametrize("flag", ["--resume", "--report"])
def test_resume_or_report_of_a_folder_without_a_sweep_is_one_line(flag, tmp_path, capsys):
    assert main([flag, str(tmp_path)]) == 2
    assert f"{flag}: {tmp_path} holds no sweep" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_interrupted_with_ctrl_c_resumes_where_it_stopped(tmp_path):
    """The sweep runs in its own process (its own Ray), gets SIGINT once its first
    trial has reported a checkpoint, and `--resume` then finishes every trial."""
    import subprocess
    import time

    path = write_sweep(
        tmp_path,
        space={"method.temperature": {"grid": [2.0, 4.0]}},
        fixed={"cohort.cpus_per_peer": 0.5, "optim.epochs": 3, "data.synthetic.train_size": 512},
    )
    sweep_dir = tmp_path / "sweep"
    env = os.environ | {"COHORT_PROGRESS": "0", "RAY_ADDRESS": ""}
    command = [sys.executable, "-m", "tuning.sweep"]
    sweep = subprocess.Popen([*command, "--config", str(path)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(sweep_dir.glob("*/checkpoint_000000")) and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # waiting for a condition on disk, not for time to pass
    assert sweep.poll() is None, "the sweep ended before it could be interrupted"
    sweep.send_signal(signal.SIGINT)
    sweep.wait(timeout=120)
    finished = [lines[-1]["epoch"] == 3 for lines in trial_reports(sweep_dir).values() if lines]
    assert finished.count(True) < 2, "nothing was left to resume"

    resumed = subprocess.run([*command, "--resume", str(sweep_dir)], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=400)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    results = pl.read_parquet(sweep_dir / "results.parquet")
    assert sorted(results["method.temperature"].to_list()) == [2.0, 4.0]
    assert results["status"].to_list() == ["done", "done"] and results["epochs"].to_list() == [3, 3]


def metrics_frame(values: dict[int, list[float]], panels: list[tuple[str, str]]) -> pl.DataFrame:
    """A trial's metrics.parquet rows: ``values`` (epoch -> one value per peer) under
    each (split, metric) of ``panels``, plus a cohort-wide ensemble row."""
    rows = [
        {"run": "r", "epoch": e, "peer": p, "split": split, "metric": metric, "value": v}
        for e, per_peer in values.items()
        for p, v in enumerate(per_peer)
        for split, metric in panels
    ]
    rows.append({"run": "r", "epoch": 1, "peer": None, "split": "test", "metric": "ensemble_top1", "value": 0.0})
    return pl.DataFrame(rows)


def test_curve_stats_average_peers_then_seeds():
    """curves.png's numbers: per configuration and epoch, the mean over peers within a
    trial, then mean and std over the configuration's seeds."""
    from tuning.plots import curve_stats

    def trial(values: dict[int, list[float]]) -> pl.DataFrame:  # epoch -> per-peer test top-1
        return metrics_frame(values, [("test", "top1")])

    metrics = [
        ("dml", trial({1: [0.5, 0.7], 2: [0.8, 0.8]})),
        ("dml", trial({1: [0.7, 0.9], 2: [0.9, 0.9]})),
        ("vanilla", trial({1: [0.4, 0.4], 2: [0.6, 0.6]})),
    ]
    stats = curve_stats(metrics, "test", "top1")
    dml = stats.filter(pl.col("configuration") == "dml").sort("epoch")
    assert dml["mean"].to_list() == pytest.approx([0.7, 0.85])
    assert dml["std"].to_list() == pytest.approx([0.1414213562, 0.0707106781])
    vanilla = stats.filter(pl.col("configuration") == "vanilla")
    assert vanilla["mean"].to_list() == pytest.approx([0.4, 0.6]) and vanilla["std"].to_list() == [0.0, 0.0]


def test_curves_markdown_tabulates_each_panel_by_epoch_with_the_spread_over_seeds():
    from tuning.results import curves_markdown

    def trial(test_top1: dict[int, list[float]]) -> pl.DataFrame:  # epoch -> per-peer test top-1
        return metrics_frame(test_top1, [("test", "top1"), ("train", "ce")])

    later = {e: [0.9, 0.9] for e in range(3, 11)}
    metrics = [
        ("dml", trial({1: [0.5, 0.7], 2: [0.8, 0.8]})),
        ("dml", trial({1: [0.7, 0.9], 2: [0.9, 0.9]})),
        ("amln", trial({1: [0.4, 0.4], 2: [0.6, 0.6]} | later)),  # 10 epochs, one trial
    ]
    text = curves_markdown(metrics, type("Sweep", (), {"name": "s"}))
    lines = [line for line in text.split("## test top-1 (%), by epoch")[1].split("##")[0].splitlines() if line]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines]
    assert cells[0] == ["configuration", *map(str, range(1, 11))]  # epochs in numeric order, 10 last
    rows = {row[0]: row[1:] for row in cells[2:]}
    assert rows["dml"] == ["70.0 ± 14.14", "85.0 ± 7.07", *["—"] * 8]  # never reached epochs 3-10
    assert rows["amln"] == ["40.0", "60.0", *["90.0"] * 8]  # one trial: no spread
    assert "## training cross-entropy, by epoch" in text and "validation" not in text  # no val rows, no val table


def test_configuration_labels_read_a_swept_section_compactly():
    from tuning.plots import compact

    assert compact('{"name": "amln", "beta": 0.1, "adv_weight": 0.1}') == "amln (beta=0.1, adv_weight=0.1)"
    assert compact('{"name": "dml"}') == "dml" and compact(0.3) == "0.3" and compact("cyclic") == "cyclic"


def test_seed_summary_gives_mean_and_std_and_no_spread_for_one_trial(tmp_path):
    from tuning.results import seed_summary

    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "space": {"method.name": {"grid": ["dml", "amln"]}, "run.seed": {"grid": [0, 1]}},
                "metric": "val_top1_mean",
            }
        )
    )
    sweep, _ = load_sweep(path)
    frame = pl.DataFrame(
        {
            "method.name": ["dml", "dml", "amln", "amln"],
            "run.seed": [0, 1, 0, 1],
            "status": ["done", "done", "done", "error"],
            "val_top1_mean": [0.80, 0.82, 0.70, None],
        }
    )
    summary = {row["method.name"]: row for row in seed_summary(frame, sweep).to_dicts()}
    assert summary["dml"]["val_top1_mean"] == "81.0 ± 1.41" and summary["dml"]["trials"] == 2
    assert summary["amln"]["val_top1_mean"] == "70.0" and summary["amln"]["trials"] == 1
