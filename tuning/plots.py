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
