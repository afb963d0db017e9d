"""Learnable extras of the methods: block discriminators and AMLN's alignment
containers; MCL's projection head; L-MCL's auxiliary branches, stage aggregator and
layer-matching weight network. They are owned, optimised and checkpointed by the
peer that builds them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import BlockInfo
from .base import teacher_key


class FeatureDiscriminator(nn.Module):
    """D_j^b (AMLN section 3.2): a 1x1 conv sigma that reduces channels, then three
    conv layers with ReLU, the last giving ``outputs`` scores after global pooling.

    One sigma per source width, so a peer and a teacher of different widths share
    the rest of D. Open choices, made here: sigma reduces to half the narrower width
    (at least 8 channels); the first two body convs are 3x3 with stride 2; no
    normalisation layers (D judges each sample alone; spectral norm did not help).
    """

    def __init__(self, widths: set[int], outputs: int) -> None:
        super().__init__()
        reduced = max(8, min(widths) // 2)
        self.reduce = nn.ModuleDict({str(w): nn.Conv2d(w, reduced, 1) for w in sorted(widths)})
        self.body = nn.Sequential(
            nn.Conv2d(reduced, reduced, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(reduced, reduced, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(reduced, outputs, 1),
        )

    def forward(self, feature: Tensor) -> Tensor:
        scores = self.body(self.reduce[str(feature.shape[1])](feature))
        return scores.mean(dim=(2, 3))

    def score_pair(self, own: Tensor, theirs: Tensor) -> tuple[Tensor, Tensor]:
        """Scores of both sides for D's own update; one batched pass when their
        shapes agree.

        The batch is channels-last: the weight gradients of these narrow convs run
        several times faster that way on CPU. Both sides are copied once, straight
        into that layout (with ``run.memory_format=channels_last``, the default, they
        already are). The pass runs sigma folded into the first body conv
        (``folded_scores``): the same function of the same parameters, cheaper when no
        gradient flows back into the features. The peer's side (``forward`` on its own
        features) stays in the model's layout and runs the two convs.
        """
        if own.shape[1:] != theirs.shape[1:]:
            return self(own), self(theirs)
        both = torch.empty(
            (len(own) + len(theirs), *own.shape[1:]),
            dtype=torch.promote_types(own.dtype, theirs.dtype),
            device=own.device,
            memory_format=torch.channels_last,
        )
        both[: len(own)] = own
        both[len(own) :] = theirs
        scores = self.folded_scores(both) if not both.requires_grad else self(both)
        return scores[: len(own)], scores[len(own) :]

    def folded_scores(self, feature: Tensor) -> Tensor:
        """``forward`` with sigma (1x1 conv) and the first body conv composed into one
        conv: both are linear with nothing between them, so it is the same function (up to
        float rounding; in bf16 the composed weight is rounded once). The composed weight
        is W1 o W_sigma; sigma's bias, which the first conv's zero padding does not
        see at the border, becomes a bias map computed on one constant image. Gradients
        reach W_sigma, b_sigma, W1 and b1 through the composition, as in ``forward``.

        On CPU this skips sigma's full-resolution output and the first conv's input
        gradient, which D's own update never needs: 3-4 ms less per ResNet-20 AMLN step,
        nearly all of it on block 1 (16x28x28) (docs/benchmarks.md)."""
        reduce, first = self.reduce[str(feature.shape[1])], self.body[0]
        with torch.autocast(feature.device.type, enabled=False):  # compose the weights in fp32
            sigma = reduce.weight.float().flatten(1)  # (reduced, in)
            weight = torch.einsum("omhw,mc->ochw", first.weight.float(), sigma)
            constant = reduce.bias.float().view(1, -1, 1, 1).expand(1, -1, *feature.shape[-2:])
            bias = F.conv2d(constant, first.weight.float(), first.bias.float(), first.stride, first.padding)
        out = F.conv2d(feature, weight.to(feature.dtype), None, first.stride, first.padding)
        out = out + bias.to(out.dtype)
        return self.body[1:](out).mean(dim=(2, 3))


class AlignmentContainer(nn.Module):
    """C_j^b (AMLN eq. 2): depthwise conv then pointwise conv mapping block b of this
    peer onto the shape of the teacher's final block.

    Between the two convs sits a BatchNorm, as in the usual depthwise-separable block
    (MobileNet); the map stays linear. Without it the container is a plain linear
    regressor that SGD at lr 0.1 with momentum 0.9 drove to inf within 200 steps.

    The depthwise conv strides by the ratio of the two blocks' strides with an odd
    kernel at least that wide, so every input pixel contributes; the output side is
    ceil(H / ratio), which equals the teacher's final size for every zoo pair (tested).

    The container computes in fp32 even under bf16 autocast: on CPU a strided
    depthwise conv's backward in bf16 runs 10-30x slower than in fp32 (60 against 4 ms
    for block 1 at batch 128, docs/benchmarks.md), and its maps are small.
    """

    def __init__(self, own: BlockInfo, target: BlockInfo) -> None:
        super().__init__()
        ratio = max(1, target.stride // own.stride)
        kernel = max(3, ratio + 1 if ratio % 2 == 0 else ratio)
        self.depthwise = nn.Conv2d(
            own.channels, own.channels, kernel, ratio, kernel // 2, groups=own.channels, bias=False
        )
        self.norm = nn.BatchNorm2d(own.channels)
        self.pointwise = nn.Conv2d(own.channels, target.channels, 1)

    def forward(self, feature: Tensor, target_size: tuple[int, int] | None = None) -> Tensor:
        with torch.autocast(feature.device.type, enabled=False):
            out = self.pointwise(self.norm(self.depthwise(feature.float())))
        if target_size is not None and tuple(out.shape[-2:]) != tuple(target_size):
            out = F.adaptive_avg_pool2d(out, target_size)  # only for layouts outside the zoo
        return out


def gan_adam(parameters: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """The discriminators' optimizer: Adam with betas (0.5, 0.999), the usual GAN setting
    (AMLN and AFD leave it open; ``method.disc_lr`` sets the rate)."""
    return torch.optim.Adam(parameters, lr=lr, betas=(0.5, 0.999))


class ProjectionHead(nn.Module):
    """MCL's ``Embed`` (official ``losses/cifar_sup_mcl_loss.py`` lines 89-103): Linear(C,
    dim) -> ReLU -> Linear(dim, dim), L2-normalised; maps a pooled feature to the
    embedding the contrastive terms compare."""

    def __init__(self, in_features: int, dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, pooled: Tensor) -> Tensor:
        return F.normalize(self.net(pooled), dim=1)


class AuxiliaryBranch(nn.Module):
    """L-MCL's auxiliary classifier on an earlier block: fresh copies of the network's
    later stages, global average pooling and a classifier of its own (official
    ``models/lmcl_resnet_cifar.py`` ``Auxiliary_Classifier`` lines 196-260; for WRNs
    ``models/lmcl_wrn_cifar.py`` lines 102-142 adds a BN + ReLU after the stages, as
    the backbone has). Returns the pooled feature and the logits."""

    def __init__(self, stages: nn.Module, tail: nn.Module, width: int, num_classes: int) -> None:
        super().__init__()
        self.stages, self.tail = stages, tail
        self.fc = nn.Linear(width, num_classes)
        nn.init.zeros_(self.fc.bias)  # official: Linear bias zeroed (line 227)

    def forward(self, block: Tensor) -> tuple[Tensor, Tensor]:
        pooled = F.adaptive_avg_pool2d(self.tail(self.stages(block)), 1).flatten(1)
        return pooled, self.fc(pooled)


class StageAggregator(nn.Module):
    """L-MCL's aggregator for one network (official ``models/aggregator.py`` lines 7-29):
    Linear(S*C, C) -> ReLU -> Linear(C, S) on the concatenated stage features, softmax
    over the S stages, and the per-sample weighted sum of the stage logits."""

    def __init__(self, width: int, stages: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(stages * width, width), nn.ReLU(), nn.Linear(width, stages))

    def forward(self, features: Sequence[Tensor], logits: Sequence[Tensor]) -> Tensor:
        weights = self.net(torch.cat(list(features), dim=1)).softmax(dim=1)
        return sum(stage * weights[:, k : k + 1] for k, stage in enumerate(logits))


class PairWeightNetwork(nn.Module):
    """L-MCL's layer-matching weight network as one learner holds it (official
    ``models/meta_network.py`` ``LossWeightNetwork`` lines 5-43): one Linear(C, dim)
    per (network, stage), here for the learner's own stages (``own``) and for each
    possible teacher's (``t{j}``, applied to the raw pooled stage features that teacher
    publishes). The weight of layer pair (k, z) is sigmoid(cos(P^k f^k, P_t^z f_t^z)),
    one value per sample."""

    def __init__(self, own: Sequence[int], teachers: Mapping[int, Sequence[int]], dim: int = 128) -> None:
        super().__init__()
        widths = {"own": own} | {teacher_key(j): layer_widths for j, layer_widths in teachers.items()}
        self.proj = nn.ModuleDict(
            {key: nn.ModuleList(nn.Linear(c, dim) for c in layer_widths) for key, layer_widths in widths.items()}
        )

    def forward(self, own: Sequence[Tensor], teacher: int, theirs: Sequence[Tensor]) -> list[list[Tensor]]:
        """w[k][z] (B,) for the learner's stage k against teacher ``teacher``'s stage z."""
        mine = [F.normalize(p(f), dim=1) for p, f in zip(self.proj["own"], own, strict=True)]
        other = [F.normalize(p(f), dim=1) for p, f in zip(self.proj[teacher_key(teacher)], theirs, strict=True)]
        return [[torch.sigmoid((a * b).sum(dim=1)) for b in other] for a in mine]
