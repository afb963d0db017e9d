"""Checkpoints and the exported best peer: safetensors only, written atomically.

This is the only module that imports safetensors. Nothing here unpickles: tensors
live in .safetensors files and the structure around them (optimizer param groups,
scheduler counters) is JSON, stored in the safetensors header's metadata.

Layout of one checkpoint directory (``checkpoints/epoch_NNN/``)::

    peer_J.safetensors        model.* and extras.* weights (+ architecture metadata)
    peer_J.train.safetensors  optimizer, critic optimizer, scheduler and RNG state
    meta.json                 epoch, global step, config; written last

Each directory is assembled under a temporary name and renamed into place, so a
crash leaves either a complete checkpoint or none.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

CHECKPOINT_FORMAT = "cohort.checkpoint/1"
BEST_PEER_FORMAT = "cohort.best_peer/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or not ours."""


# ------------------------------------------------------------ tensor / JSON split


def split_tensors(tree: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """Replace every tensor in a nested structure by a reference, collecting the
    tensors under dotted names. Dicts with int keys (optimizer state) are tagged
    so that ``join_tensors`` can restore the ints."""
    if isinstance(tree, Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        if tree and all(isinstance(k, int) for k in tree):
            return {"__int_keys__": [[k, split_tensors(v, tensors, f"{prefix}.{k}")] for k, v in tree.items()]}
        return {str(k): split_tensors(v, tensors, f"{prefix}.{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(tree)]
    return tree


def join_tensors(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__int_keys__"}:
            return {int(k): join_tensors(v, tensors) for k, v in skeleton["__int_keys__"]}
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


# ------------------------------------------------------------------ file helpers


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without an
    error it is fsynced and renamed onto ``path``, otherwise removed. So a crash never
    leaves a half-written file under ``path``'s name."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a temp file in the same folder, fsync, rename."""
    with atomic_path(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)


def check_output_dir(path: Path, key: str) -> None:
    """A ``ConfigError`` naming ``key`` unless ``path`` is, or can become, a writable
    folder: no part of it may be a file, and its nearest existing folder must be
    writable. Nothing is created."""
    from .config import ConfigError

    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ConfigError(f"{key}: {path} {what}; give a folder path")
    if not os.access(existing if existing.exists() else Path.cwd(), os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write under {existing} (permission denied); give a writable folder")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and header metadata, or a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({reason}); it is truncated or corrupt"
        ) from None
    return tensors, metadata


# ------------------------------------------------------------ cohort checkpoints


def save_checkpoint(directory: Path, states: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write every peer's state and ``meta.json`` as one atomic directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    building = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        for index, state in enumerate(states):
            _save_peer_state(building, index, state, meta)
        write_text(building / "meta.json", json.dumps({"format": CHECKPOINT_FORMAT, **meta}, indent=2))
        if directory.exists():  # the same epoch again, after a restore: replace it
            stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}")
            os.replace(directory, stale)
            os.replace(building, directory)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(building, directory)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return directory


def _save_peer_state(directory: Path, index: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    weights = {f"model.{k}": v for k, v in state["model"].items()}
    weights |= {f"extras.{k}": v for k, v in state["extras"].items()}
    peer_meta = {"format": CHECKPOINT_FORMAT, "peer": index, **meta["peers"][index]}
    write_safetensors(directory / f"peer_{index}.safetensors", weights, {k: str(v) for k, v in peer_meta.items()})
    training: dict[str, Tensor] = {}
    skeleton = split_tensors(
        {k: state[k] for k in ("optimizer", "critic_optimizer", "scheduler", "rng")}, training, "train"
    )
    write_safetensors(directory / f"peer_{index}.train.safetensors", training, {"skeleton": json.dumps(skeleton)})


def load_checkpoint(directory: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every peer's state (as ``Peer.load_state`` takes it) and the meta record."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: not a complete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{meta_path}: not valid JSON ({error})") from None
    states = []
    for index in range(int(meta["peer_count"])):
        weights, _ = read_safetensors(directory / f"peer_{index}.safetensors")
        training, train_meta = read_safetensors(directory / f"peer_{index}.train.safetensors")
        state = join_tensors(json.loads(train_meta["skeleton"]), training)
        state["model"] = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
        state["extras"] = {k[len("extras.") :]: v for k, v in weights.items() if k.startswith("extras.")}
        states.append(state)
    return states, meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/epoch_NNN`` of a run, or None."""
    folder = Path(run_dir) / "checkpoints"
    complete = sorted(p for p in folder.glob("epoch_*") if (p / "meta.json").is_file())
    return complete[-1] if complete else None


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}"


# --------------------------------------------------------------------- best peer


def export_peer(path: Path, model_state: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
    """Write a standalone model file whose header says how to rebuild it."""
    header = {"format": "pt", "cohort_format": BEST_PEER_FORMAT}
    header |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    write_safetensors(Path(path), model_state, header)
    return Path(path)


def load_peer(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a trained peer from a ``best_peer.safetensors`` (or a checkpoint's
    ``peer_J.safetensors``) alone, in eval mode.

    The result is a zoo model: ``model(x).logits`` are class scores for inputs
    normalised with the ``mean``/``std`` recorded in ``read_peer_metadata(path)``.
    """
    from .models import create_model

    tensors, metadata = read_safetensors(Path(path))
    info = read_peer_metadata(path, metadata)
    state = tensors
    if metadata.get("format") == CHECKPOINT_FORMAT:
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model = create_model(info["architecture"], int(info["num_classes"]), int(info["in_channels"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit {info['architecture']} ({first})") from None
    return model.to(device).eval()


def read_peer_metadata(path: str | Path, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """The header metadata of an exported peer, JSON values decoded."""
    if metadata is None:
        _, metadata = read_safetensors(Path(path))
    missing = [k for k in ("architecture", "num_classes", "in_channels") if k not in metadata]
    if missing:
        raise CheckpointError(f"{path}: no cohort metadata ({', '.join(missing)} missing); not written by cohort")
    decoded: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    decoded["architecture"] = metadata["architecture"]
    return decoded
