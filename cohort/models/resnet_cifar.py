"""ResNets for 32x32 inputs (He et al. 2016, section 4.2): depth 6n+2, three stages
of n basic blocks with 16/32/64 channels.

Shortcuts that change shape use a 1x1 convolution + BN (option B); the parameter
counts then match the AMLN paper's Table 1 within 1.5% (tested).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlockInfo, Output, PeerModel, build_stages, init_convs

STAGE_CHANNELS = (16, 32, 64)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(PeerModel):
    family = "resnet_cifar"

    def __init__(self, depth: int, num_classes: int, in_channels: int) -> None:
        super().__init__(num_classes, in_channels)
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.block_info = self.describe_blocks()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages, width = build_stages(BasicBlock, self.block_info, n, in_planes=16)
        self.fc = nn.Linear(width, num_classes)
        init_convs(self)

    @staticmethod
    def describe_blocks() -> tuple[BlockInfo, ...]:
        return tuple(BlockInfo(c, 2**i) for i, c in enumerate(STAGE_CHANNELS))

    def forward(self, x: Tensor) -> Output:
        out = self.stem(x)
        blocks = []
        for stage in self.stages:
            out = stage(out)
            blocks.append(out)
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return Output(self.fc(pooled), tuple(blocks), pooled)
