"""Deep Mutual Learning (Zhang et al., CVPR 2018): CE plus T^2-scaled KL to each
teacher's softened prediction, averaged over teachers (DML's n-peer form).

DML's own loss uses T = 1; ``method.temperature`` (default 3, as in AMLN and FFL)
softens both predictions, which is the common online-KD practice.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..sections import KLDirection, RampedSection
from . import functional as L
from .base import Method, mean_over_teachers


class DMLConfig(RampedSection):
    """Deep mutual learning: CE + T^2 KL to each teacher's softened prediction."""

    name: Literal["dml"] = "dml"
    temperature: float = Field(3.0, gt=0)
    kl_direction: KLDirection = "teacher_student"
    # the ramp-up lasts at least this many steps (chosen on validation in the small-data regime, docs/accuracy.md)
    rampup_min_steps: int = Field(140, ge=0)


class DML(Method):
    config_class = DMLConfig
    publishes = ("logits",)
    distillation_terms = frozenset({"kl"})

    def losses(self, output, targets, teachers, extras):
        cfg = self.config
        terms = {"ce": L.cross_entropy(output.logits, targets)}  # eq. 5 / DML eq. 1
        terms |= mean_over_teachers(
            [
                {"kl": L.softened_kl(output.logits, t.logits, cfg.temperature, cfg.kl_direction)}  # eq. 6-8 / DML eq. 2
                for t in teachers
            ]
        )
        return terms
