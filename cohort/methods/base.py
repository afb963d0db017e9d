"""The method contract: what a peer publishes and which losses it learns from.

A method never sees another peer's parameters, only its detached ``Message``; every
parameter a loss touches belongs to the learning peer (its network or its extras).
That invariant is what lets each peer live in its own Ray actor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..models.base import BlockInfo, Output
from ..sections import MethodSection, RampedSection
from .functional import is_channels_last

Blocks = tuple[BlockInfo, ...]


Field = Tensor | tuple[Tensor, ...]  # one published value: a tensor or a tuple of them (blocks)


class MissingField(KeyError):
    """A message field that was not published (or not declared in ``Method.reads``)."""

    def __str__(self) -> str:  # KeyError quotes its argument; this is a sentence
        return str(self.args[0])


class Message:
    """What one peer publishes at one step: named detached tensors, nothing else.

    ``source`` is the publishing peer's index. A method publishes whatever its losses
    read (``Method.publishes``): logits and blocks for AMLN, embeddings for MCL. The
    common fields are attributes (``message.logits``, ``message.blocks``); any field is
    ``message["name"]``. Reading a field the message does not carry is a KeyError
    that names what it does carry.
    """

    def __init__(self, source: int, step: int, **fields: Field) -> None:
        self.source, self.step = source, step
        self.fields: dict[str, Field] = dict(fields)

    def __getitem__(self, name: str) -> Field:
        try:
            return self.fields[name]
        except KeyError:
            carried = ", ".join(self.fields) or "nothing"
            raise KeyError(
                f"peer {self.source}'s message at step {self.step} has no '{name}' (it carries: {carried})"
            ) from None

    @property
    def logits(self) -> Tensor:
        return self["logits"]

    @property
    def blocks(self) -> tuple[Tensor, ...]:
        return self["blocks"]

    def __repr__(self) -> str:
        return f"Message(source={self.source}, step={self.step}, fields={sorted(self.fields)})"

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None, maps_dtype: torch.dtype | None = None
    ) -> Message:
        """Every tensor detached, moved and cast (for transport or use); ``dtype`` None
        keeps each tensor's own. ``maps_dtype``, if given, is the dtype of 4-D tensors
        (feature maps) instead. A tensor already on ``device`` in its dtype (and with
        dense strides) is shared, not copied: the result is for reading only."""

        def moved(t: Tensor) -> Tensor:
            wanted = maps_dtype if maps_dtype is not None and t.dim() == 4 else dtype
            return dense(t.detach().to(device=device, dtype=wanted))

        return self.map(moved)

    def detached(self) -> Message:
        return self.map(Tensor.detach)

    def only(self, names: tuple[str, ...] | frozenset[str]) -> Message:
        """The same message carrying only ``names`` (what a method declared it reads)."""
        return Message(self.source, self.step, **{k: v for k, v in self.fields.items() if k in names})

    def map(self, fn) -> Message:
        """A message with ``fn`` applied to every tensor of every field."""
        mapped = {
            name: tuple(fn(t) for t in value) if isinstance(value, tuple) else fn(value)
            for name, value in self.fields.items()
        }
        return Message(self.source, self.step, **mapped)

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []
        for value in self.fields.values():
            found.extend(value if isinstance(value, tuple) else (value,))
        return [t for t in found if isinstance(t, Tensor)]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this message carries (what crosses the object store)."""
        total = 0
        for value in self.fields.values():
            for item in value if isinstance(value, tuple) else (value,):
                item = item.array if isinstance(item, NHWC) else item
                total += item.nbytes if isinstance(item, np.ndarray) else item.numel() * item.element_size()
        return total

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
    if is_channels_last(t):
        return t
    return t.contiguous()


@dataclass(frozen=True)
class NHWC:
    """Wire form of a channels-last (N, C, H, W) tensor: its (N, H, W, C) array."""

    array: np.ndarray


def _numpy(t: Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _tensor_to_wire(t: Tensor) -> np.ndarray | NHWC:
    if is_channels_last(t):
        return NHWC(_numpy(t.permute(0, 2, 3, 1)))
    return _numpy(t)


def _tensor_from_wire(value: Tensor | np.ndarray | NHWC) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, NHWC):
        return _tensor_from_wire(value.array).permute(0, 3, 1, 2)
    tensor = torch.from_numpy(value)
    return tensor.view(torch.bfloat16) if tensor.dtype == torch.int16 else tensor


