"""Per-sample augmentation of an in-memory uint8 batch in a few batched ops.

torchvision's v2 transforms act on one image at a time (applied to a batch, they give
every image the same crop), so augmenting a batch of 128 took 128 pads, crops and
flips: about 700 small ops and 11 ms, 5% of a vanilla ResNet-20 step on CPU
(docs/benchmarks.md; 3.5 ms now).
``CropFlip`` draws exactly the random numbers that ``v2.Compose([v2.RandomCrop(size,
padding), v2.RandomHorizontalFlip()])`` draws per image, in the same order, then pads
the batch once and gathers every crop (flipped where drawn) with one index: the same
images bit for bit (tested against ``per_image()``), so seeded runs are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2


class CropFlip:
    """Random crop of side ``size`` from the image zero-padded by ``padding`` on each
    side, then a horizontal flip with probability ``flip_p``, for each image of a
    (B, C, H, W) batch; draws from torch's global RNG, like torchvision's transforms."""

    def __init__(self, size: int, padding: int, flip_p: float = 0.5) -> None:
        self.size, self.padding, self.flip_p = size, padding, flip_p

    def per_image(self) -> v2.Transform:
        """The torchvision transform this reproduces, one image at a time."""
        return v2.Compose([v2.RandomCrop(self.size, padding=self.padding), v2.RandomHorizontalFlip(self.flip_p)])

    def draw(self, height: int, width: int) -> tuple[int, int, bool]:
        """One image's (top, left, flip), drawn as v2.RandomCrop then v2.RandomHorizontalFlip draw them."""
        spans = (height + 2 * self.padding - self.size + 1, width + 2 * self.padding - self.size + 1)
        if min(spans) < 1:
            raise ValueError(f"crop {self.size} is larger than the padded image ({height}x{width} + {self.padding})")
        top, left = (int(torch.randint(0, span, size=())) if span > 1 else 0 for span in spans)
        flip = not bool(torch.rand(1) >= self.flip_p)
        return top, left, flip

    def __call__(self, images: Tensor) -> Tensor:
        n, channels, height, width = images.shape
        drawn = torch.tensor([self.draw(height, width) for _ in range(n)], dtype=torch.long).view(n, 3)
        offsets = torch.arange(self.size)
        rows = drawn[:, :1] + offsets  # (B, size)
        cols = drawn[:, 1:2] + offsets
        cols = torch.where(drawn[:, 2:].bool(), cols.flip(1), cols)
        padded = F.pad(images, [self.padding] * 4)
        batch = torch.arange(n).view(n, 1, 1, 1)
        channel = torch.arange(channels).view(1, channels, 1, 1)
        return padded[batch, channel, rows.view(n, 1, self.size, 1), cols.view(n, 1, 1, self.size)]
