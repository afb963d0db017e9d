"""L-MCL (cohort/methods/lmcl.py): extras, message size, the exact joint-loss gradient
under all_pairs, the meta step's hypergradient against finite differences, and the
exported peer (the backbone with its own classifier, no auxiliary branch)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_mcl_loss import official_lmcl, pair_weight, weighted_total

from cohort.checkpoint import latest_checkpoint, load_peer, read_safetensors
from cohort.config import ConfigError, load_config
from cohort.coordinator import train
from cohort.methods import build_method
from cohort.methods.base import PeerBatch
from cohort.methods.lmcl import ORDERED_PAIRS, auxiliary_branches
from cohort.models import create_model, model_block_info
from cohort.peer import Peer

from helpers import quiet, synthetic_config

F64 = torch.float64
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
T = 3.0


def lmcl(*overrides: str):
    return build_method(load_config(None, ["method.name=lmcl", *overrides]).method)


def tiny_cohort(n: int, models: tuple[str, ...] = ("resnet20",), seed: int = 0, overrides: tuple[str, ...] = ()):
    """n float64 peers (4 classes, 1 channel) with extras whose weight networks agree:
    peer i's projection of teacher j's stages is peer j's own (one official
    LossWeightNetwork, shared), so every peer computes the official pair weights."""
    torch.manual_seed(seed)
    method = lmcl(*overrides)
    names = [models[i % len(models)] for i in range(n)]
    nets = [create_model(name, 4, 1).double() for name in names]
    extras = []
    for i, net in enumerate(nets):
        teachers = {j: model_block_info(names[j]) for j in range(n) if j != i}
        extras.append(method.build_extras(net.block_info, teachers, 4, model=net).double())
    for i, j in itertools.permutations(range(n), 2):
        extras[i]["weights"].proj[f"t{j}"].load_state_dict(extras[j]["weights"].proj["own"].state_dict())
    x = torch.randn(8, 1, 8, 8, dtype=F64)
    return method, nets, extras, x


def learner_parameters(net, extras) -> list[torch.Tensor]:
    """What the peer's own optimizer trains: its network and every extra but the weight network."""
    return [*net.parameters(), *(p for name, p in extras.named_parameters() if not name.startswith("weights."))]


def official_weights(stages, extras, grad: bool) -> list[torch.Tensor]:
    """models/meta_network.py: ordered pairs i != j, then layers k of i, z of j."""
    with torch.set_grad_enabled(grad):
        projected = [[p(f) for p, f in zip(e["weights"].proj["own"], s.features)] for e, s in zip(extras, stages)]
        return [
            pair_weight(projected[i][k], projected[j][z])
            for i, j in itertools.permutations(range(len(stages)), 2)
            for k in range(len(projected[i]))
            for z in range(len(projected[j]))
        ]


# ------------------------------------------------------------------------ structure


def test_config_refuses_models_without_replicable_stages():
    with pytest.raises(ConfigError, match=r"method 'lmcl' copies a network's later stages.*\['resnet18'\]"):
        load_config(None, ["method.name=lmcl", "cohort.models=[resnet20,resnet18]"])
    load_config(None, ["method.name=lmcl", "cohort.models=[resnet20,wrn_16_1,resnet32]", "cohort.size=3"])
    with pytest.raises(ValueError, match="CIFAR ResNets and WRNs only"):
        auxiliary_branches(create_model("resnet18", 10), 10)
    with pytest.raises(TypeError, match="pass model="):
        lmcl().build_extras(model_block_info("resnet20"), {}, 10)


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_1"])
def test_auxiliary_branches_are_fresh_copies_of_the_later_stages(name):
    torch.manual_seed(0)
    model = create_model(name, 10, 3)
    branches = auxiliary_branches(model, 10)
    stages = model.stages if name == "resnet20" else model.groups
    assert len(branches) == 2
    for b, branch in enumerate(branches, start=1):
        own = dict(torch.nn.Sequential(*stages[b:]).named_parameters())
        copied = dict(branch.stages.named_parameters())
        assert own.keys() == copied.keys()
        assert all(not torch.equal(own[k], copied[k]) for k in own if k.endswith("conv1.weight"))  # re-initialised
    blocks = model(torch.randn(2, 3, 32, 32)).blocks
    width = model.block_info[-1].channels
    for branch, block in zip(branches, blocks[:-1]):
        pooled, logits = branch(block)
        assert pooled.shape == (2, width) and logits.shape == (2, 10)
    assert isinstance(branches[0].tail, torch.nn.Sequential) == (name == "wrn_16_1")  # WRN: BN + ReLU after


