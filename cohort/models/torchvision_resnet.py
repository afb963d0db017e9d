"""torchvision's ResNet-18/34 (ImageNet-size inputs) behind the zoo contract.

The stem takes ``in_channels`` (so 1-channel inputs work); ``stages`` picks which of
layer1..layer4 are exposed as blocks (default all four). Weights are random:
nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet

from .base import BlockInfo, Output, PeerModel

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (4, 8, 16, 32)
BUILDERS = {18: resnet.resnet18, 34: resnet.resnet34}


class TorchvisionResNet(PeerModel):
    family = "torchvision_resnet"

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int,
        stages: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        super().__init__(num_classes, in_channels)
        self.stages = self._check_stages(stages)
        self.block_info = self.describe_blocks(self.stages)
        net = BUILDERS[depth](weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.net = net

    @staticmethod
    def _check_stages(stages: Sequence[int]) -> tuple[int, ...]:
        chosen = tuple(stages)
        if not chosen or list(chosen) != sorted(set(chosen)) or not set(chosen) <= {1, 2, 3, 4}:
            raise ValueError(f"stages must be increasing values from 1..4, got {stages}")
        return chosen

    @staticmethod
    def describe_blocks(stages: Sequence[int] = (1, 2, 3, 4)) -> tuple[BlockInfo, ...]:
        return tuple(BlockInfo(STAGE_CHANNELS[s - 1], STAGE_STRIDES[s - 1]) for s in stages)

    def forward(self, x: Tensor) -> Output:
        n = self.net
        out = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        blocks = []
        for index, layer in enumerate((n.layer1, n.layer2, n.layer3, n.layer4), start=1):
            out = layer(out)
            if index in self.stages:
                blocks.append(out)
        pooled = torch.flatten(n.avgpool(out), 1)
        return Output(n.fc(pooled), tuple(blocks), pooled)
