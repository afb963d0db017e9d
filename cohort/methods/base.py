"""The method contract: what a peer publishes and which losses it learns from.

A method never sees another peer's parameters, only its detached ``Message``; every
parameter a loss touches belongs to the learning peer (its network or its extras).
That invariant is what lets each peer live in its own Ray actor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..models.base import BlockInfo, Output

Blocks = tuple[BlockInfo, ...]


@dataclass(frozen=True)
class Message:
    """What one peer publishes at one step: detached tensors, nothing else.

    ``source`` is the publishing peer's index; fields a method does not need stay None.
    """

    source: int
    step: int
    logits: Tensor | None = None
    blocks: tuple[Tensor, ...] | None = None
    pooled: Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Message:
        """A copy with every tensor detached, moved and cast (for transport or use)."""
        return self.map(lambda t: dense(t.detach().to(device=device, dtype=dtype)))

    def detached(self) -> Message:
        return self.map(Tensor.detach)

    def map(self, fn) -> Message:
        return replace(
            self,
            logits=None if self.logits is None else fn(self.logits),
            blocks=None if self.blocks is None else tuple(fn(b) for b in self.blocks),
            pooled=None if self.pooled is None else fn(self.pooled),
        )

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Tensor):
                found.append(value)
            elif isinstance(value, tuple):
                found.extend(v for v in value if isinstance(v, Tensor))
        return found

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to_wire(self) -> Message:
        """The tensors as numpy arrays (bfloat16 as its raw int16 bits), sharing memory.

        Ray moves numpy buffers out of band without a copy, and this measured faster
        than its default torch pickling and its zero-copy torch setting
        (docs/benchmarks.md). A channels-last feature map travels as its NHWC array
        (C-contiguous, so still without a copy) and arrives channels-last, so the
        learner never converts layouts. ``from_wire`` undoes it.
        """
        return self.map(_tensor_to_wire)

    def from_wire(self) -> Message:
        """Tensors again, without a copy. Arrays Ray hands out are read-only; so are the
        tensors made from them (methods never write to a teacher's message)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return self.map(_tensor_from_wire)


def dense(t: Tensor) -> Tensor:
    """``t`` with dense strides, keeping channels-last where it has it."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


@dataclass(frozen=True)
class NHWC:
    """Wire form of a channels-last (N, C, H, W) tensor: its (N, H, W, C) array."""

    array: np.ndarray


def _numpy(t: Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _tensor_to_wire(t: Tensor) -> np.ndarray | NHWC:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return NHWC(_numpy(t.permute(0, 2, 3, 1)))
    return _numpy(t)


def _tensor_from_wire(value: Tensor | np.ndarray | NHWC) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, NHWC):
        return _tensor_from_wire(value.array).permute(0, 3, 1, 2)
    tensor = torch.from_numpy(value)
    return tensor.view(torch.bfloat16) if tensor.dtype == torch.int16 else tensor


RESERVED_TERMS = frozenset({"loss", "top1"})  # what Peer.learn logs beside the terms


class Method:
    """Base of every method. Subclasses set ``publishes``, declare the names of the
    terms ``losses`` returns, and implement ``losses``.

    Every term is declared once: ``supervised_terms`` (label terms, never ramped),
    ``distillation_terms`` (scaled by the ramp-up) or ``critic_terms`` (returned by
    ``extras_step``). An undeclared term is an error at its first step, not a term
    silently ramped; a declared name that Peer.learn logs itself is an error at import.
    """

    publishes: ClassVar[tuple[str, ...]] = ("logits",)
    supervised_terms: ClassVar[frozenset[str]] = frozenset({"ce"})
    distillation_terms: ClassVar[frozenset[str]] = frozenset()
    critic_terms: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        declared = [cls.supervised_terms, cls.distillation_terms, cls.critic_terms]
        clash = set().union(*declared) & RESERVED_TERMS
        if clash:
            raise TypeError(f"{cls.__name__}: loss terms may not be named {sorted(clash)} (Peer.learn logs those)")
        if sum(len(names) for names in declared) != len(set().union(*declared)):
            raise TypeError(
                f"{cls.__name__}: a loss term is declared in more than one of supervised/distillation/critic"
            )

    def __init__(self, config) -> None:
        self.config = config

    def build_extras(self, own: Blocks, teachers: Mapping[int, Blocks], num_classes: int) -> nn.ModuleDict:
        """The peer's own learnable extras (discriminators, alignment containers),
        built from block layouts only; ``teachers`` maps every possible teacher's
        index to its layout."""
        return nn.ModuleDict()

    def message(self, output: Output, source: int, step: int) -> Message:
        """Publish only what this method's losses read, detached from the graph."""
        chosen = {name: getattr(output, name) for name in self.publishes}
        return Message(source, step, **chosen).detached()

    def losses(
        self,
        output: Output,
        targets: Tensor,
        teachers: Sequence[Message],
        extras: nn.ModuleDict,
    ) -> dict[str, Tensor]:
        """Every term of the peer's loss by name; the peer optimises their sum."""
        raise NotImplementedError

    def ramp(self, terms: dict[str, Tensor], epochs_done: float) -> dict[str, Tensor]:
        """Scale every distillation term by the ramp-up weight at ``epochs_done``
        (fractional epochs since the start); supervised terms are left alone."""
        self.check_declared(
            terms,
            self.supervised_terms | self.distillation_terms,
            "supervised_terms (never ramped) or distillation_terms (ramped up)",
            "losses",
        )
        weight = rampup_weight(epochs_done, getattr(self.config, "rampup_epochs", 0.0))
        if weight == 1.0:
            return terms
        return {k: weight * v if k in self.distillation_terms else v for k, v in terms.items()}

    def check_declared(self, terms: Mapping[str, Tensor], declared: frozenset[str], where: str, by: str) -> None:
        """A TypeError naming any term of ``terms`` not in ``declared``."""
        undeclared = terms.keys() - declared
        if undeclared:
            raise TypeError(
                f"{type(self).__name__}.{by} returned undeclared term(s) {sorted(undeclared)}; declare each in {where}"
            )

    def critic_parameters(self, extras: nn.ModuleDict) -> list[nn.Parameter]:
        """Extras trained by ``extras_step`` with their own optimizer (discriminators)."""
        return []

    def extras_step(self, output: Output, teachers: Sequence[Message], extras: nn.ModuleDict) -> dict[str, Tensor]:
        """Losses of the optional second update, over ``critic_parameters`` only."""
        return {}

    def diagnostics(self, output: Output, teachers: Sequence[Message], extras: nn.ModuleDict) -> dict[str, float]:
        """Extra values logged with ``run.log_grad_norms`` (called without gradient)."""
        return {}


def rampup_weight(epochs_done: float, rampup_epochs: float) -> float:
    """exp(-5 (1 - t)^2) for t = epochs_done / rampup_epochs < 1, else 1.

    The sigmoid-shaped ramp-up of the consistency weight used by the official code of
    ONE and FFL (Lan et al. 2018, Kim et al. 2019), the online-KD baselines AMLN
    follows. The AMLN paper does not mention one; without it, the mutual KL and
    feature terms collapsed peers' final features to zero in the first ~20 steps at
    lr 0.1 (docs/methods.md).
    """
    if rampup_epochs <= 0 or epochs_done >= rampup_epochs:
        return 1.0
    return math.exp(-5.0 * (1.0 - epochs_done / rampup_epochs) ** 2)


def mean_over_teachers(per_teacher: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Average each named term over teachers (DML's n-peer form)."""
    if not per_teacher:
        return {}
    return {name: torch.stack([terms[name] for terms in per_teacher]).mean() for name in per_teacher[0]}


def teacher_key(index: int) -> str:
    """ModuleDict key of the extras that belong to teacher ``index``."""
    return f"t{index}"
