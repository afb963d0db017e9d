"""MCL / L-MCL loss maths (cohort/methods/contrastive.py): golden values from a float64
transcription of the official code, gradient equivalence of the per-peer losses with the
official joint loss, and the edge cases (identical embeddings, no positives, dtypes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cohort.methods import contrastive as C

F64 = torch.float64
TAU, T = 0.1, 3.0
ALPHA, BETA, GAMMA, LAM = 0.1, 0.1, 1.0, 1.0  # vcl, icl, soft_vcl, soft_icl (official scripts)


# --------------------------------------------------------------------------------------
# Reference: a float64 CPU transcription of the official code. Only `.cuda()` removed
# and names kept; nothing else changed.
#   L-MCL  github.com/winycg/L-MCL  losses/cifar_sup_layer_mcl_meta_loss.py
#          SupMCL.forward (lines 15-65), Sup_MCL_Loss_Meta.forward (lines 82-110),
#          KLDiv.forward (lines 147-157)
#   MCL    github.com/winycg/MCL    losses/cifar_sup_mcl_loss.py
#          SupMCL.forward (lines 15-66), KLDiv (lines 118-128)
# --------------------------------------------------------------------------------------
def official_kl(y_s, y_t, T, weights=None):
    """L-MCL KLDiv.forward; with weights=None it is also MCL's KLDiv."""
    log_p_s = F.log_softmax(y_s / T, dim=1)
    log_p_t = F.log_softmax(y_t / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    input_size = p_t.size(0)
    if weights is not None:
        loss = (T**2) * (weights * p_t * (log_p_t - log_p_s)).sum() / input_size
    else:
        loss = F.kl_div(log_p_s, p_t, reduction="batchmean") * (T**2)
    return loss


def official_lmcl_pair(embeddings_a, embeddings_b, labels, weight, tau=TAU, kd_T=T):
    """L-MCL SupMCL.forward for one pair of layers; weight (B, 1). weight=1.0 gives
    MCL's SupMCL for number_net=2 (the same code without `* weight`)."""
    kl = lambda s, t: official_kl(s, t, kd_T, None if isinstance(weight, float) else weight)  # noqa: E731
    n = labels.size(0)
    eye = torch.eye(n, dtype=embeddings_a.dtype)
    labels = labels.unsqueeze(0)
    intra_mask = torch.eq(labels, labels.T).to(eye.dtype) - eye
    diag_mask = 1.0 - eye

    inter_logits = []
    soft_icl_loss = 0.0
    cos_simi_ij = torch.div(torch.mm(embeddings_a, embeddings_b.T), tau)
    inter_logits.append(cos_simi_ij)
    cos_simi_ji = torch.div(torch.mm(embeddings_b, embeddings_a.T), tau)
    inter_logits.append(cos_simi_ji)
    soft_icl_loss += kl(cos_simi_ij, cos_simi_ji.detach())
    soft_icl_loss += kl(cos_simi_ji, cos_simi_ij.detach())

    icl_loss = 0.0
    for logit in inter_logits:
        log_prob = logit - torch.log((torch.exp(logit) * diag_mask).sum(1, keepdim=True))
        mean_log_prob_pos = (intra_mask * log_prob * weight).sum(1) / intra_mask.sum(1)
        icl_loss += -mean_log_prob_pos.mean()

    intra_logits = [
        torch.div(torch.mm(embeddings_a, embeddings_a.T), tau),
        torch.div(torch.mm(embeddings_b, embeddings_b.T), tau),
    ]
    soft_vcl_loss = 0.0
    soft_vcl_loss += kl(intra_logits[0], intra_logits[1].detach())
    soft_vcl_loss += kl(intra_logits[1], intra_logits[0].detach())

    vcl_loss = 0.0
    for logit in intra_logits:
        log_prob = logit - torch.log((torch.exp(logit) * diag_mask).sum(1, keepdim=True))
        mean_log_prob_pos = (intra_mask * log_prob * weight).sum(1) / intra_mask.sum(1)
        vcl_loss += -mean_log_prob_pos.mean()
    return vcl_loss, soft_vcl_loss, icl_loss, soft_icl_loss


def official_mcl(embeddings, labels, tau=TAU, kd_T=T):
    """MCL SupMCL.forward for number_net = len(embeddings)."""
    number_net = len(embeddings)
    n = labels.size(0)
    eye = torch.eye(n, dtype=embeddings[0].dtype)
    labels = labels.unsqueeze(0)
    intra_mask = torch.eq(labels, labels.T).to(eye.dtype) - eye
    diag_mask = 1.0 - eye
    kl = lambda s, t: official_kl(s, t, kd_T)  # noqa: E731

    inter_logits = []
    soft_icl_loss = 0.0
    for i in range(number_net):
        for j in range(i + 1, number_net):
            cos_simi_ij = torch.div(torch.mm(embeddings[i], embeddings[j].T), tau)
            inter_logits.append(cos_simi_ij)
            cos_simi_ji = torch.div(torch.mm(embeddings[j], embeddings[i].T), tau)
            inter_logits.append(cos_simi_ji)
            soft_icl_loss += kl(cos_simi_ij, cos_simi_ji.detach())
            soft_icl_loss += kl(cos_simi_ji, cos_simi_ij.detach())

    icl_loss = 0.0
    for logit in inter_logits:
        log_prob = logit - torch.log((torch.exp(logit) * diag_mask).sum(1, keepdim=True))
        mean_log_prob_pos = (intra_mask * log_prob).sum(1) / intra_mask.sum(1)
        icl_loss += -mean_log_prob_pos.mean()

    intra_logits = [torch.div(torch.mm(embeddings[i], embeddings[i].T), tau) for i in range(number_net)]
    soft_vcl_loss = 0.0
    for i in range(number_net):
        for j in range(number_net):
            if i != j:
                soft_vcl_loss += kl(intra_logits[i], intra_logits[j].detach())

    vcl_loss = 0.0
    for logit in intra_logits:
        log_prob = logit - torch.log((torch.exp(logit) * diag_mask).sum(1, keepdim=True))
        mean_log_prob_pos = (intra_mask * log_prob).sum(1) / intra_mask.sum(1)
        vcl_loss += -mean_log_prob_pos.mean()
    return vcl_loss, soft_vcl_loss, icl_loss, soft_icl_loss


def official_lmcl(embeddings, labels, weights):
    """L-MCL Sup_MCL_Loss_Meta.forward after the projection heads: embeddings[i][k] is
    network i's layer k; weights in the official order (ordered network pairs i != j,
    then layers k of i, then layers z of j), each (B,)."""
    totals = [0.0, 0.0, 0.0, 0.0]
    count = 0
    number_net = len(embeddings)
    for i in range(number_net):
        for j in range(number_net):
            if i == j:
                continue
            for k in range(len(embeddings[i])):
                for z in range(len(embeddings[j])):
                    weight = weights[count].unsqueeze(-1)
                    terms = official_lmcl_pair(embeddings[i][k], embeddings[j][z], labels, weight)
                    count += 1
                    totals = [a + b for a, b in zip(totals, terms)]
    return tuple(totals)


# --- end of the transcription ---------------------------------------------------------


def weighted_total(vcl, soft_vcl, icl, soft_icl):
    """main_cifar.py lines 172-173 (MCL), main_layer_mcl_cifar_meta.py lines 209-210."""
    return ALPHA * vcl + GAMMA * soft_vcl + BETA * icl + LAM * soft_icl


def joint_mcl_loss(embeddings, labels, weights=None):
    """The official joint loss, and the factor c relating its gradient to the per-peer
    losses built from detached teacher embeddings.

    MCL (``weights=None``): L_joint = alpha sum_i VCL(e_i) + gamma sum_{i != j}
    KL(sg S_j || S_i) + beta sum_{i<j} [SupCon(C_ij) + SupCon(C_ji)] + lambda sum_{i<j}
    [KL(sg C_ji || C_ij) + KL(sg C_ij || C_ji)], S_i = e_i e_i^T / tau, C_ij = e_i e_j^T / tau
    (MCL ``losses/cifar_sup_mcl_loss.py``; ``main_cifar.py`` lines 171-173). Network k's
    parameters reach it only through e_k, so in d/dW_k:
    - VCL: only alpha VCL(e_k);
    - Soft VCL: the terms with k on the student side, KL(sg S_j || S_k) for j != k; in
      those with k as the target S_k is detached and they give nothing;
    - ICL: each unordered pair {k, j} appears once and both of its matrices C_kj, C_jk
      contain e_k; differentiating with e_j held fixed is icl(e_k, sg e_j);
    - Soft ICL: the pair's two KLs both have e_k on the student side (C_kj, resp. C_jk)
      and a detached target, so again soft_icl(e_k, sg e_j).
    Hence grad_{W_k} L_joint = c grad_{W_k} L_k with c = 1 and
    L_k = alpha vcl(e_k) + sum_{j != k} [gamma soft_vcl + beta icl + lambda soft_icl](e_k, sg e_j).
    The values do not add up: sum_k L_k = L_joint + beta ICL_joint + lambda SoftICL_joint,
    since each pair's (symmetric) icl and soft_icl enter both peers' losses, but each
    copy sends gradient to one network only.

    L-MCL (``weights`` given): Sup_MCL_Loss_Meta loops over ORDERED network pairs (i, j),
    i != j, and every layer pair (k, z), adding SupMCL(e_i^k, e_j^z, w), which holds both
    sides' terms: VCL of both layers, Soft VCL both ways, ICL, Soft ICL. SupMCL(a, b, w)
    is symmetric in (a, b), and the weight network gives ((i,k),(j,z)) and ((j,z),(i,k))
    the same weight, sigmoid(cos(P_i^k f_i^k, P_j^z f_j^z)) (``models/meta_network.py``
    lines 17-22, 33-41); so each unordered layer pair is counted twice, and each copy
    gives network 0 the gradient of [alpha vcl(e_0^k; w) + gamma soft_vcl(e_0^k, sg e_j^z; w)
    + beta icl(...; w) + lambda soft_icl(...; w)] (vcl(e_j^z) and KL(sg S_0 || S_j) give
    none). Hence c = 2 with L_0 = sum_{j != 0} sum_{k, z} of that bracket: unlike MCL,
    a layer's VCL is counted once per teacher layer, weighted by that pair's weight.
    """
    if weights is None:
        return weighted_total(*official_mcl(embeddings, labels))
    return weighted_total(*official_lmcl(embeddings, labels, weights))


def peer_loss(own, teachers, labels, weights=None):
    """Peer k's loss from detached teachers with cohort.methods.contrastive.

    MCL: own and teachers are embeddings (B, D); vcl once. L-MCL: own is the list of
    the peer's layers, teachers a list (one per teacher) of layer lists, weights[t][k][z]."""
    if weights is None:
        total = ALPHA * C.vcl(own, labels, TAU)
        for t in teachers:
            t = t.detach()
            total = total + GAMMA * C.soft_vcl(own, t, TAU, T) + BETA * C.icl(own, t, labels, TAU)
            total = total + LAM * C.soft_icl(own, t, TAU, T)
        return total
    total = 0.0
    for t_index, teacher_layers in enumerate(teachers):
        for k, e in enumerate(own):
            for z, e_t in enumerate(teacher_layers):
                terms = C.pair_terms(e, e_t.detach(), labels, TAU, T, weights[t_index][k][z])
                total = total + weighted_total(terms["vcl"], terms["soft_vcl"], terms["icl"], terms["soft_icl"])
    return total


# --------------------------------------------------------------------------------------
# Golden values
# --------------------------------------------------------------------------------------
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
GOLDEN_WEIGHTED = {  # peer a's own terms against teacher b, w_n = 0.3 + 0.05 (n - 1)
    "vcl": 2.400290,
    "soft_vcl": 0.327716,  # T^2 KL(S_b || S_a), S_b the (detached) target
    "icl": 9.857391,
    "soft_icl": 14.070766,
}
GOLDEN_WEIGHTED_PAIR = {"vcl": 4.633930, "soft_vcl": 0.651182}  # vcl(a)+vcl(b); both ways
# Unweighted (MCL) values, computed here with the transcription above (no independent source).
GOLDEN_UNWEIGHTED = {"vcl": 4.369395, "soft_vcl": 0.738132, "icl": 20.700636, "soft_icl": 30.774101}
GOLDEN_UNWEIGHTED_PAIR = {"vcl": 9.071795, "soft_vcl": 1.488451}


def golden_embeddings():
    n = torch.arange(1, 9, dtype=F64)
    a = F.normalize(torch.stack([n.cos(), n.sin(), (2 * n).cos(), (3 * n).sin()], 1), dim=1)
    b = F.normalize(torch.stack([n.sin(), (2 * n).cos(), n.cos(), (2 * n).sin()], 1), dim=1)
    w = 0.3 + 0.05 * (n - 1)
    return a, b, w


def ours(a, b, w):
    return {
        "vcl": C.vcl(a, LABELS, TAU, w),
        "soft_vcl": C.soft_vcl(a, b, TAU, T, w),
        "icl": C.icl(a, b, LABELS, TAU, w),
        "soft_icl": C.soft_icl(a, b, TAU, T, w),
    }


@pytest.mark.parametrize("weighted", [True, False], ids=["lmcl_weighted", "mcl_unweighted"])
def test_golden_values(weighted):
    a, b, w = golden_embeddings()
    weight = w if weighted else None
    golden = GOLDEN_WEIGHTED if weighted else GOLDEN_UNWEIGHTED
    golden_pair = GOLDEN_WEIGHTED_PAIR if weighted else GOLDEN_UNWEIGHTED_PAIR

    # the transcription reproduces the numbers ...
    vcl, soft_vcl, icl, soft_icl = official_lmcl_pair(a, b, LABELS, w.unsqueeze(-1) if weighted else 1.0)
    assert vcl.item() == pytest.approx(golden_pair["vcl"], abs=1e-6)
    assert soft_vcl.item() == pytest.approx(golden_pair["soft_vcl"], abs=1e-6)
    assert icl.item() == pytest.approx(golden["icl"], abs=1e-6)
    assert soft_icl.item() == pytest.approx(golden["soft_icl"], abs=1e-6)
    if not weighted:  # MCL's own SupMCL for two networks is the same computation
        for x, y in zip(official_mcl([a, b], LABELS), (vcl, soft_vcl, icl, soft_icl)):
            assert x.item() == pytest.approx(y.item(), abs=1e-12)

    # ... and so do our functions
    mine = ours(a, b, weight)
    for name, value in golden.items():
        assert mine[name].dtype == F64
        assert mine[name].item() == pytest.approx(value, abs=1e-6), name
    theirs = ours(b, a, weight)
    assert (mine["vcl"] + theirs["vcl"]).item() == pytest.approx(vcl.item(), abs=1e-12)
    assert (mine["soft_vcl"] + theirs["soft_vcl"]).item() == pytest.approx(soft_vcl.item(), abs=1e-12)
    assert mine["icl"].item() == pytest.approx(icl.item(), abs=1e-12)
    assert theirs["icl"].item() == pytest.approx(icl.item(), abs=1e-12)  # symmetric
    assert mine["soft_icl"].item() == pytest.approx(soft_icl.item(), abs=1e-12)
    assert theirs["soft_icl"].item() == pytest.approx(soft_icl.item(), abs=1e-12)

    terms = C.pair_terms(a, b, LABELS, TAU, T, weight)
    for name in golden:
        assert terms[name].item() == pytest.approx(mine[name].item(), abs=1e-12)


# --------------------------------------------------------------------------------------
# Gradient equivalence with the official joint loss
# --------------------------------------------------------------------------------------
def tiny_cohort(n_nets, n_layers, seed=0, batch=8, d_in=5, d_out=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g, dtype=F64)
    params = [
        [torch.randn(d_out, d_in, generator=g, dtype=F64).requires_grad_() for _ in range(n_layers)]
        for _ in range(n_nets)
    ]
    # stand-ins for the weight network's projected features: w = sigmoid(cos(u, u'))
    feats = [[torch.randn(batch, 3, generator=g, dtype=F64) for _ in range(n_layers)] for _ in range(n_nets)]
    return x, params, feats


def embed(x, params):
    return [[F.normalize(x @ W.T, dim=1) for W in layers] for layers in params]


def pair_weight(u, v):
    """models/meta_network.py LossWeightNetwork.similarity (lines 17-22)."""
    return torch.sigmoid((F.normalize(u, dim=1) * F.normalize(v, dim=1)).sum(dim=1))


@pytest.mark.parametrize("n_nets", [2, 3])
def test_mcl_gradient_equals_joint(n_nets):
    """MCL: grad_{W_k} L_joint == 1 x grad_{W_k} L_k (see joint_mcl_loss)."""
    x, params, _ = tiny_cohort(n_nets, 1, seed=n_nets)
    labels = LABELS
    e = [layers[0] for layers in embed(x, params)]
    joint = joint_mcl_loss(e, labels)
    joint_grads = torch.autograd.grad(joint, [p[0] for p in params])
    for k in range(n_nets):
        e = [layers[0] for layers in embed(x, params)]
        loss = peer_loss(e[k], [e[j] for j in range(n_nets) if j != k], labels)
        (grad,) = torch.autograd.grad(loss, [params[k][0]])
        torch.testing.assert_close(joint_grads[k], 1.0 * grad, rtol=0, atol=1e-10)
        assert grad.abs().max() > 1e-3


@pytest.mark.parametrize("n_nets,n_layers", [(2, 1), (3, 1), (2, 2), (3, 2)])
def test_lmcl_gradient_equals_joint(n_nets, n_layers):
    """L-MCL: grad_{W_k} L_joint == 2 x grad_{W_k} L_k (see joint_mcl_loss)."""
    x, params, feats = tiny_cohort(n_nets, n_layers, seed=10 * n_nets + n_layers)
    labels = LABELS
    weights = []  # the official order of LossWeightNetwork.forward (lines 33-41)
    for i, j in itertools.permutations(range(n_nets), 2):
        for k in range(n_layers):
            for z in range(n_layers):
                weights.append(pair_weight(feats[i][k], feats[j][z]))
    e = embed(x, params)
    joint = joint_mcl_loss(e, labels, weights)
    flat = [W for layers in params for W in layers]
    joint_grads = torch.autograd.grad(joint, flat)
    for k in range(n_nets):
        e = embed(x, params)
        teachers = [j for j in range(n_nets) if j != k]
        w = [
            [[pair_weight(feats[k][a], feats[j][b]) for b in range(n_layers)] for a in range(n_layers)]
            for j in teachers
        ]
        loss = peer_loss(e[k], [e[j] for j in teachers], labels, w)
        grads = torch.autograd.grad(loss, params[k])
        for layer, grad in enumerate(grads):
            torch.testing.assert_close(joint_grads[k * n_layers + layer], 2.0 * grad, rtol=0, atol=1e-10)
            assert grad.abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------
def test_soft_terms_vanish_for_identical_embeddings():
    a, _, w = golden_embeddings()
    for weight in (None, w):
        assert C.soft_vcl(a, a.clone(), TAU, T, weight).abs().item() < 1e-12
        assert C.soft_icl(a, a.clone(), TAU, T, weight).abs().item() < 1e-12


def test_no_positive_anywhere_gives_zero_not_nan():
    a, b, w = golden_embeddings()
    a, b = a.clone().requires_grad_(), b.clone()
    labels = torch.arange(8)  # every anchor alone in its class
    for weight in (None, w):
        loss = C.vcl(a, labels, TAU, weight) + C.icl(a, b, labels, TAU, weight)
        loss = loss + C.soft_vcl(a, b, TAU, T, weight) + C.soft_icl(a, b, TAU, T, weight)
        (grad,) = torch.autograd.grad(loss, a)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert C.vcl(a, labels, TAU, weight).item() == 0.0
        assert C.icl(a, b, labels, TAU, weight).item() == 0.0
        supcon = C.supcon(a @ a.T / TAU, labels, True, weight)
        (g,) = torch.autograd.grad(supcon, a)
        assert supcon.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
    single = torch.ones(1, 4, dtype=F64, requires_grad=True)  # a batch of one
    loss = C.vcl(F.normalize(single, dim=1), torch.tensor([0]), TAU)
    (grad,) = torch.autograd.grad(loss, single)
    assert loss.item() == 0.0 and torch.isfinite(grad).all()


def test_anchors_without_positive_leave_the_mean():
    """Some anchors alone in their class: the mean runs over the others, each term as in
    the official reduction (which would give NaN for the lone anchors)."""
    a, b, w = golden_embeddings()
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    valid = torch.tensor([0, 1, 4, 5])
    for weight in (None, w):
        logit = a @ b.T / TAU
        eye = torch.eye(8, dtype=F64)
        intra_mask = torch.eq(labels[None], labels[:, None]).to(F64) - eye
        log_prob = logit - torch.log((torch.exp(logit) * (1 - eye)).sum(1, keepdim=True))
        per_anchor = (intra_mask * log_prob * (1.0 if weight is None else weight[:, None])).sum(1) / intra_mask.sum(1)
        expected = -per_anchor[valid].mean()
        assert torch.isnan(per_anchor).sum() == 4
        got = C.supcon(logit, labels, True, weight)
        assert got.item() == pytest.approx(expected.item(), abs=1e-12)


def test_include_diagonal_variant():
    """exclude_diagonal=False: the same sample in the other network is a positive and
    the denominator runs over the full row (memory-bank form)."""
    a, b, _ = golden_embeddings()
    logit = a @ b.T / TAU
    mask = torch.eq(LABELS[None], LABELS[:, None]).to(F64)
    log_prob = logit - torch.logsumexp(logit, 1, keepdim=True)
    expected = -((mask * log_prob).sum(1) / mask.sum(1)).mean()
    assert C.supcon(logit, LABELS, False).item() == pytest.approx(expected.item(), abs=1e-12)


def test_which_terms_reach_the_teacher():
    """As in the official code, only Soft VCL's target is detached inside the loss; ICL
    and Soft ICL are symmetric and move both embeddings (C_ba's student side holds e_b),
    so peers must pass detached teacher embeddings (messages are detached)."""
    a, b, w = golden_embeddings()
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    grad_a, grad_b = torch.autograd.grad(C.soft_vcl(a, b, TAU, T, w), [a, b], allow_unused=True)
    assert grad_b is None and grad_a.abs().max() > 0
    for term in (C.soft_icl(a, b, TAU, T, w), C.icl(a, b, LABELS, TAU, w)):
        grad_a, grad_b = torch.autograd.grad(term, [a, b])
        assert grad_a.abs().max() > 0 and grad_b.abs().max() > 0
    grad_a, grad_b = torch.autograd.grad(C.soft_icl(a, b.detach(), TAU, T, w), [a, b], allow_unused=True)
    assert grad_b is None and grad_a.abs().max() > 0


def test_weights_receive_gradient():
    """L-MCL's meta step differentiates the loss with respect to the weights."""
    a, b, w = golden_embeddings()
    w = w.clone().requires_grad_()
    terms = C.pair_terms(a, b, LABELS, TAU, T, w)
    (grad,) = torch.autograd.grad(sum(terms.values()), w)
    assert torch.isfinite(grad).all() and grad.abs().min() > 0
    # every term is linear in w: the gradient dotted with w gives the value back
    assert (grad * w).sum().item() == pytest.approx(sum(terms.values()).item(), abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_dtypes(dtype):
    a, b, w = golden_embeddings()
    a, b = a.to(dtype), b.to(dtype)
    expected = F64 if dtype == F64 else torch.float32
    values = ours(a, b, w.to(dtype))
    for name, value in values.items():
        assert value.dtype == expected, name
        assert math.isclose(value.item(), GOLDEN_WEIGHTED[name], rel_tol=0.05, abs_tol=0.02), (name, value.item())


@pytest.mark.parametrize("n_nets", [2, 3])
def test_mcl_method_gives_each_peer_the_joint_gradient(n_nets):
    """The MCL method as peers run it (projection heads, detached messages, terms summed
    over all_pairs teachers, vcl once): each peer's gradient, on its network and on its
    head, equals the official joint loss's (CE plus ``joint_mcl_loss``), in float64."""
    from cohort.config import load_config
    from cohort.methods import build_method
    from cohort.models.base import BlockInfo, Output

    torch.manual_seed(n_nets)
    method = build_method(load_config(None, ["method.name=mcl"]).method)
    x = torch.randn(8, 6, dtype=F64)
    nets = [torch.nn.Linear(6, 6).double() for _ in range(n_nets)]
    heads = [method.build_extras((BlockInfo(6, 1),), {}, 4).double() for _ in range(n_nets)]

    def outputs():
        return [Output(net(x)[:, :4], (), net(x)) for net in nets]

    out = outputs()
    joint = sum(F.cross_entropy(o.logits.float(), LABELS) for o in out) + joint_mcl_loss(
        [method.embed(o, h) for o, h in zip(out, heads)], LABELS
    )
    for k in range(n_nets):
        mine = [*nets[k].parameters(), *heads[k].parameters()]
        expected = torch.autograd.grad(joint, mine, retain_graph=True)
        out = outputs()
        messages = [method.message(out[j], heads[j], j, 0) for j in range(n_nets) if j != k]
        terms = method.losses(out[k], LABELS, messages, heads[k])
        assert set(terms) == {"ce", "vcl", "icl", "soft_vcl", "soft_icl"}
        got = torch.autograd.grad(sum(terms.values()), mine)
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        assert max(g.abs().max() for g in got) > 1e-3
