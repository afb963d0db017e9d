"""Hooks into a running cohort: console output, Ray Tune reporting, tests.

The driver (``cohort.coordinator.Cohort``) calls every callback at four points; a
callback overrides only the ones it needs. They run in the driver process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .coordinator import Cohort, RunResult
    from .metrics import MetricsLog

StepTerms = list[dict[str, float]]  # one dict of loss terms per peer


class Callback:
    """No-op base; override what you need."""

    def on_start(self, cohort: Cohort, first_epoch: int) -> None:
        """The peers are up; training starts (or resumes) at 0-based ``first_epoch``."""

    def on_step(self, step: int, terms: StepTerms) -> None:
        """Global ``step`` has completed on every peer; ``terms`` are its loss terms."""

    def on_epoch(self, epoch: int, metrics: MetricsLog) -> None:
        """1-based ``epoch`` is evaluated, logged and (if due) checkpointed."""

    def on_finish(self, result: RunResult) -> None:
        """Training is done and the best peer exported."""


class OnStep(Callback):
    """Wrap a plain ``fn(step)`` as a callback (tests and quick hooks)."""

    def __init__(self, fn: Callable[[int], None]) -> None:
        self.fn = fn

    def on_step(self, step: int, terms: StepTerms) -> None:
        self.fn(step)


class OnEpoch(Callback):
    """Wrap a plain ``fn(epoch, metrics)`` as a callback."""

    def __init__(self, fn: Callable[[int, MetricsLog], None]) -> None:
        self.fn = fn

    def on_epoch(self, epoch: int, metrics: MetricsLog) -> None:
        self.fn(epoch, metrics)
