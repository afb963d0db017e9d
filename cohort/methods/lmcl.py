"""L-MCL: layer-wise mutual contrastive learning with meta-learned layer matching
(Yang et al., TPAMI 2023; official code github.com/winycg/L-MCL, CIFAR script
``main_layer_mcl_cifar_meta.py``), for any pairing.

Each peer owns, as extras (``LMCLExtras``): two auxiliary branches (fresh copies of
stages 2-3 fed from block 1 and of stage 3 fed from block 2, each pooled with its own
classifier), which with the backbone's final stage give S = 3 stage features f^k and
logits l^k; the aggregator (softmax over stages of an MLP on the concatenated f^k,
the per-sample weighted sum of the l^k); one projection head per stage (embeddings
e^k); and the layer-matching weight network. It publishes the three embeddings
(3 x B x 128), its aggregate logits (B x classes) and its raw pooled stage features
(3 x B x C), about 0.35 MB per step for ResNet-32 at batch 128 in float32.

Loss of peer i with teachers j (lines 192-212 of the script):

    ce + ce_aux + ce_agg                          CE of the final, auxiliary and aggregate logits
    kd = sum over a in {i} + teachers of T^2 KL(sg agg_a || l_i^final)   (DistillKL, lines 203-205)
    2 sum_j sum_{k,z} [alpha vcl + gamma soft_vcl + beta icl + lambda soft_icl](e_i^k, e_j^z; w_kz)

with w_kz = sigmoid(cos(P_i^k f_i^k, P_j^z f_j^z)) computed without gradient. The
factor 2 (``ORDERED_PAIRS``): the official ``Sup_MCL_Loss_Meta`` loops over ordered
network pairs, so it counts each layer pair twice with the same weight; with it, under
``all_pairs`` each peer's gradient equals the official joint loss's gradient for its
parameters (derivation in tests/test_mcl_loss.py ``joint_mcl_loss``; tested through this
method in float64 in tests/test_lmcl.py). The logged terms are the values that enter.

Departures, forced by peers that own only themselves (docs/methods.md, "L-MCL"):
- One weight network per peer instead of one for the cohort: it holds a projection per
  stage of its own (``own``) and of each possible teacher (``t{j}``); the teacher's
  projections run on the raw stage features the teacher publishes. So w for a layer
  pair, the same number in the official code from both sides, is computed by two
  copies here (one per peer of the pair) that learn separately.
- The meta step (``meta_step``; official lines 239-255 and ``losses/meta_optimizers.py``)
  unrolls only the learner's parameters, the teachers' messages held fixed, and
  differentiates through the unroll with autograd, so its hypergradient is exact;
  the official ``MetaSGD.meta_backward`` adds the momentum adjoint a1 where the exact
  reverse step adds wd * a1 (line 90; its ``meta_backward_all`` has wd * a1). Like the
  official Hessian-vector products, autograd takes the soft terms' stop-gradient targets
  as constants inside a virtual step's gradient.
- Because of that, and of ReLU, the CE after the virtual steps is, as a function of the
  weight network, not exactly what is differentiated: the test against central
  differences uses softplus and no soft terms (tests/test_lmcl.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..models import create_model
from ..models.base import Output, init_convs
from ..sections import RampedSection
from . import contrastive as C
from .base import Message, Method, PeerBatch, sum_over_teachers
from .extras import AuxiliaryBranch, PairWeightNetwork, ProjectionHead, StageAggregator
from .meta import Functional, unroll

ORDERED_PAIRS = 2  # the official loss counts each (unordered) layer pair once per ordered network pair
# model family -> (attribute holding its stages, whether a BN + ReLU follows the last stage)
STAGE_LAYOUTS = {"resnet_cifar": ("stages", False), "wrn": ("groups", True)}
UNROLLED_EXCLUDES = ("extras.weights.", "extras.aggregator.")  # official MetaSGD: the networks and heads only


class LMCLConfig(RampedSection):
    """L-MCL (TPAMI 2023): weights and temperatures of the official CIFAR script."""

    name: Literal["lmcl"] = "lmcl"
    embedding_dim: int = Field(128, ge=1)  # projection heads' width (--feat-dim)
    weight_dim: int = Field(128, ge=1)  # the weight network's projections (meta_network.py line 14)
    tau: float = Field(0.1, gt=0)
    temperature: float = Field(3.0, gt=0)  # T of kd and of the soft terms (--kd_T)
    vcl_weight: float = Field(0.1, ge=0)  # alpha
    icl_weight: float = Field(0.1, ge=0)  # beta
    soft_vcl_weight: float = Field(1.0, ge=0)  # gamma
    soft_icl_weight: float = Field(1.0, ge=0)  # lambda
    meta_every: int = Field(50, ge=0)  # a meta step when the step's index in its epoch is a multiple; 0: never
    meta_inner_steps: int = Field(2, ge=0)  # virtual steps on the contrastive loss (--times)
    rampup_epochs: float = Field(0.0, ge=0)  # no ramp-up, as the official code

    def check_models(self, names: list[str]) -> None:
        unsupported = sorted({name for name in names if model_family(name) not in STAGE_LAYOUTS})
        if unsupported:
            raise ValueError(
                f"cohort.models: method 'lmcl' copies a network's later stages into auxiliary branches, "
                f"which it can do for CIFAR ResNets and WRNs, not {unsupported}"
            )


def model_family(name: str) -> str:
    """The ``family`` of a zoo model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return create_model(name, 2, 3).family


