"""Experiment configuration: pydantic models, YAML loading and dotted overrides.

All validation lives here, so a bad config fails before any data loads or actor
starts, with one line that names the key and what would be valid. Defaults are the
embedded default run (``python -m cohort.run`` with no arguments); anything that
differs goes in a small YAML file under configs/ or a ``key=value`` override.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .data import DATASETS
from .methods import METHODS
from .models import MODELS, model_block_info
from .pairing import PAIRINGS
from .registry import suggest
from .sections import MethodSection, Section


class ConfigError(ValueError):
    """A configuration problem, described in one line naming the key."""


# ----------------------------------------------------------------------------- data


class SyntheticConfig(Section):
    """Shape of the seeded random dataset used by tests (``data.name=synthetic``)."""

    channels: int = Field(1, ge=1)
    image_size: int = Field(16, ge=4)
    num_classes: int = Field(10, ge=2)
    train_size: int = Field(256, ge=1)
    test_size: int = Field(128, ge=1)


class DataConfig(Section):
    name: str = "fashion_mnist"  # a name in cohort.data.DATASETS
    root: Path | None = None  # None: the Debian package's folder for fashion_mnist
    batch_size: int = Field(128, ge=1)
    train_subset: int | None = Field(20000, ge=1)  # first K images after a seeded shuffle
    test_subset: int | None = Field(None, ge=1)
    val_split: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of training images held out
    download: bool = False
    sampler: Literal["random", "class_balanced"] = "random"  # class_balanced: per_class images of each class drawn
    per_class: int = Field(2, ge=1)  # images of each drawn class in a class-balanced batch
    augment: bool = True  # random crop with padding + horizontal flip on training batches
    workers: int = Field(0, ge=0)  # DataLoader workers for image-folder datasets
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        return DATASETS.validate(name)

    @model_validator(mode="after")
    def _balanced_batches_fit(self) -> DataConfig:
        if self.sampler != "class_balanced":
            return self
        if self.batch_size % self.per_class:
            raise ValueError(
                f"data.per_class: batch_size {self.batch_size} is not a multiple of per_class {self.per_class}"
            )
        try:
            classes = DATASETS.get(self.name).info(self).num_classes
        except OSError:  # an unreadable image folder: check_available reports it, naming the path
            return self
        wanted = self.batch_size // self.per_class
        if wanted > classes:
            raise ValueError(
                f"data.per_class: a class-balanced batch of {self.batch_size} with per_class {self.per_class} "
                f"needs {wanted} classes but {self.name} has {classes}; use per_class >= "
                f"{-(-self.batch_size // classes)} dividing batch_size"
            )
        return self


# --------------------------------------------------------------------------- cohort


class CohortConfig(Section):
    size: int = Field(2, ge=2)
    models: str | list[str] = "resnet20"  # one name for every peer, or one per peer
    pairing: str = "cyclic"
    backend: Literal["ray", "local"] = "ray"
    cpus_per_peer: float = Field(1.0, gt=0)
    gpus_per_peer: float | None = Field(None, ge=0)  # None: 1 if the cluster has GPUs
    # auto: every tensor in the dtype it was computed in (bf16 under bf16 autocast), so
    # nothing is cast and nothing lost; float32 / bfloat16 cast every tensor to that
    transport_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_steps_in_flight: int = Field(2, ge=1)

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: str | list[str]) -> str | list[str]:
        for name in [models] if isinstance(models, str) else models:
            MODELS.validate(name)
        return models

    @field_validator("pairing")
    @classmethod
    def _known_pairing(cls, pairing: str) -> str:
        return PAIRINGS.validate(pairing)

    @model_validator(mode="after")
    def _one_model_per_peer(self) -> CohortConfig:
        if isinstance(self.models, list) and len(self.models) != self.size:
            raise ValueError(
                f"cohort.models lists {len(self.models)} models but cohort.size is "
                f"{self.size}; give one name for all peers or exactly {self.size} names"
            )
        return self

    @property
    def model_names(self) -> list[str]:
        """The architecture of each peer, index = peer number."""
        if isinstance(self.models, str):
            return [self.models] * self.size
        return list(self.models)


# -------------------------------------------------------------------------- methods

# Each method's config class lives in its own file (cohort/methods/<name>.py) and is
# registered with the method; the ``method`` section is their union, tagged by name.
METHOD_CONFIGS: dict[str, type[MethodSection]] = {name: METHODS.get(name).config_class for name in METHODS.names()}
MethodConfig = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]  # noqa: UP007
DEFAULT_METHOD = "amln"


# ---------------------------------------------------------------------- optim, run


class OptimConfig(Section):
    """The AMLN paper's recipe: SGD, Nesterov momentum 0.9, wd 1e-4, lr 0.1, step decay."""

    epochs: int = Field(3, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["step", "cosine"] = "step"  # step: lr *= gamma at milestones; cosine: to 0 over the epochs
    milestones: list[int] = Field(default_factory=lambda: [2])  # epochs where lr *= gamma (schedule=step)
    gamma: float = Field(0.1, gt=0, le=1)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: list[int]) -> list[int]:
        if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"must be strictly increasing epochs >= 1, got {milestones}")
        return milestones


