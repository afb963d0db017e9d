"""Base classes of the config sections, in a module of their own so that a method's
file can declare its config class without importing cohort.config (which imports the
method registry to build the ``method`` section's union)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

KLDirection = Literal["student_teacher", "teacher_student"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodSection(Section):
    """Base of a method's config class (the ``method`` section); each subclass sets
    ``name: Literal["<registry name>"]`` and lives in its method's file."""

    # True when every peer must have the same number of blocks (block-wise methods).
    aligns_blocks: ClassVar[bool] = False

    def check_models(self, names: list[str]) -> None:
        """Raise ValueError if this method cannot train peers of these zoo architectures
        (``cohort.models``, one name per peer); the default accepts any."""


class RampedSection(MethodSection):
    """A method section whose distillation terms ramp up from near 0 to full weight
    (``Method.ramp``). The ramp lasts ``rampup_epochs`` epochs or ``rampup_min_steps``
    optimiser steps, whichever is longer: measured in epochs alone, a small training
    set ends the ramp within a few steps, while both peers are still near chance
    (docs/accuracy.md, the small-data regime). Both 0 turns the ramp off."""

    rampup_epochs: float = Field(1.0, ge=0)
    rampup_min_steps: int = Field(0, ge=0)

    def rampup_steps(self, steps_per_epoch: int) -> float:
        """The ramp's length in steps on a run with ``steps_per_epoch`` steps per epoch."""
        return max(self.rampup_epochs * steps_per_epoch, float(self.rampup_min_steps))
