"""Base classes of the config sections, in a module of their own so that a method's
file can declare its config class without importing cohort.config (which imports the
method registry to build the ``method`` section's union)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

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
