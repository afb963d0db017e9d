"""Speed options: memory format, precision, compile. Each loads, validates, trains,
and keeps its promise (layouts end to end, fp32 losses, auto precision)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cohort.config import ConfigError, load_config
from cohort.methods import functional as L
from cohort.methods.base import NHWC, Message
from cohort.peer import Peer, resolve_precision

from helpers import synthetic_config


@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_layout_and_precision_keys_train_with_finite_losses(memory_format, precision):
    config = synthetic_config(
        None, "method.name=amln", f"run.memory_format={memory_format}", f"run.precision={precision}"
    )
    learner, teacher = Peer(0, config), Peer(1, config)
    wanted = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    convs = [m.weight for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=wanted) for w in convs)
    message = teacher.publish(0)
    blocks = message.from_wire().blocks
    if memory_format == "channels_last":
        assert all(isinstance(b, NHWC) for b in message.blocks)  # crossed as NHWC arrays
        assert all(b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous() for b in blocks)
    else:
        assert all(isinstance(b, np.ndarray) and b.flags["C_CONTIGUOUS"] for b in message.blocks)
    learner.publish(0)
    expected = torch.bfloat16 if resolve_precision(precision, torch.device("cpu")) == "bf16" else torch.float32
    assert learner._pending[1].logits.dtype == expected  # the forward pass ran under that autocast
    terms = learner.learn(0, message)
    assert all(math.isfinite(v) for v in terms.values())


def test_a_channels_last_message_crosses_the_wire_without_changing_values():
    feature = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    logits = torch.randn(4, 10)
    wire = Message(0, 3, logits=logits, blocks=(feature,)).to("cpu", torch.bfloat16).to_wire()
    assert isinstance(wire.blocks[0], NHWC) and wire.blocks[0].array.flags["C_CONTIGUOUS"]
    back = wire.from_wire()
    assert back.blocks[0].shape == (4, 8, 5, 5) and back.blocks[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(back.blocks[0].float(), feature.to(torch.bfloat16).float(), rtol=0, atol=0)
    torch.testing.assert_close(back.logits.float(), logits.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_losses_are_computed_in_float32_under_bf16():
    from cohort.methods import functional as L

    logits = torch.randn(8, 10).to(torch.bfloat16)
    assert L.cross_entropy(logits, torch.zeros(8, dtype=torch.long)).dtype == torch.float32
    assert L.softened_kl(logits, logits.flip(0), 3.0, "student_teacher").dtype == torch.float32
    assert L.alignment_distance(logits, logits.flip(0)).dtype == torch.float32


def test_auto_precision_is_bf16_only_where_the_device_has_it(monkeypatch):
    import cohort.peer as peer

    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(peer, "native_bf16", lambda device: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(peer, "native_bf16", lambda device: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"


def test_unknown_memory_format_is_a_one_line_error():
    with pytest.raises(
        ConfigError, match=r"run.memory_format: 'channel_last' is not valid \(did you mean 'channels_last'"
    ):
        load_config(None, ["run.memory_format=channel_last"])


@pytest.mark.slow
def test_a_compiled_peer_trains_and_keeps_its_parameter_names():
    config = synthetic_config(None, "method.name=dml", "run.compile=true")
    learner, teacher = Peer(0, config), Peer(1, config)
    plain = Peer(0, synthetic_config(None, "method.name=dml"))
    assert learner.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    assert learner.model.state_dict().keys() == plain.model.state_dict().keys()  # checkpoints stay compatible
    message = teacher.publish(0)
    learner.publish(0)
    assert all(math.isfinite(v) for v in learner.learn(0, message).values())


def test_alignment_containers_compute_in_float32_under_bf16_autocast():
    """Their strided depthwise conv is many times slower in bf16 on CPU (docs/benchmarks.md)."""
    from cohort.methods.extras import AlignmentContainer
    from cohort.models.base import BlockInfo

    container = AlignmentContainer(BlockInfo(channels=8, stride=1), BlockInfo(channels=16, stride=4))
    feature = torch.randn(2, 8, 12, 12).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = container(feature)
    assert out.dtype == torch.float32 and out.shape == (2, 16, 3, 3)
    torch.testing.assert_close(out, container(feature.float()), rtol=0, atol=0)


def test_alignment_distance_keeps_a_channels_last_gradient_and_its_value():
    """L_F on channels-last maps reads them in memory order: the same value, to the bit,
    as F.mse_loss on the (N, C, H, W) views, and a channels-last gradient (mse_loss's
    own is plain contiguous, which the container's conv backward would convert)."""
    torch.manual_seed(0)
    aligned = torch.randn(8, 16, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    target = torch.randn(8, 16, 7, 7).to(memory_format=torch.channels_last)
    distance = L.alignment_distance(aligned, target)
    (gradient,) = torch.autograd.grad(distance, aligned)
    reference = F.mse_loss(aligned, target)
    (reference_gradient,) = torch.autograd.grad(reference, aligned)
    assert torch.equal(distance, reference) and torch.equal(gradient, reference_gradient)
    assert gradient.is_contiguous(memory_format=torch.channels_last) and not gradient.is_contiguous()
    plain = torch.randn(8, 16, 7, 7, requires_grad=True)
    (plain_gradient,) = torch.autograd.grad(L.alignment_distance(plain, target.contiguous()), plain)
    assert plain_gradient.is_contiguous()
