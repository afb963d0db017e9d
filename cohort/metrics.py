"""Run metrics in long format: one row per (run, epoch, peer, split, metric, value).

The only module importing polars. Long format keeps the schema fixed whatever the
method logs (a new loss term is just new rows) and makes per-peer and per-term
tables one ``pivot`` away. Cohort-wide values (the ensemble) have a null peer.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

SCHEMA = {
    "run": pl.String,
    "epoch": pl.Int32,
    "peer": pl.Int32,
    "split": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
}


class MetricsLog:
    """Accumulates rows during a run and writes ``metrics.parquet`` atomically."""

    def __init__(self, run: str, rows: list[dict] | None = None) -> None:
        self.run = run
        self.rows: list[dict] = rows or []

    def add(self, epoch: int, peer: int | None, split: str, values: dict[str, float]) -> None:
        for metric, value in values.items():
            self.rows.append(
                {"run": self.run, "epoch": epoch, "peer": peer, "split": split, "metric": metric, "value": float(value)}
            )

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema=SCHEMA)

    def write(self, path: Path) -> None:
        from .checkpoint import atomic_path

        with atomic_path(path) as temporary:
            self.frame().write_parquet(temporary)

    def keep_until(self, epoch: int) -> None:
        """Drop rows after ``epoch`` (when a run rewinds to a checkpoint)."""
        self.rows = [row for row in self.rows if row["epoch"] <= epoch]

    @classmethod
    def read(cls, path: Path, run: str) -> MetricsLog:
        return cls(run, read_metrics(path).to_dicts()) if Path(path).is_file() else cls(run)


def read_metrics(path: Path) -> pl.DataFrame:
    """Load a run's ``metrics.parquet``."""
    return pl.read_parquet(path)


def epoch_values(frame: pl.DataFrame, epoch: int) -> dict[tuple[int | None, str, str], float]:
    """Every value logged at ``epoch``, keyed by (peer, split, metric)."""
    rows = frame.filter(pl.col("epoch") == epoch).to_dicts()
    return {(row["peer"], row["split"], row["metric"]): row["value"] for row in rows}


def final_value(frame: pl.DataFrame, peer: int | None, split: str, metric: str) -> float:
    """The value of ``metric`` at the last epoch for one peer (None: cohort-wide)."""
    rows = frame.filter(
        (pl.col("peer").is_null() if peer is None else pl.col("peer") == peer)
        & (pl.col("split") == split)
        & (pl.col("metric") == metric)
    )
    if rows.is_empty():
        raise KeyError(f"no '{metric}' on split '{split}' for peer {peer}")
    return float(rows.sort("epoch")["value"][-1])


def epoch_table(frame: pl.DataFrame, split: str, metric: str) -> pl.DataFrame:
    """Epochs down, peers across: one metric on one split."""
    rows = frame.filter((pl.col("split") == split) & (pl.col("metric") == metric) & pl.col("peer").is_not_null())
    return rows.pivot(on="peer", index="epoch", values="value", sort_columns=True).sort("epoch")


def markdown_table(frame: pl.DataFrame, percent: list[str] = (), digits: int = 2) -> str:
    """A GitHub markdown table of ``frame``; ``percent`` columns (fractions) shown as %."""
    shown = frame.with_columns([(pl.col(c) * 100).round(digits) for c in percent if c in frame.columns])
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=10_000,
        fmt_str_lengths=200,
        float_precision=digits,
    ):
        return str(shown)
