"""The model zoo: one registry, ``create_model`` and ``list_models``.

Each entry knows its block layout without being built (``model_block_info``), which
is what config validation and the methods' extras need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..registry import Registry
from .base import BlockInfo, Output, PeerModel
from .resnet_cifar import CifarResNet
from .torchvision_resnet import TorchvisionResNet
from .wrn import WideResNet

__all__ = [
    "BlockInfo",
    "ModelSpec",
    "Output",
    "PeerModel",
    "create_model",
    "list_models",
    "model_block_info",
    "MODELS",
]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one zoo entry and what its blocks look like."""

    build: Callable[..., PeerModel]  # (num_classes=, in_channels=) -> model
    block_info: tuple[BlockInfo, ...]


MODELS: Registry[ModelSpec] = Registry("model")

for _depth in (20, 32, 44, 56, 110):
    MODELS.add(
        f"resnet{_depth}",
        ModelSpec(partial(CifarResNet, _depth), CifarResNet.describe_blocks()),
    )
for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    MODELS.add(
        f"wrn_{_depth}_{_widen}",
        ModelSpec(partial(WideResNet, _depth, _widen), WideResNet.describe_blocks(_widen)),
    )
for _depth in (18, 34):
    MODELS.add(
        f"resnet{_depth}",
        ModelSpec(partial(TorchvisionResNet, _depth), TorchvisionResNet.describe_blocks()),
    )


def list_models() -> list[str]:
    """Names accepted by ``create_model`` and by ``cohort.models`` in a config."""
    return MODELS.names()


def model_block_info(name: str) -> tuple[BlockInfo, ...]:
    """Block layout of a zoo model, without building it."""
    return MODELS.get(name).block_info


def create_model(name: str, num_classes: int, in_channels: int = 3) -> PeerModel:
    """Build a freshly initialised zoo model; raises UnknownNameError for a bad name."""
    model = MODELS.get(name).build(num_classes=num_classes, in_channels=in_channels)
    model.arch = name
    return model
