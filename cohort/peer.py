"""Peer: one network of the cohort with its extras, optimizers, schedule and data.

Pure PyTorch, no Ray: the local backend calls these methods directly and the Ray
backend wraps the same class as an actor, so both run identical maths. One step is
two calls, because a peer must publish before anyone can learn from it:

    publish(step) -> Message         forward on the step's batch, keep the graph
    learn(step, *teacher_messages)   losses, backward, optimizer steps
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Config
from .data import load_data, seed_for
from .methods import Message, build_method
from .methods.base import PeerBatch
from .models import create_model, model_block_info
from .models.base import Output
from .pairing import make_pairing

TRANSPORT_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}  # None: as computed


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; training cannot meaningfully continue."""

    def __init__(self, peer: int, step: int, term: str, value: float, bad_teachers: tuple[int, ...] = ()) -> None:
        cause = f" (the message from peer {', '.join(map(str, bad_teachers))} is already non-finite)"
        super().__init__(f"peer {peer} step {step}: loss term '{term}' is {value}" + (cause if bad_teachers else ""))
        self.peer, self.step, self.term, self.value, self.bad_teachers = peer, step, term, value, bad_teachers

    def __reduce__(self):  # keep the fields when Ray pickles the error
        return (NonFiniteLossError, (self.peer, self.step, self.term, self.value, self.bad_teachers))


