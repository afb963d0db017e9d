"""Sweep files: pydantic schema, loading with ``key=value`` overrides, and every check
that can run before Ray starts.

A sweep file names a base experiment (a configs/ path or an inline mapping), dotted
keys ``fixed`` for every trial, and a ``space`` of dotted keys to search. Each key in
``fixed`` and ``space`` (and each grid or choice value, and each bound of a range) is
validated against the experiment schema exactly as ``python -m cohort.run`` would,
so a typo such as ``method.betta`` fails here with one line, before anything starts.
"""

from __future__ import annotations

import itertools
from copy import deepcopy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cohort.config import Config, ConfigError, apply_override, read_yaml, set_dotted, validate
from cohort.registry import suggest

DEFAULT_VAL_SPLIT = 0.1
# Set by every trial (tuning.trial.TRIAL_SETTINGS); a sweep may not search or fix them.
TRIAL_OWNED_KEYS = ("cohort.backend", "run.max_failures", "run.out_dir")
MAX_CHECKED_COMBINATIONS = 4096


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(Strict):
    """One searched key: exactly one of a grid, a choice or a range."""

    grid: list[Any] | None = None  # every value, crossed with the other grids (tune.grid_search)
    choice: list[Any] | None = None  # one value per sample (tune.choice)
    uniform: tuple[float, float] | None = None  # [lo, hi] (tune.uniform)
    loguniform: tuple[float, float] | None = None  # [lo, hi], lo > 0 (tune.loguniform)
    randint: tuple[int, int] | None = None  # [lo, hi), hi exclusive as in tune.randint

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)} (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]} needs at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{given[0]} needs [lo, hi] with lo < hi, got {list(values)}")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform needs lo > 0, got {values[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def values(self) -> list[Any]:
        return list(getattr(self, self.kind))

    def examples(self) -> list[Any]:
        """Values that stand for the whole distribution when validating: every grid
        or choice value; both ends of a range and a fractional point inside it (so a
        continuous range on an integer key fails here, not in a trial)."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        if self.kind in ("uniform", "loguniform"):
            lo, hi = self.values
            return [lo, lo + 0.37 * (hi - lo), hi]
        return self.values


class Scheduler(Strict):
    name: Literal["asha", "fifo"] = "fifo"
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(2, gt=1)


class SweepConfig(Strict):
    """A whole sweep; see configs/sweeps/ for examples."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: str | dict[str, Any] = Field(default_factory=dict)  # configs/ path or inline experiment mapping
    fixed: dict[str, Any] = Field(default_factory=dict)  # dotted experiment keys for every trial
    space: dict[str, Distribution] = Field(default_factory=dict)
    samples: int = Field(1, ge=1)  # Tune's num_samples (each grid point is repeated this often)
    max_concurrent_trials: int = Field(1, ge=1)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    metric: Literal["val_top1_best", "val_top1_mean", "val_ensemble_top1"] = "val_top1_best"
    max_failures: int = Field(1, ge=0)  # retries of a trial from its last checkpoint
    out_dir: Path | None = None  # default runs/sweeps/<timestamp>-<name>

    @field_validator("space")
    @classmethod
    def _not_empty(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        if not space:
            raise ValueError("needs at least one key to search, e.g. method.beta: {grid: [0.3, 1, 3]}")
        return space

    @field_validator("space", "fixed")
    @classmethod
    def _not_trial_owned(cls, keys: dict[str, Any]) -> dict[str, Any]:
        owned = [k for k in keys if k in TRIAL_OWNED_KEYS]
        if owned:
            raise ValueError(
                f"{owned[0]} is set by every trial (trials use {', '.join(TRIAL_OWNED_KEYS)} of their own)"
            )
        return keys


# ----------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepConfig, dict[str, Any]]:
    """The validated sweep and its trials' common experiment (base + fixed, with the
    validation split), as a raw mapping. Raises ConfigError with one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such sweep file '{path}'")
    raw = read_yaml(path)
    for item in overrides:
        apply_sweep_override(raw, item)
    sweep = validate_sweep(raw, path)
    return sweep, trial_base(sweep)


def apply_sweep_override(raw: dict[str, Any], item: str) -> None:
    """``samples=4`` or ``fixed.optim.epochs=1`` (the rest of the key after fixed. or
    space. is one dotted experiment key)."""
    key, sep, text = item.partition("=")
    head, dot, rest = key.partition(".")
    if sep and dot and rest and head in ("fixed", "space"):
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse value '{text}'") from None
        section = raw.setdefault(head, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{head}: must be a mapping of dotted keys")
        section[rest] = value
        return
    apply_override(raw, item)


def validate_sweep(raw: dict[str, Any], source: Path | str = "sweep") -> SweepConfig:
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            leaf = str(first["loc"][-1])
            holder = {"scheduler": Scheduler}.get(str(first["loc"][0]), SweepConfig)
            if len(first["loc"]) > 1 and first["loc"][0] == "space":
                holder = Distribution
            valid = sorted(holder.model_fields)
            raise ConfigError(
                f"{source}: unknown key '{key}'{suggest(leaf, valid)}; valid: {', '.join(valid)}"
            ) from None
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {key}: {message[0].lower() + message[1:]}") from None


def base_mapping(sweep: SweepConfig) -> dict[str, Any]:
    """The base experiment as a raw mapping (a configs/ file is read); a copy."""
    if isinstance(sweep.base, dict):
        return deepcopy(sweep.base)
    path = Path(sweep.base)
    if not path.is_file():
        raise ConfigError(f"base: no such experiment file '{path}' (a configs/ path, or an inline mapping)")
    return read_yaml(path)


def trial_base(sweep: SweepConfig) -> dict[str, Any]:
    """base + fixed + the default validation split, checked against the experiment
    schema key by key, then every combination of searched values (each grid or
    choice value, each range's ends and an inner point) as whole trials."""
    raw = base_mapping(sweep)
    validate_as(raw, "base")
    for key, value in sweep.fixed.items():
        set_dotted(raw, key, value)
        validate_as(raw, f"fixed.{key}")
    split = validate_as(raw, "base").data.val_split
    if split == 0 and ("val_split" in raw.get("data", {})):
        raise ConfigError(
            "fixed.data.val_split: 0 leaves no validation split, and trials are compared on validation "
            f"accuracy only; use a fraction such as {DEFAULT_VAL_SPLIT} (or leave it out for {DEFAULT_VAL_SPLIT})"
        )
    if split == 0:
        raw.setdefault("data", {})["val_split"] = DEFAULT_VAL_SPLIT
    for key, distribution in sweep.space.items():
        for value in distribution.examples():
            validate_as(set_key(raw, key, value), f"space.{key}")
    keys = list(sweep.space)
    combinations = itertools.islice(
        itertools.product(*(sweep.space[k].examples() for k in keys)), MAX_CHECKED_COMBINATIONS
    )
    for values in combinations:
        params = dict(zip(keys, values))
        trial = raw
        for key, value in params.items():
            trial = set_key(trial, key, value)
        where = "space (" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"
        if validate_as(trial, where).data.val_split == 0:
            raise ConfigError(f"{where}: a trial with data.val_split 0 could not be compared on validation")
    return raw


def resolved(sweep: SweepConfig, base: dict[str, Any]) -> SweepConfig:
    """The sweep as it runs: ``base`` is the trials' full base experiment (so a resume
    reads exactly it, wherever it runs and whatever configs/ says by then)."""
    return sweep.model_copy(update={"base": deepcopy(base), "fixed": {}})


def set_key(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``raw`` with dotted ``key`` set to ``value``."""
    copy = deepcopy(raw)
    set_dotted(copy, key, value)
    return copy


def validate_as(raw: dict[str, Any], where: str) -> Config:
    try:
        return validate(raw)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The experiment one trial runs: the sweep's base with its sampled values."""
    raw = base
    for key, value in params.items():
        raw = set_key(raw, key, value)
    return validate(raw)
