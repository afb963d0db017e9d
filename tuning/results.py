"""A finished sweep's outputs: results.parquet/.md (one row per trial), summary.md
(mean ± std over seeds per configuration), sweep.png, curves.png and curves.md
(per-epoch curves per configuration, drawn and as tables) and the best peer.

Everything is read from what trials reported to Tune and from their Tune
checkpoints, so it works when trials ran on other nodes. Trials are ranked on the
sweep's validation metric only; test accuracy is reported beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from cohort.checkpoint import atomic_path, latest_checkpoint, load_checkpoint, write_text
from cohort.export import export_best_peer
from cohort.metrics import markdown_table, read_metrics

from .schema import SweepConfig

SEED_KEY = "run.seed"


@dataclass
class SweepSummary:
    table: str  # results.md's table, for printing
    best_peer_path: Path | None
    failed: int  # trials that ended in an error


def trial_rows(grid, sweep: SweepConfig) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        row: dict[str, Any] = {"trial": str(metrics.get("trial_id", Path(result.path).name))}
        row |= {key: scalar(config.get(key)) for key in sweep.space}
        row["status"] = "error" if result.error else "done"
        row["epochs"] = int(metrics.get("epoch", 0) or 0)
        row["epochs_planned"] = int(metrics.get("epochs_planned", 0) or 0)
        for name, value in sorted(metrics.items()):
            if name.startswith(("val_", "test_")):
                row[name] = float(value)
        rows.append(row)
    return rows


def scalar(value: Any) -> Any:
    """A table cell: lists and mappings (e.g. a swept cohort.models list) as text."""
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else value


def results_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    frame = pl.DataFrame(rows, infer_schema_length=None)
    first = ["trial", *[c for c in frame.columns if c not in ("trial",) and not c.startswith(("val_", "test_"))]]
    scores = sorted(c for c in frame.columns if c.startswith(("val_", "test_")))
    return frame.select(first + scores)


def mark_stopped_early(frame: pl.DataFrame) -> pl.DataFrame:
    """ASHA's stops show as trials that ended without error before their last epoch."""
    return frame.with_columns(
        pl.when((pl.col("status") != "error") & (pl.col("epochs") < pl.col("epochs_planned")))
        .then(pl.lit("stopped early"))
        .otherwise(pl.col("status"))
        .alias("status")
    )


def spread(mean: pl.Expr, std: pl.Expr, trials: pl.Expr, digits: int = 2) -> pl.Expr:
    """The text "mean ± std", or the mean alone where there is one trial (no spread)."""
    return (
        pl.when(trials > 1)
        .then(pl.format("{} ± {}", mean.round(digits), std.round(digits)))
        .otherwise(mean.round(digits).cast(pl.String))
    )


def seed_summary(frame: pl.DataFrame, sweep: SweepConfig) -> pl.DataFrame:
    """Mean ± std over ``run.seed`` (or over repeated samples) per configuration; a
    configuration with one finished trial shows its value alone."""
    keys = [k for k in sweep.space if k != SEED_KEY and k in frame.columns]
    scores = [c for c in (sweep.metric, "test_top1_mean", "test_top1_best", "test_ensemble_top1") if c in frame.columns]
    finished = frame.filter(pl.col("status") != "error")
    if finished.is_empty():
        return pl.DataFrame()
    grouped = finished.group_by(keys or pl.lit(0).alias("all"), maintain_order=True).agg(
        pl.len().alias("trials"),
        *[spread(100 * pl.col(c).mean(), 100 * pl.col(c).std(), pl.len()).alias(c) for c in scores],
    )
    return grouped.drop("all") if not keys else grouped


