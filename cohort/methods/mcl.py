"""MCL: mutual contrastive learning (Yang et al., AAAI 2022; official code winycg/MCL),
final layer only, for any pairing.

Each peer owns a projection head on its pooled final feature and publishes the
L2-normalised embedding e (B x 128). Its loss against each teacher's detached
embedding e_t (cohort/methods/contrastive.py, which cites the official lines):

    L_k = ce + alpha vcl(e) + sum over teachers [beta icl + gamma soft_vcl + lambda soft_icl](e, e_t)

with tau 0.1, T 3 and alpha = beta = 0.1, gamma = lambda = 1 (the official scripts).
``vcl`` reads no teacher and enters once; the teacher terms are summed, not averaged,
over teachers. Under ``cohort.pairing=all_pairs`` every peer's gradient equals the
gradient of the official joint loss with respect to its parameters, factor 1: each
parameter reaches the joint loss only through its own embedding, and each pair's
icl/soft_icl sends gradient to each side from one copy (derivation in docs/methods.md;
tests/test_mcl_loss.py and tests/test_methods.py check it in float64). ``cyclic`` and
``shuffled_ring`` are allowed and are a different objective: each peer learns from
one teacher, so each pair's terms move one side only.

Choices left open by the paper and the code, made here:
- Anchors with no positive in the batch are left out of the SupCon mean (the official
  code gives NaN there and relies on ``MPerClassSampler``); ``data.sampler:
  class_balanced`` reproduces that sampler.
- Peers share batches (the batch plan), so the teacher's labels are the learner's.
- No ramp-up (``rampup_epochs`` 0, as the official code); the key is there for parity.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..sections import RampedSection
from . import contrastive as C
from . import functional as L
from .base import Message, Method, sum_over_teachers
from .extras import ProjectionHead


class MCLConfig(RampedSection):
    """MCL (AAAI 2022): CE + the four contrastive terms, weights as the official scripts."""

    name: Literal["mcl"] = "mcl"
    embedding_dim: int = Field(128, ge=1)  # projection head width and output
    tau: float = Field(0.1, gt=0)  # similarity temperature
    temperature: float = Field(3.0, gt=0)  # T of the soft terms (T^2 KL)
    vcl_weight: float = Field(0.1, ge=0)  # alpha
    icl_weight: float = Field(0.1, ge=0)  # beta
    soft_vcl_weight: float = Field(1.0, ge=0)  # gamma
    soft_icl_weight: float = Field(1.0, ge=0)  # lambda
    rampup_epochs: float = Field(0.0, ge=0)  # no ramp-up, as the official code


class MCL(Method):
    config_class = MCLConfig
    publishes = ("embedding",)
    supervised_terms = frozenset({"ce", "vcl"})
    distillation_terms = frozenset({"icl", "soft_vcl", "soft_icl"})

    def build_extras(self, own, teachers, num_classes):
        return nn.ModuleDict({"head": ProjectionHead(own[-1].channels, self.config.embedding_dim)})

    def embed(self, output, extras):
        return extras["head"](output.pooled)

    def message(self, output, extras, source, step):
        return Message(source, step, embedding=self.embed(output, extras)).detached()

    def losses(self, output, targets, teachers, extras):
        cfg = self.config
        e = self.embed(output, extras)
        terms = {
            "ce": L.cross_entropy(output.logits, targets),
            "vcl": cfg.vcl_weight * C.vcl(e, targets, cfg.tau),
        }
        weights = {"icl": cfg.icl_weight, "soft_vcl": cfg.soft_vcl_weight, "soft_icl": cfg.soft_icl_weight}
        per_teacher = []
        for t in teachers:  # each similarity matrix once per teacher; vcl (teacher-free) enters once, above
            pair = C.pair_terms(e, t["embedding"], targets, cfg.tau, cfg.temperature)
            per_teacher.append({name: weight * pair[name] for name, weight in weights.items()})
        return terms | sum_over_teachers(per_teacher)