@dataclass(frozen=True)
class PeerBatch:
    """What ``Method.meta_step`` sees: the peer's network and extras (already updated
    at this step), the step's batch and teacher messages, the step's index within its
    epoch and the peer optimizer's settings now (the scheduled learning rate)."""

    model: nn.Module
    extras: nn.ModuleDict
    inputs: Tensor
    targets: Tensor
    teachers: Sequence[Message]
    batch_index: int
    lr: float
    momentum: float
    weight_decay: float


RESERVED_TERMS = frozenset({"loss", "top1"})  # what Peer.learn logs beside the terms


class Method:
    """Base of every method. A method is one file: a subclass of this, its config class
    (a ``MethodSection``, set as ``config_class``), its extras and, if it has critics,
    their optimizer; ``methods/__init__.py`` registers it in one line.

    ``publishes`` names the fields ``message`` sends; ``reads`` names the fields its
    losses read from teachers' messages (default: all it publishes). Reading a field
    outside ``publishes`` is an error when the class is defined; at run time losses
    see teacher messages carrying only ``reads``, and a message that lacks a field it
    declares is an error at the first publish.

    Every term is declared once: ``supervised_terms`` (label terms, never ramped),
    ``distillation_terms`` (scaled by the ramp-up) or ``critic_terms`` (returned by
    ``extras_step``). An undeclared term is an error at its first step, not a term
    silently ramped; a declared name that Peer.learn logs itself is an error at import.
    """

    config_class: ClassVar[type[MethodSection]]
    publishes: ClassVar[tuple[str, ...]] = ("logits",)
    reads: ClassVar[tuple[str, ...] | None] = None  # None: everything it publishes
    supervised_terms: ClassVar[frozenset[str]] = frozenset({"ce"})
    distillation_terms: ClassVar[frozenset[str]] = frozenset()
    critic_terms: ClassVar[frozenset[str]] = frozenset()
    # True: Peer passes its network to build_extras as ``model=`` (extras built from its
    # modules, e.g. L-MCL's auxiliary branches); the other methods never see it.
    extras_need_model: ClassVar[bool] = False

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
        unpublished = set(cls.teacher_fields()) - set(cls.publishes)
        if unpublished:
            raise TypeError(
                f"{cls.__name__}: its losses read {sorted(unpublished)} from teachers' messages, "
                f"which it does not publish (publishes = {cls.publishes})"
            )

    @classmethod
    def name(cls) -> str:
        """The registry name: the ``name`` literal of the method's config class."""
        return cls.config_class.model_fields["name"].default

    @classmethod
    def teacher_fields(cls) -> tuple[str, ...]:
        """The message fields the losses read (``reads``, or all of ``publishes``)."""
        return cls.publishes if cls.reads is None else cls.reads

    def __init__(self, config: MethodSection) -> None:
        self.config = config

    def build_extras(
        self, own: Blocks, teachers: Mapping[int, Blocks], num_classes: int, model: nn.Module | None = None
    ) -> nn.ModuleDict:
        """The peer's own learnable extras (discriminators, alignment containers,
        projection heads), built from block layouts only; ``teachers`` maps every
        possible teacher's index to its layout. A method with ``extras_need_model``
        also gets the peer's freshly built network as ``model=``."""
        return nn.ModuleDict()

    def message(self, output: Output, extras: nn.ModuleDict, source: int, step: int) -> Message:
        """Publish only what this method's losses read, detached from the graph. The
        default takes ``publishes`` from the model's output; a method that publishes
        what its extras compute (a projection head's embedding) overrides this."""
        chosen = {name: getattr(output, name) for name in self.publishes}
        return Message(source, step, **chosen).detached()

    def checked_message(self, output: Output, extras: nn.ModuleDict, source: int, step: int) -> Message:
        """``message``, raising TypeError if it does not carry exactly ``publishes``."""
        message = self.message(output, extras, source, step)
        if set(message.fields) != set(self.publishes):
            raise TypeError(
                f"{type(self).__name__}.message published {sorted(message.fields)}, "
                f"but the class declares publishes = {self.publishes}"
            )
        return message

    def critic_optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        """The optimizer of ``critic_parameters`` (discriminators); None without critics."""
        if parameters:
            raise TypeError(f"{type(self).__name__} has critic parameters but no critic_optimizer")
        return None

    def losses(
        self,
        output: Output,
        targets: Tensor,
        teachers: Sequence[Message],
        extras: nn.ModuleDict,
    ) -> dict[str, Tensor]:
        """Every term of the peer's loss by name; the peer optimises their sum.

        Runs under the peer's autocast (``run.precision``), as do ``extras_step``,
        ``diagnostics`` and ``meta_step``. The teachers' logits and other flat tensors
        arrive in fp32; their 4-D feature maps in the autocast dtype (bf16 under bf16,
        else fp32), the dtype the convolutions that read them run in."""
        raise NotImplementedError

    def ramp(self, terms: dict[str, Tensor], steps_done: float, steps_per_epoch: int) -> dict[str, Tensor]:
        """Scale every distillation term by the ramp-up weight after ``steps_done``
        optimiser steps (``RampedSection.rampup_steps`` long on a run of
        ``steps_per_epoch``); supervised terms are left alone."""
        self.check_declared(
            terms,
            self.supervised_terms | self.distillation_terms,
            "supervised_terms (never ramped) or distillation_terms (ramped up)",
            "losses",
        )
        ramp_steps = self.config.rampup_steps(steps_per_epoch) if isinstance(self.config, RampedSection) else 0.0
        weight = rampup_weight(steps_done, ramp_steps)
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
        """Extras trained by ``extras_step`` with ``critic_optimizer`` (discriminators)."""
        return []

    def extras_step(self, output: Output, teachers: Sequence[Message], extras: nn.ModuleDict) -> dict[str, Tensor]:
        """Losses of the optional second update, over ``critic_parameters`` only."""
        return {}

    def updates_critics(self, batch_index: int) -> bool:
        """Whether ``extras_step`` runs at this batch (its 0-based index in the epoch);
        on the others it is skipped: no update from it, nothing logged. ``meta_step``
        is not gated by this; it keeps its own schedule (L-MCL's ``meta_every``, from
        ``PeerBatch.batch_index``). Default: every batch. AMLN's ``disc_every`` thins
        its discriminators' updates."""
        return True

    def meta_step(self, batch: PeerBatch, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        """Optional update of ``critic_parameters`` that needs the peer's network and
        batch, run by the peer after its own update (and ``extras_step``). The method
        computes the critics' gradient, sets ``optimizer``'s hyperparameters if they
        follow the peer's (``batch.lr``) and steps it; it returns its terms (declared in
        ``critic_terms``) for logging, or {} on steps where it does nothing. L-MCL's
        meta-learned layer weights use it; the default does nothing."""
        return {}

    def diagnostics(self, output: Output, teachers: Sequence[Message], extras: nn.ModuleDict) -> dict[str, float]:
        """Extra values logged with ``run.log_grad_norms`` (called without gradient)."""
        return {}


def rampup_weight(done: float, length: float) -> float:
    """exp(-5 (1 - t)^2) for t = done / length < 1, else 1 (``done`` and ``length`` in
    the same unit: steps, or epochs).

    The sigmoid-shaped ramp-up of the consistency weight used by the official code of
    ONE and FFL (Lan et al. 2018, Kim et al. 2019), the online-KD baselines AMLN
    follows. The AMLN paper does not mention one; without it, the mutual KL and
    feature terms collapsed peers' final features to zero in the first ~20 steps at
    lr 0.1 (docs/methods.md).
    """
    if length <= 0 or done >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - done / length) ** 2)


def mean_over_teachers(per_teacher: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Average each named term over teachers (DML's n-peer form)."""
    if not per_teacher:
        return {}
    return {name: torch.stack([terms[name] for terms in per_teacher]).mean() for name in per_teacher[0]}


def sum_over_teachers(per_teacher: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Add each named term over teachers (MCL's joint loss sums over pairs)."""
    if not per_teacher:
        return {}
    return {name: torch.stack([terms[name] for terms in per_teacher]).sum() for name in per_teacher[0]}


def teacher_key(index: int) -> str:
    """ModuleDict key of the extras that belong to teacher ``index``."""
    return f"t{index}"