def resolve_device(device: str) -> torch.device:
    """``run.device``: "auto" is the GPU Ray (or the machine) gives this process, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a GPU that supports it, or a
    CPU with AVX-512 BF16 or AMX (read from /proc/cpuinfo; False where it is absent)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``run.precision``: "auto" is bf16 where ``device`` has it natively, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def on_cpu(tree: Any) -> Any:
    """The nest of dicts/lists/tuples rebuilt with every tensor detached and on CPU
    (tensors already on CPU are shared, not copied), so a driver on a CPU-only head
    node can deserialise what a GPU peer returns."""
    if isinstance(tree, Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_cpu(v) for v in tree)
    return tree


class Peer:
    """Peer ``index`` of the cohort that ``config`` describes."""

    send_numpy: bool = True  # publish messages in their wire form (Message.to_wire)

    def __init__(self, index: int, config: Config, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.index, self.config = index, config
        self.size = config.cohort.size
        self.device = resolve_device(config.run.device)
        self.precision = resolve_precision(config.run.precision, self.device)
        self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.memory_format = MEMORY_FORMATS[config.run.memory_format]
        self.transport_dtype = TRANSPORT_DTYPES[config.cohort.transport_dtype]
        self.data = load_data(config.data, config.run.seed, pin_memory=self.device.type == "cuda")
        self.method = build_method(config.method)
        self.pairing = make_pairing(config.cohort.pairing, config.run.seed)
        names = config.cohort.model_names
        teachers = {t: model_block_info(names[t]) for t in self.pairing.possible_teachers(index, self.size)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(config.run.seed, "init", index))  # peers start apart
            self.model = create_model(names[index], self.data.info.num_classes, self.data.info.channels)
            own_model = {"model": self.model} if self.method.extras_need_model else {}
            self.extras = self.method.build_extras(
                self.model.block_info, teachers, self.data.info.num_classes, **own_model
            )
        self.model.to(self.device, memory_format=self.memory_format)
        self.extras.to(self.device, memory_format=self.memory_format)
        if config.run.compile:
            self.model.compile()  # in place: parameter names (and checkpoints) stay the same
        self._build_optimizers()
        self._pending: tuple[int, Any, Tensor, Tensor] | None = None  # step, output, targets, inputs

    # ------------------------------------------------------------------ set-up

    def _build_optimizers(self) -> None:
        optim = self.config.optim
        critic = self.method.critic_parameters(self.extras)
        critic_ids = {id(p) for p in critic}
        learner = list(self.model.parameters()) + [p for p in self.extras.parameters() if id(p) not in critic_ids]
        self.optimizer = torch.optim.SGD(
            learner,
            lr=optim.lr,
            momentum=optim.momentum,
            nesterov=optim.nesterov and optim.momentum > 0,
            weight_decay=optim.weight_decay,
        )
        if optim.schedule == "cosine":  # per epoch, as MCL/L-MCL's official recipe; reaches 0 after the last epoch
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=optim.epochs)
        else:
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, optim.milestones, optim.gamma)
        self.critic_params = critic
        self.critic_optimizer = self.method.critic_optimizer(critic)

    def autocast(self) -> torch.autocast:
        """Mixed precision for forward passes and losses (``run.precision``); a no-op in fp32."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def batch_on_device(self, x: Tensor) -> Tensor:
        return x.to(self.device, memory_format=self.memory_format, non_blocking=True)

    def describe(self) -> dict[str, Any]:
        """Facts the driver needs once: schedule length, data shape, where it runs."""
        info = self.data.info
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "precision": self.precision,
            "memory_format": self.config.run.memory_format,
            "compiled": self.config.run.compile,
            "steps_per_epoch": self.data.plan.steps_per_epoch,
            "train_size": len(self.data.train),
            "has_val": self.data.val is not None,
            "num_classes": info.num_classes,
            "in_channels": info.channels,
            "image_size": info.image_size,
            "mean": info.mean,
            "std": info.std,
        }

    # ----------------------------------------------------------------- one step

    def publish(self, step: int) -> Message:
        """Forward this step's batch, keep the graph for ``learn``, return the message."""
        self.model.train()
        self.extras.train()
        x, y = self.data.train_batch(step)
        x, y = self.batch_on_device(x), y.to(self.device, non_blocking=True)
        with self.autocast():  # the message too: extras (projection heads) run on the output
            output = self.model(x)
            message = self.method.checked_message(output, self.extras, self.index, step)
        self._pending = (step, output, y, x)
        message = message.to("cpu", self.transport_dtype)
        return message.to_wire() if self.send_numpy else message

    def learn(self, step: int, *teacher_messages: Message) -> dict[str, float]:
        """Update from this step's teachers; returns every loss term and train top-1."""
        if self._pending is None or self._pending[0] != step:
            raise RuntimeError(f"peer {self.index}: learn({step}) without publish({step}) first")
        _, output, targets, inputs = self._pending
        self._pending = None
        self._check_teachers(step, teacher_messages)
        teachers = self.receive(teacher_messages)

        for p in self.critic_params:  # the peer's loss must not train its critics
            p.requires_grad_(False)
        with self.autocast():
            terms = self.method.losses(output, targets, teachers, self.extras)
        terms = self.method.ramp(terms, step + 1, self.data.plan.steps_per_epoch)
        total = sum(terms.values())
        logged = self._finite_floats(step, terms | {"loss": total}, teachers)
        if self.config.run.log_grad_norms:
            logged |= self.diagnostics(output, terms, teachers)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        for p in self.critic_params:
            p.requires_grad_(True)

        if self.critic_optimizer is not None:
            batch_index = self.data.plan.locate(step)[1]
            if self.method.updates_critics(batch_index):
                logged |= self._critic_step(step, output, teachers)
            logged |= self._meta_step(step, batch_index, inputs, targets, teachers)
        logged["top1"] = float((output.logits.argmax(1) == targets).float().mean())
        return logged

    def receive(self, teacher_messages: Sequence[Message]) -> list[Message]:
        """Teacher messages as this peer's losses read them: only the fields its method
        reads, on its device; logits and embeddings in fp32 (they feed the losses),
        feature maps in the autocast dtype (they feed convolutions: casting a bf16 map
        to fp32 only for autocast to cast it back cost two copies of each map a step)."""
        reads = self.method.teacher_fields()
        return [
            m.from_wire().only(reads).to(self.device, torch.float32, maps_dtype=self.autocast_dtype)
            for m in teacher_messages
        ]

    def _critic_step(self, step: int, output: Output, teachers: list[Message]) -> dict[str, float]:
        """The method's ``extras_step``: one update of its critics (AMLN's discriminators)."""
        with self.autocast():
            terms = self.method.extras_step(output, teachers, self.extras)
        if not terms:
            return {}
        self.method.check_declared(terms, self.method.critic_terms, "critic_terms", "extras_step")
        logged = self._finite_floats(step, terms, teachers)
        self.critic_optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        self.critic_optimizer.step()
        return logged

    def _meta_step(
        self, step: int, batch_index: int, inputs: Tensor, targets: Tensor, teachers: list[Message]
    ) -> dict[str, float]:
        """The method's optional ``meta_step`` (L-MCL's meta-learned weights), which
        updates its critics through virtual steps of this peer's network."""
        group = self.optimizer.param_groups[0]
        batch = PeerBatch(
            model=self.model,
            extras=self.extras,
            inputs=inputs,
            targets=targets,
            teachers=teachers,
            batch_index=batch_index,
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
        )
        with self.autocast():
            terms = self.method.meta_step(batch, self.critic_optimizer)
        if not terms:
            return {}
        self.method.check_declared(terms, self.method.critic_terms, "critic_terms", "meta_step")
        return self._finite_floats(step, terms, teachers)

    def diagnostics(self, output, terms: dict[str, Tensor], teachers: list[Message]) -> dict[str, float]:
        """``run.log_grad_norms``: the L2 norm of each loss term's gradient with respect
        to the backbone (``grad_norm/<term>``; 0 for a declared term that is switched
        off), the RMS of each block's features (``feat_rms/b<k>``) and the method's own
        diagnostics (AMLN: the discriminators' accuracy per block). Costs one extra
        backward pass per term; the driver averages every value over the epoch."""
        backbone = [p for p in self.model.parameters() if p.requires_grad]
        found: dict[str, float] = {}
        for name in sorted(self.method.supervised_terms | self.method.distillation_terms):
            if name not in terms or not terms[name].requires_grad:
                found[f"grad_norm/{name}"] = 0.0
                continue
            grads = torch.autograd.grad(terms[name], backbone, retain_graph=True, allow_unused=True)
            found[f"grad_norm/{name}"] = float(
                torch.linalg.vector_norm(
                    torch.stack(
                        [torch.linalg.vector_norm(g.float()) for g in grads if g is not None] or [torch.zeros(())]
                    )
                )
            )
        with torch.no_grad():
            for k, block in enumerate(output.blocks):
                found[f"feat_rms/b{k}"] = float(block.float().pow(2).mean().sqrt())
            with self.autocast():  # as in losses: teacher maps come in the autocast dtype
                found |= self.method.diagnostics(output, teachers, self.extras)
        return found

    def _check_teachers(self, step: int, messages: tuple[Message, ...]) -> None:
        epoch, _ = self.data.plan.locate(step)
        expected = self.pairing.teachers(self.index, self.size, epoch)
        got = tuple(m.source for m in messages)
        if got != expected or any(m.step != step for m in messages):
            raise RuntimeError(
                f"peer {self.index} step {step}: expected messages from peers {expected} "
                f"at step {step}, got {[(m.source, m.step) for m in messages]}"
            )

    def _finite_floats(self, step: int, terms: dict[str, Tensor], teachers: list[Message]) -> dict[str, float]:
        """Loss values as floats (one device sync); raises on NaN or inf, naming the
        teachers whose messages were already non-finite (the peer to look at)."""
        values = torch.stack([v.detach().float() for v in terms.values()]).tolist()
        for name, number in zip(terms, values):
            if not math.isfinite(number):
                bad = tuple(m.source for m in teachers if not all(t.isfinite().all() for t in m.tensors()))
                raise NonFiniteLossError(self.index, step, name, number, bad)
        return dict(zip(terms, values))

    def finish_epoch(self, epoch: int) -> None:
        """End of (0-based) ``epoch``: re-estimate BN statistics, advance the schedule.

        BatchNorm's running averages lag behind weights that move fast (early
        training, and AMLN's adversarial term, which peers partly satisfy through
        batch statistics). "Precise BN" (Wu & Johnson 2021) recomputes them at the
        current weights from the epoch's last ``run.precise_bn_batches`` training
        batches; training itself never reads them, so the trajectory is unchanged.
        """
        count = min(self.config.run.precise_bn_batches, self.data.plan.steps_per_epoch)
        if count:
            end = (epoch + 1) * self.data.plan.steps_per_epoch
            batches = (self.batch_on_device(self.data.train_batch(step)[0]) for step in range(end - count, end))
            with torch.no_grad(), self.autocast():
                torch.optim.swa_utils.update_bn(batches, self.model)
        self.scheduler.step()

    # --------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, split: str = "test") -> tuple[dict[str, float], Tensor, Tensor]:
        """Top-1, top-5 and loss on a held-out split, plus the class probabilities and
        labels (for the cohort's ensemble accuracy)."""
        self.model.eval()
        probabilities, labels, loss_sum = [], [], 0.0
        for x, y in self.data.eval_split(split).eval_batches():
            x, y = self.batch_on_device(x), y.to(self.device)
            with self.autocast():
                logits = self.model(x).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            probabilities.append(logits.softmax(1).cpu())
            labels.append(y.cpu())
        probs, targets = torch.cat(probabilities), torch.cat(labels)
        metrics = topk_accuracy(probs, targets) | {"loss": loss_sum / len(targets)}
        return metrics, probs, targets

    # ------------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly (weights, optimizers, schedule, RNG),
        all on CPU. ``load_state`` moves optimizer state back to the parameters' device."""
        return on_cpu(
            {
                "model": self.model.state_dict(),
                "extras": self.extras.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "critic_optimizer": None if self.critic_optimizer is None else self.critic_optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            }
        )

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.extras.load_state_dict(state["extras"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self._pending = None


def topk_accuracy(probabilities: Tensor, targets: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (top-k capped at the number of classes)."""
    k = min(5, probabilities.shape[1])
    top = probabilities.topk(k, dim=1).indices
    hits = top == targets.unsqueeze(1)
    return {"top1": float(hits[:, 0].float().mean()), "top5": float(hits.any(1).float().mean())}
