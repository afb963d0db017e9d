"""Vanilla: each peer trains alone on cross-entropy (Table 6 case A, the baseline)."""

from __future__ import annotations

from typing import Literal

from ..sections import MethodSection
from . import functional as L
from .base import Method


class VanillaConfig(MethodSection):
    """Cross-entropy only; peers train independently (the baseline)."""

    name: Literal["vanilla"] = "vanilla"


class Vanilla(Method):
    config_class = VanillaConfig
    publishes = ()  # no peer reads anything; the ensemble is computed from evaluation

    def losses(self, output, targets, teachers, extras):
        return {"ce": L.cross_entropy(output.logits, targets)}  # eq. 5