class Stages(NamedTuple):
    """One peer's stages, shallow to deep (auxiliary from block 1, from block 2, final)."""

    features: tuple[Tensor, ...]  # pooled, (B, C) each
    logits: tuple[Tensor, ...]
    embeddings: tuple[Tensor, ...]  # L2-normalised, (B, embedding_dim)
    aggregate: Tensor  # the aggregator's logits


class LMCLExtras(nn.ModuleDict):
    """A peer's L-MCL extras: ``aux``, ``heads``, ``aggregator``, ``weights``; calling it
    on the backbone's output gives its ``Stages``."""

    def forward(self, output: Output) -> Stages:
        branches = [branch(block) for branch, block in zip(self["aux"], output.blocks[:-1], strict=True)]
        features = (*(f for f, _ in branches), output.pooled)
        logits = (*(logit for _, logit in branches), output.logits)
        embeddings = tuple(head(f) for head, f in zip(self["heads"], features, strict=True))
        return Stages(features, logits, embeddings, self["aggregator"](features, logits))


class _Joined(nn.Module):
    """The network and its extras as one module, for ``torch.func.functional_call``."""

    def __init__(self, model: nn.Module, extras: LMCLExtras) -> None:
        super().__init__()
        self.model, self.extras = model, extras

    def forward(self, x: Tensor) -> Stages:
        # .forward: the eager network even under run.compile (compiled graphs have no double backward)
        return self.extras(self.model.forward(x))


def auxiliary_branches(model: nn.Module, num_classes: int) -> nn.ModuleList:
    """Branch b (b = 1 .. S-1) takes block b and runs freshly initialised copies of
    stages b+1 .. S (official ``Auxiliary_Classifier``, ``models/lmcl_resnet_cifar.py``
    lines 210-214; He fan-out convs, BN 1/0, lines 219-227)."""
    family = getattr(model, "family", type(model).__name__)
    if family not in STAGE_LAYOUTS:
        raise ValueError(f"L-MCL builds auxiliary branches for CIFAR ResNets and WRNs only, not a '{family}' model")
    attribute, normed = STAGE_LAYOUTS[family]
    stages = getattr(model, attribute)
    width = model.block_info[-1].channels
    branches = []
    for b in range(1, len(stages)):
        copies = copy.deepcopy(nn.Sequential(*stages[b:]))
        for module in copies.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        init_convs(copies)
        tail = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU()) if normed else nn.Identity()
        branches.append(AuxiliaryBranch(copies, tail, width, num_classes))
    return nn.ModuleList(branches)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """CE in float32 for half inputs, else in the inputs' dtype (float64 tests stay exact)."""
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, targets)


