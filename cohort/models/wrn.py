"""Wide ResNets WRN-d-k for 32x32 inputs (Zagoruyko & Komodakis 2016): pre-activation
basic blocks, (d-4)/6 per group, widths 16k/32k/64k, no dropout.

Blocks are the outputs of the three groups; the last one is taken after the final
BN + ReLU, i.e. the map the classifier pools. (A pre-activation net's raw last sum is
unnormalised and grows during training, which made AMLN's L2 target diverge.)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import BlockInfo, Output, PeerModel, build_stages, init_convs


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return out + skip


class WideResNet(PeerModel):
    family = "wrn"

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__(num_classes, in_channels)
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.block_info = self.describe_blocks(widen)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.groups, width = build_stages(WideBlock, self.block_info, n, in_planes=16)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
        init_convs(self)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def describe_blocks(widen: int) -> tuple[BlockInfo, ...]:
        return tuple(BlockInfo(c * widen, 2**i) for i, c in enumerate((16, 32, 64)))

    def forward(self, x: Tensor) -> Output:
        out = self.stem(x)
        blocks = []
        for group in self.groups:
            out = group(out)
            blocks.append(out)
        blocks[-1] = out = F.relu(self.bn(out))
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return Output(self.fc(pooled), tuple(blocks), pooled)
