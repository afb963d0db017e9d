"""A run at a glance: ``curves.png`` (accuracy and every loss term per epoch, one panel
per quantity, one line per peer) and a markdown summary of the final epoch.

    python -m cohort.report RUN_DIR      # redraws RUN_DIR/curves.png, prints the summary

Every run writes curves.png when it finishes (``Cohort.finish``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import polars as pl

from .metrics import epoch_values, markdown_table, read_metrics

ACCURACY_PANELS = [("val", "top1", "validation top-1 (%)"), ("test", "top1", "test top-1 (%)")]


def panels(frame: pl.DataFrame) -> list[tuple[str, str, str]]:
    """(split, metric, title) of every panel the run has data for: accuracies first,
    then the training loss and each of its terms."""
    present = set(frame.select("split", "metric").unique().iter_rows())
    chosen = [p for p in ACCURACY_PANELS if (p[0], p[1]) in present]
    train_terms = sorted(m for s, m in present if s == "train" and m not in ("top1", "loss"))
    chosen += [("train", "loss", "training loss (sum of terms)")]
    chosen += [
        ("train", term, f"diagnostic {term}" if "/" in term else f"training term '{term}'") for term in train_terms
    ]
    return chosen


def run_title(run_dir: Path) -> str:
    """The run's folder name; a sweep trial's run is named after its trial folder."""
    return run_dir.name if run_dir.name != "run" else f"{run_dir.parent.name}/run"


def write_curves(run_dir: str | Path) -> Path:
    """Draw ``curves.png`` from the run's metrics.parquet; returns its path."""
    from matplotlib.figure import Figure  # no pyplot: a user's own backend stays as it is
    from matplotlib.ticker import MaxNLocator

    from .checkpoint import atomic_path

    run_dir = Path(run_dir)
    frame = read_metrics(run_dir / "metrics.parquet")
    chosen = panels(frame)
    columns = min(3, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    peers = sorted(frame["peer"].drop_nulls().unique().to_list())
    for axis, (split, metric, title) in zip(axes.flat, chosen):
        scale = 100 if metric == "top1" else 1
        for peer in peers:
            rows_ = frame.filter((pl.col("split") == split) & (pl.col("metric") == metric) & (pl.col("peer") == peer))
            rows_ = rows_.sort("epoch")
            axis.plot(rows_["epoch"], rows_["value"] * scale, marker="o", label=f"peer {peer}")
        if metric == "top1":
            ensemble = frame.filter(
                (pl.col("split") == split) & (pl.col("metric") == "ensemble_top1") & pl.col("peer").is_null()
            ).sort("epoch")
            axis.plot(ensemble["epoch"], ensemble["value"] * 100, "k--", label="ensemble")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(chosen) :]:
        axis.set_visible(False)
    figure.suptitle(run_title(run_dir))
    figure.tight_layout()
    path = run_dir / "curves.png"
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    return path


def summary(run_dir: str | Path) -> str:
    """Markdown: the final epoch per peer (train loss, each split's top-1) and the ensemble."""
    run_dir = Path(run_dir)
    frame = read_metrics(run_dir / "metrics.parquet")
    last = int(frame["epoch"].max())
    values = epoch_values(frame, last)
    splits = [s for s in ("val", "test") if (0, s, "top1") in values]
    peers = sorted(frame["peer"].drop_nulls().unique().to_list())
    rows = [
        {"peer": str(j), "train loss": f"{values[(j, 'train', 'loss')]:.4f}"}
        | {f"{s} top-1 %": 100 * values[(j, s, "top1")] for s in splits}
        for j in peers
    ]
    rows.append(
        {"peer": "ensemble", "train loss": ""}
        | {f"{s} top-1 %": 100 * values[(None, s, "ensemble_top1")] for s in splits}
    )
    table = markdown_table(pl.DataFrame(rows))
    return f"# {run_title(run_dir)}: epoch {last}\n\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cohort.report", description="Redraw curves.png and summarise a run."
    )
    parser.add_argument("run_dir", type=Path, help="a run folder (holds metrics.parquet)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.parquet").is_file():
        print(f"error: {args.run_dir}: no metrics.parquet (not a cohort run folder)", file=sys.stderr)
        return 2
    path = write_curves(args.run_dir)
    print(summary(args.run_dir))
    print(f"curves: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