class LMCL(Method):
    config_class = LMCLConfig
    publishes = ("embedding", "aggregate", "features")
    supervised_terms = frozenset({"ce", "ce_aux", "ce_agg", "vcl"})
    distillation_terms = frozenset({"kd", "icl", "soft_vcl", "soft_icl"})
    critic_terms = frozenset({"meta_ce"})
    extras_need_model = True

    def __init__(self, config: LMCLConfig) -> None:
        super().__init__(config)
        self._published: tuple[Output, Stages] | None = None  # publish's stages, reused by losses

    def build_extras(self, own, teachers, num_classes, model=None) -> LMCLExtras:
        if model is None:
            raise TypeError("L-MCL builds its auxiliary branches from the peer's network: pass model=")
        cfg, stages = self.config, len(own)
        width = own[-1].channels  # every stage feature has the final width (the branches end in copies of it)
        return LMCLExtras(
            {
                "aux": auxiliary_branches(model, num_classes),
                "heads": nn.ModuleList(ProjectionHead(width, cfg.embedding_dim) for _ in range(stages)),
                "aggregator": StageAggregator(width, stages),
                "weights": PairWeightNetwork(
                    [width] * stages,
                    {j: [info[-1].channels] * len(info) for j, info in teachers.items()},
                    cfg.weight_dim,
                ),
            }
        )

    def stages(self, output: Output, extras: LMCLExtras) -> Stages:
        """The stages of ``output``: those ``message`` computed for it (once), else anew."""
        published, self._published = self._published, None
        if published is not None and published[0] is output:
            return published[1]
        return extras(output)

    def message(self, output, extras, source, step):
        stages = extras(output)
        self._published = (output, stages)
        fields = {"embedding": stages.embeddings, "aggregate": stages.aggregate, "features": stages.features}
        return Message(source, step, **fields).detached()

    def losses(self, output, targets, teachers, extras):
        stages = self.stages(output, extras)
        with torch.no_grad():  # official line 189-190: the weights carry no gradient here
            weights = [self.pair_weights(stages, t, extras) for t in teachers]
        return self.supervised(stages, targets, teachers) | self.contrastive(stages, targets, teachers, weights)

    def supervised(self, stages: Stages, targets: Tensor, teachers: Sequence[Message]) -> dict[str, Tensor]:
        """ce, ce_aux, ce_agg (official ``loss_cls``, lines 195-201) and kd (lines 203-205)."""
        aggregates = (stages.aggregate.detach(), *(t["aggregate"] for t in teachers))
        return {
            "ce": cross_entropy(stages.logits[-1], targets),
            "ce_aux": sum(cross_entropy(logits, targets) for logits in stages.logits[:-1]),
            "ce_agg": cross_entropy(stages.aggregate, targets),
            "kd": sum(C.soft_kl(stages.logits[-1], a, self.config.temperature) for a in aggregates),
        }

    def pair_weights(self, stages: Stages, teacher: Message, extras: LMCLExtras) -> list[list[Tensor]]:
        """w[k][z] for this peer's stage k against the teacher's stage z."""
        return extras["weights"](stages.features, teacher.source, teacher["features"])

    def contrastive(
        self,
        stages: Stages,
        targets: Tensor,
        teachers: Sequence[Message],
        weights: Sequence[list[list[Tensor]]],
        teacher_side: bool = False,
    ) -> dict[str, Tensor]:
        """ORDERED_PAIRS x the weighted vcl, soft_vcl, icl, soft_icl summed over every
        teacher and layer pair (``Sup_MCL_Loss_Meta``, losses/cifar_sup_layer_mcl_meta_loss.py
        lines 82-110). ``teacher_side`` adds the pair's terms of the teacher's layer
        (its vcl, its soft_vcl towards ours), which reach this peer only through w:
        the official inner objective differentiates them when w carries gradient."""
        cfg = self.config
        per_pair = []
        for teacher, w in zip(teachers, weights, strict=True):
            for k, e in enumerate(stages.embeddings):
                for z, e_t in enumerate(teacher["embedding"]):
                    pair = C.pair_terms(e, e_t, targets, cfg.tau, cfg.temperature, w[k][z])
                    if teacher_side:
                        pair["vcl"] = pair["vcl"] + C.vcl(e_t, targets, cfg.tau, w[k][z])
                        pair["soft_vcl"] = pair["soft_vcl"] + C.soft_vcl(e_t, e, cfg.tau, cfg.temperature, w[k][z])
                    per_pair.append(pair)
        scale = {
            "vcl": cfg.vcl_weight,
            "icl": cfg.icl_weight,
            "soft_vcl": cfg.soft_vcl_weight,
            "soft_icl": cfg.soft_icl_weight,
        }
        return {name: ORDERED_PAIRS * scale[name] * value for name, value in sum_over_teachers(per_pair).items()}

    def diagnostics(self, output, teachers, extras):
        stages = extras(output)
        weights = [w for t in teachers for row in self.pair_weights(stages, t, extras) for w in row]
        return {"pair_weight": float(torch.stack(weights).mean())} if weights else {}

    # ------------------------------------------------------------ the meta step

    def critic_parameters(self, extras):
        return list(extras["weights"].parameters())

    def critic_optimizer(self, parameters):
        """Official ``weight_optimizer`` (line 404): SGD, momentum 0.9, Nesterov; its lr
        and weight decay are the peer's at each meta step (set in ``meta_step``)."""
        return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, nesterov=True)

    def meta_step(self, batch: PeerBatch, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        """Every ``meta_every`` batches of an epoch (official ``batch_idx % meta_freq == 0``,
        line 239): the hypergradient of ``meta_objective`` into the weight network, then
        one step of its optimizer at the peer's current lr and weight decay."""
        cfg = self.config
        if not cfg.meta_every or batch.batch_index % cfg.meta_every or not batch.teachers:
            return {}
        parameters = self.critic_parameters(batch.extras)
        outer = self.meta_objective(batch)
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(parameters, torch.autograd.grad(outer, parameters, allow_unused=True), strict=True):
            p.grad = g  # None (a possible teacher absent this step): the optimizer skips p
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = batch.lr, batch.weight_decay
        optimizer.step()
        return {"meta_ce": outer.detach()}

    def meta_objective(self, batch: PeerBatch) -> Tensor:
        """The stage CE (official ``outer_objective``, lines 141-149) after
        ``meta_inner_steps`` virtual SGD steps on the contrastive loss with w carrying
        gradient (``inner_objective``, lines 128-139) and one on the stage CE (line 248),
        over this peer's network, branches and heads, teachers' messages fixed; a
        function of the weight network, whose gradient is the hypergradient."""
        joined = Functional(_Joined(batch.model, batch.extras), UNROLLED_EXCLUDES)

        def inner(params):
            stages = joined(params, batch.inputs)
            weights = [self.pair_weights(stages, t, batch.extras) for t in batch.teachers]
            terms = self.contrastive(stages, batch.targets, batch.teachers, weights, teacher_side=True)
            return sum(terms.values())

        def outer(params):
            return sum(cross_entropy(logits, batch.targets) for logits in joined(params, batch.inputs).logits)

        steps = [inner] * self.config.meta_inner_steps + [outer]
        return outer(unroll(joined.start, steps, batch.lr, batch.momentum, batch.weight_decay))