class RunConfig(Section):
    seed: int = 0
    out_dir: Path | None = None  # None: runs/<timestamp>-<method>
    checkpoint_every: int = Field(1, ge=1)  # epochs between checkpoints
    max_failures: int = Field(2, ge=0)  # peer-actor failures survived by rebuilding
    # auto: bf16 autocast where the CPU (AVX-512 BF16, AMX) or GPU has it natively, else fp32;
    # bf16 matched fp32's accuracy over 3 seeds at 37% less wall time (docs/benchmarks.md)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    memory_format: Literal["channels_last", "contiguous"] = "channels_last"  # layout of models, batches, messages
    compile: bool = False  # torch.compile each peer's model once per process
    log_grad_norms: bool = False  # per epoch: each term's gradient norm on the backbone, feature scales, D accuracy
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)  # torch threads in the local backend
    precise_bn_batches: int = Field(16, ge=0)  # BN stats re-estimated on this many training batches before eval


class Config(Section):
    """A whole experiment. ``Config()`` is the embedded default run."""

    data: DataConfig = Field(default_factory=DataConfig)
    cohort: CohortConfig = Field(default_factory=CohortConfig)
    method: MethodConfig = Field(default_factory=METHOD_CONFIGS[DEFAULT_METHOD])
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _default_method_name(cls, value: Any) -> Any:
        if isinstance(value, dict) and "name" not in value:
            return {"name": DEFAULT_METHOD, **value}
        return value

    @model_validator(mode="after")
    def _method_takes_the_models(self) -> Config:
        self.method.check_models(self.cohort.model_names)
        return self

    @model_validator(mode="after")
    def _equal_block_counts(self) -> Config:
        if not self.method.aligns_blocks:
            return self
        counts = {name: len(model_block_info(name)) for name in self.cohort.model_names}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"{n}: {c}" for n, c in counts.items())
            raise ValueError(
                f"cohort.models: method '{self.method.name}' aligns peers block by block, "
                f"so every peer needs the same number of blocks ({listing})"
            )
        return self

    def to_yaml(self) -> str:
        """The fully resolved config, as written to runs/<name>/config.yaml."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from an optional YAML file plus ``key=value`` overrides.

    Raises ConfigError with a one-line message for any problem.
    """
    raw: dict[str, Any] = {} if path is None else read_yaml(Path(path))
    for item in overrides:
        apply_override(raw, item)
    return validate(raw)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config: no such file '{path}'")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, cohort, ...)")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as a YAML scalar/list."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' must look like key=value, e.g. method.beta=2")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot parse value '{text}'") from None
    set_dotted(raw, key, value)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw["a"]["b"]["c"] = value`` for ``key`` "a.b.c", creating sections as needed."""
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe(error)) from None


# ------------------------------------------------------------------------ resuming

# Keys a resumed run may change: where and how long it runs, not what it computes.
RESUMABLE_KEYS = frozenset(
    {
        "optim.epochs",
        "run.max_failures",
        "run.checkpoint_every",
        "run.threads",
        "run.device",
        "run.out_dir",
        "run.log_grad_norms",
        "cohort.backend",
        "cohort.cpus_per_peer",
        "cohort.gpus_per_peer",
        "cohort.max_steps_in_flight",
        "data.workers",
    }
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat


def check_resume(saved: Config, new: Config) -> None:
    """A resumed run may differ from its saved config only in ``RESUMABLE_KEYS``: the
    checkpoint fixes the training maths. One-line ConfigError naming the first key."""
    before, after = flatten(saved.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    if saved.optim.schedule == "cosine" and saved.optim.epochs != new.optim.epochs:
        raise ConfigError(
            f"--resume: optim.epochs cannot change under optim.schedule=cosine (the cosine spans the "
            f"run's {saved.optim.epochs} epochs; changing it changes every remaining learning rate)"
        )
    for key in sorted(before.keys() | after.keys()):
        if key not in RESUMABLE_KEYS and before.get(key) != after.get(key):
            raise ConfigError(
                f"--resume: {key} cannot change when resuming (the checkpoint fixes the training maths; "
                f"the run has {before.get(key)!r}); keys that can: {', '.join(sorted(RESUMABLE_KEYS))}"
            )


def read_run_config(run_dir: str | Path) -> Config:
    """The validated config.yaml a run wrote when it started."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run (no config.yaml)")
    return validate(read_yaml(path))


