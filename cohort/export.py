"""Choosing the peer a user takes home, and writing it as one safetensors file.

Selection reads the final epoch's validation top-1 when the run has a validation
split, else test top-1 (and says which in the file's metadata); the file itself is
written by ``checkpoint.export_peer`` and loads with ``cohort.load_peer``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .checkpoint import export_peer
from .metrics import epoch_values

if TYPE_CHECKING:
    import polars as pl


def selection_split(frame: pl.DataFrame) -> str:
    """ "val" when the run logged a validation split, else "test"."""
    return "val" if (frame["split"] == "val").any() else "test"


def best_peer(frame: pl.DataFrame, size: int) -> tuple[int, float, str]:
    """(peer, its final-epoch top-1, the split it was chosen on); ties go to the
    lower index."""
    split = selection_split(frame)
    final = epoch_values(frame, int(frame["epoch"].max()))
    scores = {j: final[(j, split, "top1")] for j in range(size)}
    best = max(range(size), key=lambda j: (scores[j], -j))
    return best, scores[best], split


def export_best_peer(
    path: Path, frame: pl.DataFrame, states: list[dict[str, Any]], peer_metadata: list[dict[str, Any]]
) -> tuple[int, float, str]:
    """Write the best peer's weights to ``path`` with how to rebuild it and how it
    was chosen (also its final test top-1); returns what ``best_peer`` returns."""
    best, score, split = best_peer(frame, len(states))
    last = int(frame["epoch"].max())
    final = epoch_values(frame, last)
    metadata = peer_metadata[best] | {
        "peer": best,
        "epoch": last,
        "selected_on": f"final-epoch {split} top1",
        "top1": score,
        "test_top1": final[(best, "test", "top1")],
    }
    model_state: dict[str, Tensor] = states[best]["model"]
    export_peer(path, model_state, metadata)
    return best, score, split