def test_message_is_about_a_third_of_a_megabyte_for_resnet32_at_batch_128():
    """The issue's budget: 3 x (128 x 128) embeddings + 128 x 100 aggregate logits +
    3 x (128 x 64) raw stage features, float32 = 346,112 bytes (shapes only, meta device)."""
    method = lmcl()
    with torch.device("meta"):
        model = create_model("resnet32", 100, 3)
        extras = method.build_extras(model.block_info, {1: model.block_info}, 100, model=model)
        message = method.message(model(torch.empty(128, 3, 32, 32)), extras, 0, 0)
    assert message.nbytes == 4 * (3 * 128 * 128 + 128 * 100 + 3 * 128 * 64) == 346_112
    assert [t.shape for t in message["embedding"]] == [(128, 128)] * 3
    assert [t.shape for t in message["features"]] == [(128, 64)] * 3


def test_losses_reuse_the_stages_computed_for_the_message():
    method, (net,), (extras,), x = tiny_cohort(1)
    output = net(x)
    method.message(output, extras, 0, 0)
    published = method._published[1]
    assert method.stages(output, extras) is published
    assert method.stages(output, extras) is not published  # used once, then computed anew


# ------------------------------------------------------ gradient of the joint loss


@pytest.mark.parametrize("n", [2, 3])
def test_each_peer_gets_the_official_joint_gradient(n):
    """Under all_pairs, each peer's loss (through the method: branches, heads, aggregator,
    messages, w without gradient) has the gradient of the official joint loss
    (main_layer_mcl_cifar_meta.py lines 187-212) for every parameter the peer trains."""
    method, nets, extras, x = tiny_cohort(n, models=("resnet20", "wrn_16_1"), seed=n)
    stages = [e(net(x)) for net, e in zip(nets, extras)]
    weights = official_weights(stages, extras, grad=False)
    joint = sum(sum(F.cross_entropy(logits, LABELS) for logits in s.logits) for s in stages)
    joint = joint + sum(F.cross_entropy(s.aggregate, LABELS) for s in stages)
    for i, j in itertools.product(range(n), repeat=2):  # DistillKL(logits[i][-1], aggregated[j].detach())
        p_t = F.softmax(stages[j].aggregate.detach() / T, 1)
        joint = joint + F.kl_div(F.log_softmax(stages[i].logits[-1] / T, 1), p_t, reduction="batchmean") * T**2
    joint = joint + weighted_total(*official_lmcl([list(s.embeddings) for s in stages], LABELS, weights))
    for k in range(n):
        mine = learner_parameters(nets[k], extras[k])
        expected = torch.autograd.grad(joint, mine, retain_graph=True)
        outputs = [net(x) for net in nets]
        messages = [method.message(outputs[j], extras[j], j, 0) for j in range(n) if j != k]
        terms = method.losses(outputs[k], LABELS, messages, extras[k])
        assert set(terms) == {"ce", "ce_aux", "ce_agg", "kd", "vcl", "icl", "soft_vcl", "soft_icl"}
        got = torch.autograd.grad(sum(terms.values()), mine)
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        assert max(g.abs().max() for g in got) > 1e-3


@pytest.mark.parametrize("n", [2, 3])
def test_the_inner_objective_has_the_official_gradient_with_weights_learning(n):
    """The meta step's inner loss (w carrying gradient, teacher-side terms included) has the
    gradient of the official inner_objective (lines 128-139) for the peer's parameters,
    and, with two networks, for the whole weight network too."""
    method, nets, extras, x = tiny_cohort(n, seed=10 + n)
    stages = [e(net(x)) for net, e in zip(nets, extras)]
    joint = weighted_total(
        *official_lmcl([list(s.embeddings) for s in stages], LABELS, official_weights(stages, extras, grad=True))
    )
    k = 0
    mine = [*nets[k].parameters(), *extras[k]["aux"].parameters(), *extras[k]["heads"].parameters()]
    projections = list(extras[k]["weights"].parameters())
    expected = torch.autograd.grad(joint, mine + projections if n == 2 else mine, retain_graph=True, allow_unused=True)
    own = extras[k](nets[k](x))
    messages = [method.message(nets[j](x), extras[j], j, 0) for j in range(1, n)]
    weights = [method.pair_weights(own, m, extras[k]) for m in messages]
    inner = sum(method.contrastive(own, LABELS, messages, weights, teacher_side=True).values())
    got = torch.autograd.grad(inner, mine + projections if n == 2 else mine, allow_unused=True)
    if n == 2:  # peer 0's copy of peer 1's projections: peer 1's in the official network
        shared = [*extras[1]["weights"].proj["own"].parameters()]
        expected = expected[: len(mine)] + tuple(
            torch.autograd.grad(joint, [*extras[0]["weights"].proj["own"].parameters(), *shared])
        )
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert ORDERED_PAIRS == 2


# ---------------------------------------------------------------------- meta step


def meta_batch(method, nets, extras, x, lr=0.1) -> PeerBatch:
    message = method.message(nets[1](x), extras[1], 1, 0)
    return PeerBatch(nets[0], extras[0], x, LABELS, [message], 0, lr, 0.9, 5e-4)


