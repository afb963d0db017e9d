"""Checkpoints: atomic, never unpickled, clear errors; best peer export; resume."""

from __future__ import annotations

import pickle

import polars as pl
import pytest
import torch

import cohort
from cohort import checkpoint as ckpt
from cohort.callbacks import OnEpoch
from cohort.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from cohort.coordinator import Cohort, prepare_run_dir, train
from cohort.data import load_data
from cohort.peer import Peer
from cohort.run import main

from helpers import quiet, synthetic_config, tree_digest


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch local AMLN run on synthetic data, with its config."""
    root = tmp_path_factory.mktemp("finished")
    config = synthetic_config(root, "optim.epochs=2", "optim.milestones=[1]")
    result = train(config, log=quiet)
    return config, result


def test_checkpoint_round_trip_restores_every_peer_exactly(finished_run):
    config, result = finished_run
    states, meta = load_checkpoint(latest_checkpoint(result.run_dir))
    assert meta["epoch"] == 2 and meta["peer_count"] == 2
    peer = Peer(1, config)
    peer.load_state(states[1])
    again = peer.state()
    for part in ("model", "extras"):
        for name, value in states[1][part].items():
            assert torch.equal(again[part][name], value), name
    assert again["optimizer"]["param_groups"] == states[1]["optimizer"]["param_groups"]
    assert again["scheduler"]["last_epoch"] == 2
    assert torch.equal(again["rng"], states[1]["rng"])


def test_best_peer_loads_alone_and_reproduces_its_recorded_accuracy(finished_run):
    config, result = finished_run
    info = cohort.read_peer_metadata(result.best_peer_path)
    assert info["architecture"] == "resnet20" and info["num_classes"] == 10 and info["in_channels"] == 1
    assert info["selected_on"] == "final-epoch test top1" and info["epoch"] == 2
    model = cohort.load_peer(result.best_peer_path)
    assert not model.training
    hits = total = 0
    with torch.no_grad():
        for x, y in load_data(config.data, config.run.seed).eval_split("test").eval_batches():
            hits += int((model(x).logits.argmax(1) == y).sum())
            total += len(y)
    assert hits / total == pytest.approx(info["top1"], abs=1e-9)
    assert info["top1"] == pytest.approx(result.final_top1[result.best_peer])


def test_best_peer_is_chosen_on_the_final_epoch_not_the_best_epoch(finished_run):
    _, result = finished_run
    frame = pl.read_parquet(result.run_dir / "metrics.parquet")
    final = frame.filter((pl.col("epoch") == 2) & (pl.col("split") == "test") & (pl.col("metric") == "top1"))
    best = final.sort(["value", "peer"], descending=[True, False])["peer"][0]
    assert best == result.best_peer


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"\x00" * 8 + b[8:], id="bad-header"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_damaged_peer_file_is_a_clear_error(finished_run, tmp_path, damage):
    _, result = finished_run
    path = tmp_path / "best_peer.safetensors"
    path.write_bytes(damage(result.best_peer_path.read_bytes()))
    with pytest.raises(CheckpointError, match=r"best_peer\.safetensors: not a readable safetensors file"):
        cohort.load_peer(path)


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    class Bomb:
        def __reduce__(self):
            return (pytest.fail, ("the file was unpickled",))

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"weights": Bomb()}))
    with pytest.raises(CheckpointError, match="model.pt: not a readable safetensors file"):
        cohort.load_peer(path)


def test_foreign_safetensors_file_names_what_is_missing(tmp_path):
    path = tmp_path / "other.safetensors"
    ckpt.write_safetensors(path, {"w": torch.zeros(2)}, {})
    with pytest.raises(CheckpointError, match="no cohort metadata .*architecture"):
        cohort.load_peer(path)


def test_crash_while_writing_leaves_no_half_checkpoint(finished_run, tmp_path, monkeypatch):
    config, result = finished_run
    states, meta = load_checkpoint(latest_checkpoint(result.run_dir))
    target = tmp_path / "checkpoints" / "epoch_003"
    real_save = ckpt.save_file
    written = []

    def crash_on_second_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        written.append(filename)
        if len(written) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(target, states, meta)
    assert not target.exists()
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no temp folder or file left behind
    assert latest_checkpoint(tmp_path) is None


def test_crash_while_replacing_a_file_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "best_peer.safetensors"
    ckpt.write_safetensors(path, {"w": torch.ones(3)}, {"v": "old"})
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_safetensors(path, {"w": torch.zeros(3)}, {"v": "new"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best_peer.safetensors"]


def test_checkpoint_without_meta_is_not_complete(finished_run, tmp_path):
    (tmp_path / "epoch_001").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "epoch_001")


class StopAfter(Exception):
    pass


def test_resume_continues_from_the_last_checkpoint_and_matches_an_uninterrupted_run(tmp_path, capsys):
    options = ["optim.epochs=3", "optim.milestones=[2]", "method.name=amln"]
    clean = train(synthetic_config(tmp_path / "clean", *options), log=quiet)

    config = synthetic_config(tmp_path / "stopped", *options)

    def stop_after_epoch_two(epoch, metrics):
        if epoch == 2:
            raise StopAfter

    with pytest.raises(StopAfter):
        Cohort(config, prepare_run_dir(config, resume=False), [OnEpoch(stop_after_epoch_two)], log=quiet).fit()
    run_dir = tmp_path / "stopped" / "run"
    assert latest_checkpoint(run_dir).name == "epoch_002" and not (run_dir / "best_peer.safetensors").exists()

    assert main(["--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "epoch 3/3  peer 0" in out and "epoch 1/3" not in out and "epoch 2/3" not in out
    resumed_states, _ = load_checkpoint(latest_checkpoint(run_dir))
    clean_states, _ = load_checkpoint(latest_checkpoint(clean.run_dir))
    for a, b in zip(clean_states, resumed_states):
        for name in a["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), name
    metrics = pl.read_parquet(run_dir / "metrics.parquet")
    per_epoch = metrics.filter((pl.col("split") == "test") & (pl.col("metric") == "top1")).group_by("epoch").len()
    assert sorted(per_epoch.rows()) == [(1, 2), (2, 2), (3, 2)]  # every epoch once per peer
    assert (run_dir / "best_peer.safetensors").is_file()


def test_resume_of_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    assert f"--resume: {tmp_path} holds no run" in capsys.readouterr().err


def test_a_new_run_never_overwrites_an_old_one(finished_run, capsys):
    config, result = finished_run
    before = tree_digest(result.run_dir)
    assert main([f"run.out_dir={result.run_dir}", "cohort.backend=local", "data.name=synthetic"]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert tree_digest(result.run_dir) == before


def test_resume_refuses_overrides_that_would_change_the_maths(finished_run, capsys):
    _, result = finished_run
    before = tree_digest(result.run_dir)
    assert main(["--resume", str(result.run_dir), "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: optim.lr cannot change when resuming") and "optim.epochs" in err
    assert len(err.splitlines()) == 1
    assert tree_digest(result.run_dir) == before


def test_every_run_draws_its_curves_and_the_report_command_redraws_them(finished_run, capsys):
    import matplotlib.image

    from cohort.report import main as report

    _, result = finished_run
    curves = result.run_dir / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves.unlink()
    assert report([str(result.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "train loss" in out and "test top-1 %" in out
    assert "| ensemble |" in out and f"curves: {curves}" in out
    pixels = matplotlib.image.imread(curves)
    assert pixels.shape[0] > 300 and pixels.std() > 0.01  # drawn, not blank


def test_report_of_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    from cohort.report import main as report

    assert report([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no metrics.parquet (not a cohort run folder)"
