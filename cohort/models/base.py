"""The model contract every peer network follows.

A peer network returns its logits *and* the feature map of each block, because the
distillation methods align peers block by block (AMLN section 3.2). ``block_info``
describes those blocks statically, so a method can build its discriminators and
alignment containers for a teacher it never instantiates (in the Ray backend each
actor builds only its own network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from torch import Tensor, nn


@dataclass(frozen=True)
class BlockInfo:
    """One block's output: its channel count and its spatial stride w.r.t. the input."""

    channels: int
    stride: int

    def spatial_size(self, input_size: int) -> int:
        """Side length of this block's map for a square input of ``input_size``.

        Every downsampling in the zoo is a stride-2 convolution or pooling with
        "same" padding, which rounds up; repeated halving reproduces it exactly.
        """
        size = input_size
        for _ in range(int(math.log2(self.stride))):
            size = (size + 1) // 2
        return size


class Output(NamedTuple):
    """What a forward pass returns.

    logits: (B, classes) raw class scores.
    blocks: the block feature maps, shallow to deep, shaped as ``block_info`` says.
    pooled: the globally pooled final feature the classifier reads, (B, features).
    """

    logits: Tensor
    blocks: tuple[Tensor, ...]
    pooled: Tensor


class PeerModel(nn.Module):
    """Base class of the zoo: a classifier that exposes its block features.

    Subclasses set ``block_info`` in ``__init__`` (without a forward pass) and
    implement ``forward(x) -> Output``. ``arch`` is the registry name the model was
    created under; checkpoints record it so ``cohort.load_peer`` can rebuild it.
    """

    family: ClassVar[str] = "generic"

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.arch = ""
        self.block_info: tuple[BlockInfo, ...] = ()

    def forward(self, x: Tensor) -> Output:  # pragma: no cover - abstract
        raise NotImplementedError


def build_stages(
    block: type[nn.Module], block_info: tuple[BlockInfo, ...], blocks_per_stage: int, in_planes: int
) -> tuple[nn.ModuleList, int]:
    """The stages of a CIFAR-style net: per ``block_info`` entry, ``blocks_per_stage``
    residual blocks, the first one striding when the stage downsamples. Returns the
    stages and the last stage's width; convs get He (fan-out) init."""
    stages = []
    for info in block_info:
        layers = []
        for i in range(blocks_per_stage):
            layers.append(block(in_planes, info.channels, 2 if (i == 0 and info.stride > 1) else 1))
            in_planes = info.channels
        stages.append(nn.Sequential(*layers))
    return nn.ModuleList(stages), in_planes


def init_convs(model: nn.Module) -> None:
    """He (fan-out) init for every conv, the usual CIFAR ResNet/WRN choice."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
