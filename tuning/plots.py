"""sweep.png: the sweep's metric against each swept numeric key, one line per cohort
size (or per the first other non-numeric swept key), error bars over seeds and over
every key not on the axes."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .results import SEED_KEY
from .schema import SweepConfig


def is_numeric(frame: pl.DataFrame, key: str) -> bool:
    return frame.schema[key].is_numeric()


def axes_keys(frame: pl.DataFrame, sweep: SweepConfig) -> tuple[list[str], str | None]:
    """(keys to plot on x, the key that splits lines)."""
    keys = [k for k in sweep.space if k != SEED_KEY and k in frame.columns]
    line = "cohort.size" if "cohort.size" in keys else next((k for k in keys if not is_numeric(frame, k)), None)
    x_keys = [k for k in keys if k != line and is_numeric(frame, k)]
    return x_keys, line


def write_sweep_plot(frame: pl.DataFrame, sweep: SweepConfig, path: Path) -> Path | None:
    from matplotlib.figure import Figure  # no pyplot: a user's own backend stays as it is

    from cohort.checkpoint import atomic_path

    finished = (
        frame.filter((pl.col("status") != "error") & pl.col(sweep.metric).is_not_null())
        if sweep.metric in frame.columns
        else frame.clear()
    )
    x_keys, line = axes_keys(frame, sweep)
    x_keys = x_keys or [line or "trial"]
    figure = Figure(figsize=(5 * len(x_keys), 3.8))
    axes = figure.subplots(1, len(x_keys), squeeze=False)
    for axis, key in zip(axes.flat, x_keys):
        groups = [key] + ([line] if line and line != key else [])
        if not finished.is_empty():
            stats = (
                finished.group_by(groups)
                .agg(
                    (pl.col(sweep.metric).mean() * 100).alias("mean"),
                    (pl.col(sweep.metric).std().fill_null(0.0) * 100).alias("std"),
                    pl.len().alias("n"),
                )
                .sort(groups)
            )
            lines = stats[line].unique(maintain_order=True).to_list() if len(groups) == 2 else [None]
            for value in lines:
                part = stats if value is None else stats.filter(pl.col(line) == value)
                label = None if value is None else f"{line} = {value}"
                axis.errorbar(
                    part[key].to_list(),
                    part["mean"].to_list(),
                    yerr=part["std"].to_list(),
                    marker="o",
                    capsize=3,
                    label=label,
                )
            if len(lines) > 1 or lines[0] is not None:
                axis.legend(fontsize=8)
            if (
                key != "trial"
                and is_numeric(finished, key)
                and finished[key].min() > 0
                and finished[key].max() / finished[key].min() >= 10
            ):
                axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(f"{sweep.metric} (%)")
        axis.grid(alpha=0.3)
    figure.suptitle(f"sweep {sweep.name}: {sweep.metric}, mean ± std over seeds")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    return path


CURVE_PANELS = [
    ("val", "top1", "validation top-1 (%)"),
    ("test", "top1", "test top-1 (%)"),
    ("train", "ce", "training cross-entropy"),
]


def configuration_label(row: dict, sweep: SweepConfig) -> str:
    """A short name for one configuration: its swept values other than the seed; a
    swept section (JSON text such as a whole ``method``) reads "amln (beta=0.1, ...)"."""
    parts = [f"{key}={compact(row[key])}" for key in sweep.space if key != SEED_KEY and key in row]
    return ", ".join(parts) or sweep.name


def compact(value: object) -> str:
    """``{"name": "amln", "beta": 0.1}`` (as JSON text) -> ``amln (beta=0.1)``; others as they are."""
    import json

    try:
        section = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        section = None
    if not isinstance(section, dict):
        return str(value)
    name = section.pop("name", "")
    rest = ", ".join(f"{k}={v}" for k, v in section.items())
    return f"{name} ({rest})" if name and rest else name or rest


def curve_stats(metrics: list[tuple[str, pl.DataFrame]], split: str, metric: str) -> pl.DataFrame:
    """Per (configuration, epoch): the mean over peers within a trial, then mean and std
    over that configuration's trials (its seeds), and how many trials there were."""
    per_trial = [
        frame.filter((pl.col("split") == split) & (pl.col("metric") == metric) & pl.col("peer").is_not_null())
        .group_by("epoch")
        .agg(pl.col("value").mean())
        .with_columns(pl.lit(label).alias("configuration"))
        for label, frame in metrics
    ]
    per_trial = [f for f in per_trial if not f.is_empty()]
    if not per_trial:
        return pl.DataFrame()
    return (
        pl.concat(per_trial)
        .group_by("configuration", "epoch", maintain_order=True)
        .agg(
            pl.col("value").mean().alias("mean"),
            pl.col("value").std().fill_null(0.0).alias("std"),
            pl.len().alias("trials"),
        )
        .sort("configuration", "epoch")
    )


def write_curves_plot(metrics: list[tuple[str, pl.DataFrame]], sweep: SweepConfig, path: Path) -> Path | None:
    """curves.png: validation and test top-1 and training CE per epoch, one line per
    configuration (mean over peers, then mean ± std over seeds as a band). ``metrics``
    pairs each finished trial's configuration label with its metrics frame."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from cohort.checkpoint import atomic_path

    if not metrics:
        return None
    figure = Figure(figsize=(15, 3.8))
    axes = figure.subplots(1, len(CURVE_PANELS), squeeze=False)
    for axis, (split, metric, title) in zip(axes.flat, CURVE_PANELS):
        stats = curve_stats(metrics, split, metric)
        scale = 100 if metric == "top1" else 1
        for label in [] if stats.is_empty() else stats["configuration"].unique(maintain_order=True).to_list():
            part = stats.filter(pl.col("configuration") == label)
            epochs, mean, std = part["epoch"].to_list(), part["mean"] * scale, part["std"] * scale
            axis.plot(epochs, mean.to_list(), marker="o", markersize=3, label=label)
            axis.fill_between(epochs, (mean - std).to_list(), (mean + std).to_list(), alpha=0.2)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if metric == "ce":
            axis.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"sweep {sweep.name}: per-epoch curves, mean ± std over seeds")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    return path
