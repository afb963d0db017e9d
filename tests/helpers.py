"""Helpers the tests share: small synthetic configs, folder digests, peer kills."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

from cohort.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
FASHION_INSTALLED = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()


def synthetic_config(tmp_path: Path | None = None, *overrides: str) -> Config:
    """A tiny, fast cohort on seeded synthetic data (16x16, 1 channel, 10 classes)."""
    base = [
        "data.name=synthetic",
        "data.train_subset=null",
        "data.batch_size=16",
        "data.synthetic.train_size=64",
        "data.synthetic.test_size=32",
        "cohort.backend=local",
        "optim.epochs=1",
        "optim.milestones=[]",
    ]
    if tmp_path is not None:
        base.append(f"run.out_dir={tmp_path / 'run'}")
    return load_config(None, [*base, *overrides])


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path: equal digests mean
    nothing in the folder was touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def kill_peer(cohort, j: int) -> int:
    """SIGKILL peer ``j``'s actor process, as a crashed node would; returns its pid."""
    pid = cohort.backend.get([cohort.backend.call(j, "describe")])[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def quiet(line: str) -> None:
    """A ``log`` that drops every line."""