# ---------------------------------------------------------------- error messages


NAMES_A_KEY = re.compile(r"^[a-z_]+\.[a-z_.]+\b")


def describe(error: ValidationError) -> str:
    """Turn pydantic's report into one line: the first problem, naming its key."""
    problems = error.errors()
    first = problems[0]
    keys, model = display_location(first["loc"])
    line = explain(first, keys, model)
    if len(problems) > 1:
        line += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return line


def display_location(loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None]:
    """Dotted key for a pydantic location (dropping union tags), and the section class
    that holds its last part (for listing valid sibling keys)."""
    parts: list[str] = []
    model: type[BaseModel] | None = Config
    holder: type[BaseModel] | None = Config
    index = 0
    while index < len(loc):
        part = str(loc[index])
        parts.append(part)
        holder = model
        field = model.model_fields.get(part) if model is not None else None
        model = None
        if field is not None:
            if part == "method" and holder is Config:
                tag = str(loc[index + 1]) if index + 1 < len(loc) else None
                if tag in METHOD_CONFIGS:
                    model = METHOD_CONFIGS[tag]
                    index += 1  # skip the union tag
            elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                model = field.annotation
        index += 1
    return ".".join(parts), holder


def explain(problem: dict[str, Any], key: str, holder: type[BaseModel] | None) -> str:
    kind, given = problem["type"], problem.get("input")
    if kind == "extra_forbidden":
        leaf = key.rsplit(".", 1)[-1]
        valid = sorted(holder.model_fields) if holder is not None else []
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        if holder is not None and issubclass(holder, MethodSection):
            section = f"method '{holder.model_fields['name'].default}'"
        return f"unknown key '{key}'{suggest(leaf, valid)}; valid keys in {section}: {', '.join(valid)}"
    if kind == "union_tag_invalid":
        valid = list(METHOD_CONFIGS)
        tag = str(problem["ctx"]["tag"])
        return f"{key}.name: unknown method '{tag}'{suggest(tag, valid)}; valid: {', '.join(valid)}"
    if kind == "literal_error":
        expected = problem["ctx"]["expected"]
        valid = [v.strip(" '") for v in expected.replace(" or ", ", ").split(",")]
        return f"{key}: '{given}' is not valid{suggest(str(given), valid)}; valid: {', '.join(valid)}"
    message = problem["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if NAMES_A_KEY.match(message):
        return message  # a cross-field validator already named its key
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: must be a section of keys, got {given!r}"
    shown = f" (got {given!r})" if not isinstance(given, dict) and kind != "value_error" else ""
    return f"{key}: {message[0].lower() + message[1:]}{shown}"


__all__ = [
    "CohortConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "METHOD_CONFIGS",
    "OptimConfig",
    "RunConfig",
    "RESUMABLE_KEYS",
    "check_resume",
    "load_config",
    "read_run_config",
]