def test_meta_hypergradient_matches_central_finite_differences(monkeypatch):
    """d meta_objective / d(weight network) against central differences along a random
    direction, in float64. Two things make the unrolled objective itself differ from what
    autograd differentiates, so the test removes them: ReLU (a virtual step's gradient
    jumps where a pre-activation crosses 0, so the objective jumps too: softplus here) and
    the soft terms' stop-gradient targets (autograd takes them as constants inside the
    virtual step's gradient, as the official MetaSGD's Hessian-vector products do, while
    differences see them move: about 0.2% on this cohort)."""
    softplus = F.softplus
    monkeypatch.setattr(F, "relu", lambda x, inplace=False: softplus(x))
    method, nets, extras, x = tiny_cohort(2, seed=3, overrides=("method.soft_vcl_weight=0", "method.soft_icl_weight=0"))
    batch = meta_batch(method, nets, extras, x)
    phi = method.critic_parameters(extras[0])
    grads = torch.autograd.grad(method.meta_objective(batch), phi)
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=g, dtype=F64) for p in phi]
    analytic = sum((a * d).sum() for a, d in zip(grads, direction)).item()

    def value_at(scale: float) -> float:
        with torch.no_grad():
            for p, d in zip(phi, direction):
                p.add_(scale * d)
        value = method.meta_objective(batch).item()
        with torch.no_grad():
            for p, d in zip(phi, direction):
                p.sub_(scale * d)
        return value

    eps = 1e-5
    numeric = (value_at(eps) - value_at(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert analytic == pytest.approx(numeric, rel=1e-7)


def test_meta_step_trains_only_the_weight_network_and_leaves_the_peer_as_it_was():
    method, nets, extras, x = tiny_cohort(2, seed=4)
    batch = meta_batch(method, nets, extras, x, lr=0.05)
    before = {k: v.clone() for k, v in [*nets[0].state_dict().items(), *extras[0].state_dict().items()]}
    optimizer = method.critic_optimizer(method.critic_parameters(extras[0]))
    terms = method.meta_step(batch, optimizer)
    assert set(terms) == {"meta_ce"} and torch.isfinite(terms["meta_ce"])
    after = {**nets[0].state_dict(), **extras[0].state_dict()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("weights.") for k in changed)  # BN running stats untouched too
    assert optimizer.param_groups[0]["lr"] == 0.05 and optimizer.param_groups[0]["weight_decay"] == 5e-4
    skipped = PeerBatch(
        *[getattr(batch, f) for f in ("model", "extras", "inputs", "targets", "teachers")], 7, 0.1, 0.9, 0
    )
    assert method.meta_step(skipped, optimizer) == {}  # 7 is not a multiple of meta_every


def test_meta_steps_change_the_weights_and_through_them_the_training():
    """A meta step at step 0 leaves that step's network update as it is and changes the
    pair weights, so training diverges from step 1 on; meta_every=0 turns it off."""

    def two_steps(*overrides):
        config = synthetic_config(None, "method.name=lmcl", *overrides)
        peers = [Peer(j, config) for j in range(2)]
        states = []
        for step in range(2):
            messages = [p.publish(step) for p in peers]
            logged = [p.learn(step, messages[1 - p.index]) for p in peers]
            states.append({k: v.clone() for k, v in peers[0].model.state_dict().items()})
        return states, peers[0].extras["weights"].state_dict(), logged

    with_meta, weights_meta, _ = two_steps()
    without, weights_plain, logged = two_steps("method.meta_every=0")
    assert all(torch.equal(with_meta[0][k], without[0][k]) for k in without[0])
    assert not all(torch.equal(weights_meta[k], weights_plain[k]) for k in weights_plain)
    assert not all(torch.equal(with_meta[1][k], without[1][k]) for k in without[1])
    assert "meta_ce" not in logged[0]


# ----------------------------------------------------------------------- end to end


def test_the_exported_peer_is_the_backbone_with_its_own_classifier(tmp_path):
    config = synthetic_config(tmp_path, "method.name=lmcl", "method.meta_every=2")
    result = train(config, log=quiet)
    tensors, _ = read_safetensors(result.best_peer_path)
    reference = create_model("resnet20", 10, 1).state_dict()
    assert set(tensors) == set(reference)  # no aux, head, aggregator or weight network
    model = load_peer(result.best_peer_path)
    assert model(torch.zeros(2, 1, 16, 16)).logits.shape == (2, 10)
    checkpoint, _ = read_safetensors(latest_checkpoint(tmp_path / "run") / "peer_0.safetensors")
    assert any(k.startswith("extras.aux.") for k in checkpoint)  # extras live in the checkpoint only


def test_bf16_autocast_runs_lmcl_and_mcl():
    """Peers publish under autocast, so projection heads run on bf16 features."""
    for method in ("lmcl", "mcl"):
        config = synthetic_config(None, f"method.name={method}", "run.precision=bf16")
        peers = [Peer(j, config) for j in range(2)]
        messages = [p.publish(0) for p in peers]
        logged = peers[0].learn(0, messages[1])
        assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())