def export_sweep_best(grid, sweep: SweepConfig, sweep_dir: Path) -> Path | None:
    """The best trial's best peer, with that trial's config in the file's metadata."""
    try:
        best = grid.get_best_result(metric=sweep.metric, mode="max", filter_nan_and_inf=True)
    except RuntimeError:
        return None
    if best.checkpoint is None:
        return None
    with best.checkpoint.as_directory() as folder:
        folder = Path(folder)
        states, meta = load_checkpoint(latest_checkpoint(folder))
        frame = read_metrics(folder / "metrics.parquet")
        frame = frame.filter(pl.col("epoch") <= meta["epoch"])
        peers = [
            peer | {"trial": Path(best.path).name, "trial_config": json.dumps(meta["config"])} for peer in meta["peers"]
        ]
        path = sweep_dir / "best_peer.safetensors"
        export_best_peer(path, frame, states, peers)
    return path


def trial_metrics(grid, sweep: SweepConfig) -> list[tuple[str, pl.DataFrame]]:
    """(configuration label, metrics frame) of every trial that left a checkpoint,
    read through Tune's checkpoints so it works when trials ran on other nodes."""
    from .plots import configuration_label

    found = []
    for result in grid:
        if result.checkpoint is None:
            continue
        with result.checkpoint.as_directory() as folder:
            path = Path(folder) / "metrics.parquet"
            if path.is_file():
                row = {key: scalar((result.config or {}).get(key)) for key in sweep.space}
                found.append((configuration_label(row, sweep), read_metrics(path)))
    return found


def curves_markdown(metrics: list[tuple[str, pl.DataFrame]], sweep: SweepConfig) -> str:
    """curves.md: curves.png's numbers as tables, one per panel (validation top-1, test
    top-1, training CE), a row per configuration and a column per epoch, each cell the
    mean ± std over the configuration's trials that reached that epoch (the mean alone
    for a single trial; "—" where none did)."""
    from .plots import CURVE_PANELS, curve_stats

    parts = [f"# Sweep {sweep.name}: per-epoch curves, mean ± std over seeds (mean over peers in each trial)"]
    for split, metric, title in CURVE_PANELS:
        stats = curve_stats(metrics, split, metric)
        if stats.is_empty():
            continue
        scale, digits = (100, 2) if metric == "top1" else (1, 3)
        cells = stats.with_columns(
            spread(pl.col("mean") * scale, pl.col("std") * scale, pl.col("trials"), digits).alias("cell")
        )
        wide = cells.pivot(on="epoch", index="configuration", values="cell", sort_columns=True, maintain_order=True)
        wide = wide.fill_null("—")  # an epoch a configuration's trials never reached (stopped early, failed)
        parts.append(f"## {title}, by epoch\n\n{markdown_table(wide)}")
    return "\n\n".join(parts) + "\n"


def write_results(grid, sweep: SweepConfig, sweep_dir: Path) -> SweepSummary:
    from .plots import write_curves_plot, write_sweep_plot

    rows = trial_rows(grid, sweep)
    frame = results_frame(rows)
    frame = mark_stopped_early(frame)
    with atomic_path(sweep_dir / "results.parquet") as temporary:
        frame.write_parquet(temporary)
    table = markdown_table(frame, percent=[c for c in frame.columns if c.startswith(("val_", "test_"))])
    write_text(sweep_dir / "results.md", f"# Sweep {sweep.name}: one row per trial\n\n{table}\n")
    summary = seed_summary(frame, sweep)
    write_text(
        sweep_dir / "summary.md",
        f"# Sweep {sweep.name}: mean ± std over seeds (top-1, %), ranked on {sweep.metric}\n\n"
        + (markdown_table(summary) if not summary.is_empty() else "no finished trials")
        + "\n",
    )
    write_sweep_plot(frame, sweep, sweep_dir / "sweep.png")
    metrics = trial_metrics(grid, sweep)
    write_curves_plot(metrics, sweep, sweep_dir / "curves.png")
    if metrics:
        write_text(sweep_dir / "curves.md", curves_markdown(metrics, sweep))
    best = export_sweep_best(grid, sweep, sweep_dir)
    return SweepSummary(table=table, best_peer_path=best, failed=int((frame["status"] == "error").sum()))
