"""End to end in one process: real Fashion-MNIST learning, metrics, the CLI."""

from __future__ import annotations

import polars as pl
import pytest

from cohort.config import load_config
from cohort.coordinator import train
from cohort.run import main

from helpers import synthetic_config

# 2,000 training images, one epoch. Small batches give the peers 250 steps; without
# augmentation vanilla's one-epoch ceiling is ~70% here (with it ~65%), which leaves
# room to test that AMLN learns rather than just runs (measured: 65-70% per peer).
FASHION_QUICK = [
    "cohort.backend=local",
    "data.train_subset=2000",
    "data.test_subset=2000",
    "data.batch_size=8",
    "data.augment=false",
    "optim.lr=0.02",
    "optim.epochs=1",
    "optim.milestones=[]",
]


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_required")
@pytest.mark.parametrize(("size", "precision"), [(2, "bf16"), (3, "fp32")])
def test_amln_cohort_learns_fashion_mnist(size, precision, tmp_path):
    """Both precisions on every machine (the default, auto, picks bf16 only on CPUs and
    GPUs with native bf16; elsewhere bf16 autocast is emulated, slower but the same)."""
    overrides = [f"cohort.size={size}", f"run.precision={precision}", f"run.out_dir={tmp_path / 'run'}"]
    config = load_config(None, [*FASHION_QUICK, *overrides])
    result = train(config, log=lambda line: None)
    assert all(top1 > 0.60 for top1 in result.final_top1), result.final_top1
    metrics = pl.read_parquet(tmp_path / "run" / "metrics.parquet")
    train_terms = set(metrics.filter(pl.col("split") == "train")["metric"])
    assert {"ce", "kl", "feat", "adv", "disc", "loss", "top1"} <= train_terms
    test_rows = metrics.filter(pl.col("split") == "test")
    assert {"top1", "top5", "loss", "ensemble_top1"} <= set(test_rows["metric"])
    assert sorted(test_rows.filter(pl.col("metric") == "top1")["peer"].to_list()) == list(range(size))
    assert metrics.columns == ["run", "epoch", "peer", "split", "metric", "value"]


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_required")
def test_amln_does_not_fall_well_below_vanilla_on_the_same_subset_and_seed(tmp_path):
    """Issue 9's guard: with its defaults, AMLN's mean peer on a Fashion-MNIST subset
    stays within 3 points of independent training on the same images, seed and
    budget (AMLN as printed, before the defaults changed, was 6-10 points below)."""
    results = {}
    for method in ("vanilla", "amln"):
        config = load_config(
            None, [*FASHION_QUICK, "run.seed=1", f"method.name={method}", f"run.out_dir={tmp_path / method}"]
        )
        results[method] = sum(train(config, log=lambda line: None).final_top1) / 2
    assert results["amln"] >= results["vanilla"] - 0.03, results


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_required")
def test_mcl_cohort_learns_fashion_mnist(tmp_path):
    """MCL with the official recipe's class-balanced batches (here 4 classes x 2 images)."""
    overrides = ["method.name=mcl", "data.sampler=class_balanced", "data.per_class=2", f"run.out_dir={tmp_path}"]
    result = train(load_config(None, [*FASHION_QUICK, *overrides]), log=lambda line: None)
    assert all(top1 > 0.60 for top1 in result.final_top1), result.final_top1
    train_terms = set(pl.read_parquet(tmp_path / "metrics.parquet").filter(pl.col("split") == "train")["metric"])
    assert {"ce", "vcl", "icl", "soft_vcl", "soft_icl"} <= train_terms


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_required")
def test_lmcl_cohort_learns_fashion_mnist(tmp_path):
    """L-MCL with class-balanced batches (4 classes x 2 images) and a meta step every
    50 batches (5 in the epoch): every peer's backbone learns, every term is logged."""
    overrides = ["method.name=lmcl", "data.sampler=class_balanced", "data.per_class=2", f"run.out_dir={tmp_path}"]
    result = train(load_config(None, [*FASHION_QUICK, *overrides]), log=lambda line: None)
    assert all(top1 > 0.60 for top1 in result.final_top1), result.final_top1
    train_terms = set(pl.read_parquet(tmp_path / "metrics.parquet").filter(pl.col("split") == "train")["metric"])
    assert {"ce", "ce_aux", "ce_agg", "kd", "vcl", "icl", "soft_vcl", "soft_icl", "meta_ce"} <= train_terms


def test_cli_local_backend_prints_a_line_per_epoch_per_peer(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(
        [
            "cohort.backend=local",
            "data.name=synthetic",
            "data.train_subset=null",
            "data.batch_size=16",
            "data.synthetic.train_size=64",
            "data.synthetic.test_size=32",
            "optim.epochs=2",
            "optim.milestones=[1]",
            "cohort.size=3",
            f"run.out_dir={out_dir}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for epoch in (1, 2):
        for peer in range(3):
            assert f"epoch {epoch}/2  peer {peer} (resnet20)" in out
        assert f"epoch {epoch}/2  ensemble test top-1" in out
    assert (out_dir / "metrics.parquet").is_file() and (out_dir / "config.yaml").is_file()
    assert (out_dir / "best_peer.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_learning_rate_follows_the_milestones(tmp_path):
    from cohort.peer import Peer

    config = synthetic_config(tmp_path, "optim.milestones=[1,2]", "optim.lr=0.1", "run.precise_bn_batches=0")
    peer = Peer(0, config)
    rates = []
    for epoch in range(3):
        rates.append(peer.optimizer.param_groups[0]["lr"])
        peer.finish_epoch(epoch)
    assert rates == pytest.approx([0.1, 0.01, 0.001])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_precise_bn_reestimates_statistics_without_touching_weights(tmp_path):
    from cohort.peer import Peer

    peer = Peer(0, synthetic_config(tmp_path, "run.precise_bn_batches=2"))
    bn = next(m for m in peer.model.modules() if m.__class__.__name__ == "BatchNorm2d")
    bn.running_mean.fill_(123.0)
    state = peer.model.state_dict()
    weights = {k: v.clone() for k, v in state.items() if "running" not in k and "num_batches" not in k}
    peer.finish_epoch(0)
    assert float(bn.running_mean.abs().max()) < 50  # recomputed from real batches
    assert all(v.equal(peer.model.state_dict()[k]) for k, v in weights.items())
