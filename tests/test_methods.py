"""The distillation methods: golden values, invariants, every method x pairing x N."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from cohort.config import ConfigError, load_config
from cohort.methods import Message, build_method, list_methods
from cohort.methods import functional as L
from cohort.methods.base import rampup_weight
from cohort.methods.extras import AlignmentContainer, FeatureDiscriminator
from cohort.models import create_model, list_models, model_block_info
from cohort.models.base import Output
from cohort.pairing import list_pairings
from cohort.peer import Peer

from helpers import REPO, synthetic_config

GOLDEN = REPO / "tests" / "golden" / "losses.json"
# fp32 on different CPUs: MCL's and L-MCL's soft_vcl, a KL between two nearly equal
# softened distributions, differs by up to 6e-5 relative between an AMD EPYC and an
# Intel Xeon with AMX; every other term by under 2e-6, inside the default 1e-5
GOLDEN_REL = {"soft_vcl": 2e-4}
METHOD_VARIANTS = {
    "vanilla": ["method.name=vanilla"],
    "dml": ["method.name=dml"],
    "dml_student_teacher": ["method.name=dml", "method.kl_direction=student_teacher"],
    "amln": ["method.name=amln"],
    "amln_printed": [  # eq. 1-9 as printed: the values the default had before the defaults changed
        "method.name=amln",
        "method.kl_direction=student_teacher",
        "method.beta=1",
        "method.adv_weight=1",
        "method.block_resolution=block",
    ],
    # D and C on blocks as they are: the default's values before block_resolution became final
    "amln_block_resolution": ["method.name=amln", "method.block_resolution=block"],
    "amln_case_c": ["method.name=amln", "method.adversarial=false", "method.block_resolution=block"],
    "amln_case_d": ["method.name=amln", "method.feature=false", "method.block_resolution=block"],
    "amln_beta_2": ["method.name=amln", "method.beta=2", "method.block_resolution=block"],
    "afd": ["method.name=afd"],
    "mcl": ["method.name=mcl"],
    "lmcl": ["method.name=lmcl"],
}


def fixed_inputs(seed: int = 0):
    """A peer's output and one teacher's message with resnet20's block layout."""
    g = torch.Generator().manual_seed(seed)
    layout = model_block_info("resnet20")

    def output():
        blocks = tuple(torch.randn(4, b.channels, 16 // b.stride, 16 // b.stride, generator=g).relu() for b in layout)
        return Output(torch.randn(4, 10, generator=g) * 2, blocks, blocks[-1].mean((2, 3)))

    own, theirs = output(), output()
    targets = torch.randint(10, (4,), generator=g)
    return layout, own, Message(source=1, step=0, logits=theirs.logits, blocks=theirs.blocks), targets


def compute_terms(overrides: list[str]) -> dict[str, float]:
    method = build_method(load_config(None, overrides).method)
    layout, own, message, targets = fixed_inputs()
    own_model = {"model": create_model("resnet20", 10)} if method.extras_need_model else {}  # L-MCL's branches
    torch.manual_seed(0)
    extras = method.build_extras(layout, {1: layout}, 10, **own_model)
    teacher = Output(message.logits, message.blocks, message.blocks[-1].mean((2, 3)))
    message = method.message(teacher, extras, 1, 0)
    terms = method.losses(own, targets, [message], extras) | method.extras_step(own, [message], extras)
    return {k: float(v.detach()) for k, v in terms.items()}


@pytest.mark.parametrize("variant", sorted(METHOD_VARIANTS))
def test_loss_terms_match_golden_values(variant):
    got = compute_terms(METHOD_VARIANTS[variant])
    if os.environ.get("COHORT_UPDATE_GOLDEN"):
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps(stored | {variant: got}, indent=2, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())[variant]
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=GOLDEN_REL.get(name, 1e-5), abs=1e-7), name


def test_golden_file_covers_every_method():
    stored = json.loads(GOLDEN.read_text())
    assert {v.split("_")[0] for v in stored} >= set(list_methods())


def test_ablation_switches_select_terms():
    assert set(compute_terms(["method.name=amln"])) == {"ce", "kl", "feat", "adv", "disc"}
    assert set(compute_terms(["method.name=amln", "method.adversarial=false"])) == {"ce", "kl", "feat"}
    assert set(compute_terms(["method.name=amln", "method.feature=false"])) == {"ce", "kl", "adv", "disc"}
    off = ["method.name=amln", "method.kl=false", "method.feature=false", "method.adversarial=false"]
    assert set(compute_terms(off)) == {"ce"}  # Table 6 case A


def test_beta_scales_only_the_feature_term():
    one, two = compute_terms(["method.beta=1"]), compute_terms(["method.beta=2"])
    assert two["feat"] == pytest.approx(2 * one["feat"])
    assert two["kl"] == pytest.approx(one["kl"]) and two["adv"] == pytest.approx(one["adv"])


def test_adv_weight_scales_only_the_adversarial_term():
    one, tenth = compute_terms(["method.adv_weight=1"]), compute_terms(["method.adv_weight=0.1"])
    assert tenth["adv"] == pytest.approx(0.1 * one["adv"])
    assert tenth["kl"] == pytest.approx(one["kl"]) and tenth["feat"] == pytest.approx(one["feat"])


def test_block_reduce_mean_divides_the_block_sums_by_the_number_of_blocks():
    summed, mean = compute_terms([]), compute_terms(["method.block_reduce=mean"])
    assert mean["feat"] == pytest.approx(summed["feat"] / 3) and mean["adv"] == pytest.approx(summed["adv"] / 3)
    assert mean["kl"] == pytest.approx(summed["kl"])


def test_sample_feature_norm_is_scale_free_and_bounded():
    a, t = torch.randn(4, 8, 3, 3), torch.randn(4, 8, 3, 3)
    distance = L.alignment_distance(a, t, "sample")
    assert 0 <= float(distance) <= 4
    assert float(L.alignment_distance(10 * a, 0.1 * t, "sample")) == pytest.approx(float(distance), rel=1e-5)
    assert float(L.alignment_distance(a, a, "sample")) == pytest.approx(0, abs=1e-6)
    assert compute_terms(["method.feature_norm=sample"])["feat"] != pytest.approx(compute_terms([])["feat"])


def test_log_gan_form_is_cross_entropy_on_the_discriminator_scores():
    own, theirs = torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([[-1.0, 1.0], [0.0, 3.0]])
    fool = -torch.log_softmax(own, 1)[:, 1].mean()
    assert float(L.log_fooling_loss(own)) == pytest.approx(float(fool))
    d = -torch.log_softmax(own, 1)[:, 0].mean() - torch.log_softmax(theirs, 1)[:, 1].mean()
    assert float(L.log_discriminator_loss(own, theirs)) == pytest.approx(float(d))
    assert compute_terms(["method.gan_form=log"])["adv"] != pytest.approx(compute_terms([])["adv"])


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
def test_kl_is_zero_for_identical_peers(direction):
    logits = torch.randn(8, 10)
    assert float(L.softened_kl(logits, logits.clone(), 3.0, direction)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.softened_kl(logits, logits.flip(0), 3.0, direction)) > 0.01


def test_kl_directions_match_their_formulas():
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    ps, pt = (s / T).softmax(1), (t / T).softmax(1)
    forward = (pt * (pt.log() - ps.log())).sum(1).mean() * T**2  # KL(teacher || student)
    reverse = (ps * (ps.log() - pt.log())).sum(1).mean() * T**2  # KL(student || teacher), AMLN eq. 7
    assert float(L.softened_kl(s, t, T, "teacher_student")) == pytest.approx(float(forward), rel=1e-5)
    assert float(L.softened_kl(s, t, T, "student_teacher")) == pytest.approx(float(reverse), rel=1e-5)


def test_discriminator_separates_two_feature_distributions():
    torch.manual_seed(0)
    disc = FeatureDiscriminator({16}, outputs=2)
    optimizer = torch.optim.Adam(disc.parameters(), lr=1e-3)

    def sample(n):
        own = torch.randn(n, 16, 8, 8)
        teacher = torch.randn(n, 16, 8, 8) * 0.5 + 1.0
        return own, teacher

    for _ in range(150):
        own, teacher = sample(32)
        loss = L.discriminator_loss(disc(own), disc(teacher))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    own, teacher = sample(200)
    with torch.no_grad():
        correct = (L.teacher_probability(disc(own)) < 0.5).sum() + (L.teacher_probability(disc(teacher)) > 0.5).sum()
    assert float(correct) / 400 > 0.9


def test_discriminator_takes_both_widths_of_a_heterogeneous_pair():
    disc = FeatureDiscriminator({16, 32}, outputs=2)
    assert disc(torch.randn(2, 16, 8, 8)).shape == disc(torch.randn(2, 32, 8, 8)).shape == (2, 2)


@pytest.mark.parametrize(("width", "size"), [(16, 28), (32, 14), (64, 7)])
def test_folded_discriminator_pass_is_the_same_function_with_the_same_gradients(width, size):
    torch.manual_seed(0)
    disc = FeatureDiscriminator({width}, outputs=2)
    with torch.no_grad():
        disc.reduce[str(width)].bias.uniform_(-1, 1)  # a sigma bias that the border padding must not see
    features = torch.randn(6, width, size, size).relu().to(memory_format=torch.channels_last)
    plain, folded = disc(features), disc.folded_scores(features)
    assert torch.allclose(plain, folded, atol=1e-6)
    plain_grads = torch.autograd.grad(plain.square().sum(), list(disc.parameters()))
    folded_grads = torch.autograd.grad(folded.square().sum(), list(disc.parameters()))
    for a, b in zip(plain_grads, folded_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    own, theirs = disc.score_pair(features[:3], features[3:])
    assert torch.allclose(torch.cat([own, theirs]), plain, atol=1e-6)


def test_score_pair_folds_only_where_no_gradient_flows_back_into_the_features(monkeypatch):
    disc = FeatureDiscriminator({16}, outputs=2).to(memory_format=torch.channels_last)  # as a Peer holds it
    folded = []
    original = FeatureDiscriminator.folded_scores
    monkeypatch.setattr(FeatureDiscriminator, "folded_scores", lambda self, f: folded.append(1) or original(self, f))
    own = torch.randn(4, 16, 12, 12).to(torch.bfloat16)  # bf16 own features beside fp32 teacher ones, as in learn
    theirs = torch.randn(4, 16, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        update = disc.score_pair(own, theirs)  # D's own update: the folded pass
    assert folded == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = disc(torch.cat([own.float(), theirs]))
    assert torch.allclose(torch.cat(update).float(), plain.float(), atol=0.05)  # bf16 rounding differs
    wanted = own.float().requires_grad_()
    scores, _ = disc.score_pair(wanted, theirs)  # a gradient into the features: the two-conv pass
    assert folded == [1]
    scores.sum().backward()
    assert wanted.grad is not None and wanted.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("precision", "transport", "maps"), [("bf16", "auto", "bfloat16"), ("fp32", "bfloat16", "float32")]
)
def test_teacher_maps_reach_the_losses_in_the_compute_dtype_and_learn_as_float32_maps_did(
    monkeypatch, precision, transport, maps
):
    """Teacher feature maps arrive in the dtype the learner's convolutions run in (no cast
    to fp32 and back under bf16 autocast); logits in fp32. Two steps of learning are bit
    for bit what fp32 maps gave (losses, weights, D's and the optimizers' states), since
    autocast cast those to the same bf16 values."""

    def learned(keep_maps_in_float32: bool) -> tuple[list[dict[str, float]], list[torch.Tensor], list[Message]]:
        overrides = ["method.name=amln", f"run.precision={precision}", f"cohort.transport_dtype={transport}"]
        config = synthetic_config(None, *overrides)
        learner, teacher = Peer(0, config), Peer(1, config)
        seen: list[Message] = []
        losses = learner.method.losses
        monkeypatch.setattr(learner.method, "losses", lambda o, y, ts, e: seen.extend(ts) or losses(o, y, ts, e))
        original = Message.to
        if keep_maps_in_float32:  # the learner as it was: every tensor to fp32
            monkeypatch.setattr(Message, "to", lambda self, device, dtype, **_: original(self, device, dtype))
        logged = []
        for step in range(2):
            message = teacher.publish(step)
            learner.publish(step)
            logged.append(learner.learn(step, message))
        monkeypatch.setattr(Message, "to", original)
        optimizers = [learner.optimizer.state_dict()["state"], learner.critic_optimizer.state_dict()["state"]]
        state = [*learner.model.state_dict().values(), *learner.extras.state_dict().values()]
        state += [t for o in optimizers for entry in o.values() for t in entry.values() if torch.is_tensor(t)]
        return logged, state, seen

    logged, state, seen = learned(keep_maps_in_float32=False)
    assert {b.dtype for b in seen[0].blocks} == {getattr(torch, maps)}
    assert seen[0].logits.dtype == torch.float32
    reference_logged, reference_state, seen = learned(keep_maps_in_float32=True)
    assert {b.dtype for b in seen[0].blocks} == {torch.float32}
    assert logged == reference_logged
    assert len(state) == len(reference_state) and all(map(torch.equal, state, reference_state))


AMLN_FINAL = build_method(load_config(None, ["method.name=amln", "method.block_resolution=final"]).method)
EQUAL_BLOCK_PAIRS = [
    (a, b)
    for a, b in itertools.product(list_models(), repeat=2)
    if len(model_block_info(a)) == len(model_block_info(b))
]


@pytest.mark.parametrize("size", [28, 32])
def test_alignment_container_reaches_the_teachers_final_shape(size):
    for own_name, teacher_name in EQUAL_BLOCK_PAIRS:
        target = model_block_info(teacher_name)[-1]
        side = target.spatial_size(size)
        for block in model_block_info(own_name):
            container = AlignmentContainer(block, target)
            own_side = block.spatial_size(size)
            out = container(torch.zeros(2, block.channels, own_side, own_side))  # no pooling fallback
            assert out.shape == (2, target.channels, side, side), (own_name, teacher_name, block)
        own = model_block_info(own_name)  # block_resolution final: every block pooled to the final size
        extras = AMLN_FINAL.build_extras(own, {1: model_block_info(teacher_name)}, 10)
        final_side = own[-1].spatial_size(size)
        for block, container in zip(own, extras["align"]["t1"], strict=True):
            out = container(torch.zeros(2, block.channels, final_side, final_side))  # no pooling fallback
            assert out.shape == (2, target.channels, side, side), (own_name, teacher_name, block, "final")


def test_messages_publish_only_what_the_method_reads():
    layout, own, _, _ = fixed_inputs()
    dml = build_method(load_config(None, ["method.name=dml"]).method).message(own, {}, 0, 0)
    afd = build_method(load_config(None, ["method.name=afd"]).method).message(own, {}, 0, 0)
    amln = build_method(load_config(None, ["method.name=amln"]).method).message(own, {}, 0, 0)
    assert set(dml.fields) == {"logits"} and dml.logits is not None
    with pytest.raises(KeyError, match="has no 'blocks' \\(it carries: logits\\)"):
        _ = dml.blocks
    assert len(afd.blocks) == 1 and afd.blocks[0].shape == own.blocks[-1].shape
    assert len(amln.blocks) == 3


def test_rampup_weight():
    assert rampup_weight(0.0, 1.0) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert rampup_weight(0.5, 1.0) < rampup_weight(0.9, 1.0) < 1.0
    assert rampup_weight(1.0, 1.0) == rampup_weight(7.0, 1.0) == rampup_weight(0.0, 0.0) == 1.0
    method = build_method(load_config(None, ["method.name=dml", "method.rampup_min_steps=0"]).method)
    terms = {"ce": torch.tensor(2.0), "kl": torch.tensor(2.0)}
    ramped = method.ramp(terms, 5, 10)  # half of a 1-epoch ramp
    assert float(ramped["ce"]) == 2.0 and float(ramped["kl"]) == pytest.approx(2.0 * rampup_weight(0.5, 1.0))


@pytest.mark.parametrize(
    ("overrides", "steps_per_epoch", "length"),
    [
        (["method.rampup_min_steps=0"], 14, 14.0),  # 1 epoch
        ([], 14, 140.0),  # DML's default floor
        ([], 280, 280.0),  # ... and its 1 epoch on a longer one
        (["method.rampup_min_steps=140"], 14, 140.0),  # the floor wins on a short epoch
        (["method.rampup_min_steps=140"], 280, 280.0),  # the epochs win on a long one
        (["method.rampup_epochs=0", "method.rampup_min_steps=30"], 14, 30.0),
        (["method.rampup_epochs=0", "method.rampup_min_steps=0"], 14, 0.0),  # off
    ],
)
def test_rampup_lasts_the_longer_of_epochs_and_min_steps(overrides, steps_per_epoch, length):
    config = load_config(None, ["method.name=dml", *overrides]).method
    assert config.rampup_steps(steps_per_epoch) == length
    method = build_method(config)
    terms = {"ce": torch.tensor(1.0), "kl": torch.tensor(1.0)}
    halfway = method.ramp(terms, length / 2, steps_per_epoch)
    assert float(halfway["kl"]) == pytest.approx(rampup_weight(0.5, 1.0) if length else 1.0)
    assert float(method.ramp(terms, length, steps_per_epoch)["kl"]) == 1.0


def test_vanilla_publishes_nothing():
    _, own, _, _ = fixed_inputs()
    message = build_method(load_config(None, ["method.name=vanilla"]).method).message(own, {}, 0, 0)
    assert message.tensors() == []


@pytest.mark.parametrize("method", list_methods())
def test_every_term_a_method_returns_is_declared(method):
    config = synthetic_config(None, f"method.name={method}")
    learned = run_steps(config, steps=1)[0]
    declared = build_method(config.method)
    names = declared.supervised_terms | declared.distillation_terms | declared.critic_terms
    assert set(learned) - {"loss", "top1"} <= names


def test_an_undeclared_term_is_an_error_not_a_silently_ramped_term():
    from cohort.methods.dml import DML

    class Sneaky(DML):
        def losses(self, output, targets, teachers, extras):
            return super().losses(output, targets, teachers, extras) | {"ce_aux": output.logits.sum() * 0}

    config = synthetic_config(None, "method.name=dml")
    learner, teacher = Peer(0, config), Peer(1, config)
    learner.method = Sneaky(config.method)
    message = teacher.publish(0)
    learner.publish(0)
    with pytest.raises(TypeError, match=r"Sneaky.losses returned undeclared term\(s\) \['ce_aux'\]; declare each in"):
        learner.learn(0, message)


@pytest.mark.parametrize("reserved", ["loss", "top1"])
def test_a_term_named_like_a_logged_value_is_refused_when_the_method_is_defined(reserved):
    from cohort.methods.base import Method

    with pytest.raises(TypeError, match=f"may not be named \\['{reserved}'\\]"):
        type("Clash", (Method,), {"distillation_terms": frozenset({reserved})})


# ---------------------------------------------------------------- peers in a cohort


def run_steps(config, steps: int = 2, peers: list[Peer] | None = None) -> list[dict[str, float]]:
    """Train a cohort (``peers``, or fresh ones from ``config``) for ``steps`` steps; the last step's terms."""
    n = config.cohort.size
    peers = peers or [Peer(j, config) for j in range(n)]
    results = []
    for step in range(steps):
        epoch, _ = peers[0].data.plan.locate(step)
        messages = [p.publish(step) for p in peers]
        results = [p.learn(step, *[messages[t] for t in p.pairing.teachers(p.index, n, epoch)]) for p in peers]
    return results


COMBINATIONS = list(itertools.product(list_methods(), list_pairings(), [2, 3]))
# L-MCL's meta step (a dozen steps' worth of compute, at step 0) is tested in test_lmcl.py
# and in the heterogeneous case below; the many-combination tests skip it to stay fast.
WITHOUT_META = {"lmcl": ["method.meta_every=0"]}


def method_keys(method: str) -> list[str]:
    return [f"method.name={method}", *WITHOUT_META.get(method, [])]


@pytest.mark.parametrize("method,pairing,size", COMBINATIONS, ids=["-".join(map(str, c)) for c in COMBINATIONS])
def test_every_method_pairing_and_size_trains_with_finite_losses(method, pairing, size):
    config = synthetic_config(None, *method_keys(method), f"cohort.pairing={pairing}", f"cohort.size={size}")
    results = run_steps(config)
    assert len(results) == size
    for terms in results:
        assert "ce" in terms and all(torch.isfinite(torch.tensor(v)) for v in terms.values())


@pytest.mark.parametrize("method", ["amln", "afd", "dml", "lmcl"])
def test_heterogeneous_cohort(method):
    models = "cohort.models=[resnet20,wrn_16_1,resnet32]"
    config = synthetic_config(None, f"method.name={method}", "cohort.size=3", models)
    assert all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in run_steps(config))


@pytest.mark.parametrize("method", ["afd", "dml"])
def test_methods_without_block_alignment_accept_different_block_counts(method):
    config = synthetic_config(None, f"method.name={method}", "cohort.models=[resnet20,resnet18]")
    assert len(run_steps(config, steps=1)) == 2


@pytest.mark.parametrize("method", list_methods())
def test_learning_touches_no_other_peer(method):
    config = synthetic_config(None, *method_keys(method), "cohort.size=3")
    peers = [Peer(j, config) for j in range(3)]
    messages = [p.publish(0) for p in peers]
    for message in messages:
        assert message.tensors() == []  # on the wire: numpy arrays, which cannot hold a graph
        assert all(not t.requires_grad and t.grad_fn is None for t in message.from_wire().tensors())
    before = [{k: v.clone() for k, v in p.model.state_dict().items()} for p in peers]
    extras_before = [{k: v.clone() for k, v in p.extras.state_dict().items()} for p in peers]
    peers[0].learn(0, *[messages[t] for t in peers[0].pairing.teachers(0, 3, 0)])
    for j in (1, 2):
        assert all(p.grad is None for p in peers[j].model.parameters())
        assert all(p.grad is None for p in peers[j].extras.parameters())
        assert all(torch.equal(v, before[j][k]) for k, v in peers[j].model.state_dict().items())
        assert all(torch.equal(v, extras_before[j][k]) for k, v in peers[j].extras.state_dict().items())
    changed = any(not torch.equal(v, before[0][k]) for k, v in peers[0].model.state_dict().items())
    assert changed


def test_learn_rejects_messages_from_the_wrong_teacher():
    config = synthetic_config(None, "cohort.size=3")
    peers = [Peer(j, config) for j in range(3)]
    messages = [p.publish(0) for p in peers]
    with pytest.raises(RuntimeError, match="expected messages from peers"):
        peers[0].learn(0, messages[2])  # cyclic: peer 0 learns from peer 1


def test_peers_start_from_different_weights():
    config = synthetic_config(None)
    a, b = Peer(0, config), Peer(1, config)
    assert not torch.equal(next(a.model.parameters()), next(b.model.parameters()))
    assert torch.equal(next(a.model.parameters()), next(Peer(0, config).model.parameters()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wire_form_round_trips_exactly_and_halves_bytes_in_bfloat16(dtype):
    config = synthetic_config(None, "method.name=amln", f"cohort.transport_dtype={dtype}")
    peer = Peer(0, config)
    message = peer.publish(0).from_wire()
    assert {t.dtype for t in message.tensors()} == {getattr(torch, dtype)}
    again = message.to_wire().from_wire()
    assert all(torch.equal(a, b) for a, b in zip(message.tensors(), again.tensors()))
    full = Peer(0, synthetic_config(None, "method.name=amln", "cohort.transport_dtype=float32")).publish(0).from_wire()
    assert message.nbytes == full.nbytes // (2 if dtype == "bfloat16" else 1)
    assert message.nbytes == sum(4 * b.numel() for b in full.blocks) // (2 if dtype == "bfloat16" else 1) + (
        full.logits.numel() * message.logits.element_size()
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_auto_transport_sends_tensors_as_computed_and_learns_exactly_as_float32(precision):
    """transport_dtype auto (the default) casts nothing: under bf16 autocast the blocks
    and logits travel as bf16 (half the bytes) and the learner's losses equal those
    from float32 transport bit for bit, since float32 held the same bf16 values."""
    losses, sizes = {}, {}
    for transport in ("auto", "float32"):
        overrides = ["method.name=amln", f"run.precision={precision}", f"cohort.transport_dtype={transport}"]
        config = synthetic_config(None, *overrides)
        learner, teacher = Peer(0, config), Peer(1, config)
        message = teacher.publish(0)
        sizes[transport] = message.from_wire().nbytes
        learner.publish(0)
        losses[transport] = learner.learn(0, message)
        if transport == "auto":
            computed = torch.bfloat16 if precision == "bf16" else torch.float32
            assert {t.dtype for t in message.from_wire().tensors()} == {computed}
    assert losses["auto"] == losses["float32"]
    assert sizes["auto"] == sizes["float32"] // (2 if precision == "bf16" else 1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: teacher maps reach D's diagnostics in bf16
@pytest.mark.parametrize("switched_off", ["feature", "adversarial"])
def test_grad_norm_instruments_log_every_term_and_zero_for_a_switched_off_one(switched_off, precision):
    overrides = ["method.name=amln", "run.log_grad_norms=true", f"method.{switched_off}=false"]
    config = synthetic_config(None, *overrides, f"run.precision={precision}")
    learned = run_steps(config, steps=2)[0]
    off = {"feature": "feat", "adversarial": "adv"}[switched_off]
    assert learned[f"grad_norm/{off}"] == 0.0
    for term in {"ce", "kl", "feat", "adv"} - {off}:
        assert learned[f"grad_norm/{term}"] > 0, term
    assert all(learned[f"feat_rms/b{k}"] > 0 for k in range(3))
    if switched_off == "feature":
        assert all(0 <= learned[f"disc_acc/b{k}"] <= 1 for k in range(3))
    else:
        assert not any(name.startswith("disc_acc") for name in learned)


def test_grad_norms_are_off_by_default():
    learned = run_steps(synthetic_config(None, "method.name=dml"), steps=1)[0]
    assert not any(name.startswith(("grad_norm", "feat_rms")) for name in learned)


def test_the_grad_norm_of_ce_is_the_norm_of_the_ce_gradient():
    config = synthetic_config(None, "method.name=vanilla", "run.log_grad_norms=true")
    peer = Peer(0, config)
    output = peer.model(peer.batch_on_device(peer.data.train_batch(0)[0]))
    targets = peer.data.train_batch(0)[1]
    ce = L.cross_entropy(output.logits, targets)
    expected = torch.linalg.vector_norm(
        torch.cat([g.flatten() for g in torch.autograd.grad(ce, list(peer.model.parameters()), retain_graph=True)])
    )
    found = peer.diagnostics(output, {"ce": ce}, [])
    assert found["grad_norm/ce"] == pytest.approx(float(expected), rel=1e-5)


def test_a_method_must_publish_what_its_losses_read():
    from cohort.methods.base import Method

    with pytest.raises(TypeError, match=r"read \['blocks'\].*which it does not publish"):

        class ReadsUnpublished(Method):  # noqa: F841 - defining it is the test
            publishes = ("logits",)
            reads = ("logits", "blocks")


def test_a_message_missing_a_declared_field_is_an_error_at_publish():
    _, own, _, _ = fixed_inputs()
    method = build_method(load_config(None, ["method.name=dml"]).method)
    method.message = lambda output, extras, source, step: Message(source, step)  # publishes nothing
    with pytest.raises(TypeError, match=r"published \[\], but the class declares publishes = \('logits',\)"):
        method.checked_message(own, {}, 0, 0)


def test_losses_see_only_the_fields_a_method_declares_it_reads():
    """Peer.learn hands losses teacher messages cut to ``reads``: a loss that reads an
    undeclared field fails with the field's name, not with a silent extra dependency."""
    _, own, message, targets = fixed_inputs()
    method = build_method(load_config(None, ["method.name=dml"]).method)
    cut = message.only(method.teacher_fields())
    assert set(cut.fields) == {"logits"}
    with pytest.raises(KeyError, match="has no 'blocks'"):
        _ = cut.blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_named_field_crosses_the_wire(dtype):
    """Transport works for every field, not only logits and blocks."""
    g = torch.Generator().manual_seed(0)
    embedding = torch.nn.functional.normalize(torch.randn(8, 128, generator=g), dim=1)
    stages = (torch.randn(8, 16, generator=g), torch.randn(8, 32, generator=g))
    feature = torch.randn(8, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    sent = Message(2, 7, embedding=embedding, stages=stages, map=feature).to("cpu", dtype)
    back = sent.to_wire().from_wire()
    assert (back.source, back.step, set(back.fields)) == (2, 7, {"embedding", "stages", "map"})
    assert torch.equal(back["embedding"], sent["embedding"]) and back["embedding"].dtype == dtype
    assert all(torch.equal(a, b) for a, b in zip(back["stages"], sent["stages"], strict=True))
    assert back["map"].is_contiguous(memory_format=torch.channels_last)
    assert sent.nbytes == sent.to_wire().nbytes == (8 * 128 + 8 * 48 + 8 * 100) * (4 if dtype == torch.float32 else 2)


FULL_WEIGHT = ["method.rampup_epochs=0", "method.rampup_min_steps=0"]  # distillation at full weight from step 0


@pytest.mark.parametrize(
    "case,same_as",
    [
        (["method.kl=false", "method.feature=false", "method.adversarial=false"], "vanilla"),  # Table 6 case A
        (["method.feature=false", "method.adversarial=false"], "dml"),  # Table 6 case B
    ],
    ids=["case_a-vanilla", "case_b-dml"],
)
def test_amln_ablation_cases_a_and_b_train_exactly_as_vanilla_and_dml(case, same_as):
    """What lets docs/accuracy.md report Table 6's cases A and B with vanilla's and DML's rows."""

    def weights(*overrides):
        config = synthetic_config(None, *overrides, "data.synthetic.train_size=96", "optim.epochs=2")
        peers = [Peer(j, config) for j in range(config.cohort.size)]
        run_steps(config, 8, peers)
        return [p.model.state_dict() for p in peers]

    shared = {"temperature", "kl_direction", "rampup_epochs", "rampup_min_steps"}  # what case B has in common with DML
    amln_defaults, dml_defaults = (load_config(None, [f"method.name={m}"]).method for m in ("amln", "dml"))
    assert {k: getattr(amln_defaults, k) for k in shared} == {k: getattr(dml_defaults, k) for k in shared}
    ablated = weights("method.name=amln", *case, *FULL_WEIGHT)
    reference = weights(f"method.name={same_as}", *(FULL_WEIGHT if same_as == "dml" else []))
    full_amln = weights("method.name=amln", *FULL_WEIGHT)
    for mine, theirs, other in zip(ablated, reference, full_amln):
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert not all(torch.equal(mine[k], other[k]) for k in mine)  # the comparison can tell methods apart


def test_amln_disc_every_updates_the_discriminators_only_at_every_kth_batch_of_an_epoch():
    config = synthetic_config(None, "method.name=amln", "method.disc_every=3")  # 4 batches an epoch
    peers = [Peer(j, config) for j in range(2)]
    for step in range(6):  # batches 0 1 2 3 | 0 1: D learns at 0, 3, 0
        discs = [{k: v.clone() for k, v in p.extras["disc"].state_dict().items()} for p in peers]
        models = [{k: v.clone() for k, v in p.model.state_dict().items()} for p in peers]
        messages = [p.publish(step) for p in peers]
        logged = [p.learn(step, messages[1 - j]) for j, p in enumerate(peers)]
        due = (step % 4) % 3 == 0
        for p, disc, model, values in zip(peers, discs, models, logged):
            assert ("disc" in values) == due, step
            assert any(not torch.equal(v, disc[k]) for k, v in p.extras["disc"].state_dict().items()) == due, step
            assert any(not torch.equal(v, model[k]) for k, v in p.model.state_dict().items()), step
            assert "adv" in values  # the peer's side of eq. 1 runs every step


def test_disc_every_must_be_a_positive_count():
    with pytest.raises(ConfigError, match="method.disc_every"):
        synthetic_config(None, "method.name=amln", "method.disc_every=0")


def test_amln_final_block_resolution_feeds_d_and_the_containers_pooled_blocks(monkeypatch):
    method = build_method(load_config(None, ["method.name=amln", "method.block_resolution=final"]).method)
    layout, own, raw, targets = fixed_inputs()
    extras = method.build_extras(layout, {1: layout}, 10)
    message = method.message(Output(raw.logits, raw.blocks, raw.blocks[-1].mean((2, 3))), extras, 1, 0)
    assert all(c.depthwise.stride == (1, 1) for c in extras["align"]["t1"])  # no striding left to do
    final = own.blocks[-1].shape[-2:]
    seen = {"d": [], "c": [], "pair": []}
    d_forward, c_forward, pair = (
        FeatureDiscriminator.forward,
        AlignmentContainer.forward,
        FeatureDiscriminator.score_pair,
    )
    monkeypatch.setattr(FeatureDiscriminator, "forward", lambda self, f: seen["d"].append(f) or d_forward(self, f))
    monkeypatch.setattr(
        AlignmentContainer, "forward", lambda self, f, size=None: seen["c"].append(f) or c_forward(self, f, size)
    )
    monkeypatch.setattr(
        FeatureDiscriminator, "score_pair", lambda self, a, b: seen["pair"].append((a, b)) or pair(self, a, b)
    )
    terms = method.losses(own, targets, [message], extras) | method.extras_step(own, [message], extras)
    assert all(torch.isfinite(v) for v in terms.values()) and {"feat", "adv", "disc"} <= set(terms)
    pooled = [torch.nn.functional.adaptive_avg_pool2d(b, final) for b in own.blocks]
    theirs = [torch.nn.functional.adaptive_avg_pool2d(b, final) for b in raw.blocks]
    assert all(torch.equal(got, want) for got, want in zip(message.blocks, theirs))  # the teacher pools once
    assert len(seen["c"]) == len(seen["pair"]) == 3
    assert all(torch.equal(got, want) for got, want in zip(seen["c"], pooled))
    assert all(torch.equal(got, want) for got, want in zip(seen["d"][:3], pooled))  # the peer's side of eq. 1
    assert all(torch.equal(a, p) and torch.equal(b, t) for (a, b), p, t in zip(seen["pair"], pooled, theirs))
    block = build_method(load_config(None, ["method.name=amln", "method.block_resolution=block"]).method)
    assert block.at_resolution(list(own.blocks)) == list(own.blocks)  # the printed form: blocks as they are
    assert all(torch.equal(a, b) for a, b in zip(block.message(own, extras, 0, 0).blocks, own.blocks, strict=True))
