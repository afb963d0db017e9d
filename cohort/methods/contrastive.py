"""Pure loss maths of MCL and L-MCL, one function per loss term.

MCL: Yang et al., "Mutual Contrastive Learning for Visual Representation Learning",
AAAI 2022, official code github.com/winycg/MCL. L-MCL: Yang et al., "Online Knowledge
Distillation via Mutual Contrastive Learning for Visual Recognition" (layer-wise MCL),
TPAMI 2023, official code github.com/winycg/L-MCL. The paper texts are not in
/work/shared/papers, so the terms are cited by the names the papers and the code give
them (VCL, ICL, Soft VCL, Soft ICL) and by the official source lines they transcribe:

- MCL ``losses/cifar_sup_mcl_loss.py``, class ``SupMCL`` (lines 15-66) and ``KLDiv``
  (lines 118-128);
- L-MCL ``losses/cifar_sup_layer_mcl_meta_loss.py``, class ``SupMCL`` (lines 15-65),
  the same maths for one pair of layers with a per-sample weight ``weight`` (B, 1),
  and ``KLDiv`` (lines 141-157), its weighted form.

What the official (CIFAR, in-batch) code does, and so what these functions do:

- Embeddings are L2-normalised (the projection head ``Embed`` ends in ``Normalize``);
  similarities are dot products divided by tau (0.1 there).
- VCL and ICL are supervised contrastive losses (SupCon) on a B x B logit matrix:
  positives are the other samples of the anchor's class. The diagonal is removed
  from the positives (``intra_mask = eq(labels) - eye``) and from the denominator
  (``diag_mask``) for BOTH the own matrix (VCL) and the cross matrices (ICL): the
  official CIFAR code never counts "the same image seen by the other network" as a
  positive (its ImageNet memory-bank variant does; ``exclude_diagonal=False`` gives
  that form here). Per anchor the mean log-probability over its positives, then the
  mean over anchors.
- The soft terms are T^2 * KL(p_teacher || p_student) of the row-wise softmaxes at
  temperature T (3 there) of the full logit matrices, diagonal included, with the
  target side detached; sum over the row, mean over anchors ("batchmean").
- L-MCL's weight w (one per anchor) multiplies each anchor's term before the mean
  over anchors, which stays a division by B (not by the sum of w), in all four terms.

Two choices the official code leaves open (it relies on a sampler that puts two
images of every class in a batch): an anchor with no positive gives 0/0 = NaN there;
here it is left out of the mean over anchors (the mean is over anchors with at least
one positive), and a batch with none gives 0 (with a gradient, all zeros).

Precision: computations run in the inputs' dtype, so float64 inputs give float64
results; half and bfloat16 inputs are computed in float32 (as ``functional.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["supcon", "vcl", "icl", "soft_vcl", "soft_icl", "pair_terms", "soft_kl"]

_HALF = (torch.float16, torch.bfloat16)


def _working(*tensors: Tensor) -> list[Tensor]:
    """The tensors in one computing dtype: half and bf16 become float32, float64 stays."""
    dtypes = [torch.float32 if t.dtype in _HALF else t.dtype for t in tensors]
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return [t.to(dtype) for t in tensors]


def _anchor_weights(weights: Tensor | None, like: Tensor) -> Tensor | None:
    """Per-anchor weights as a (B, 1) column in the computing dtype (official
    ``weights[count].unsqueeze(-1)``, L-MCL ``cifar_sup_layer_mcl_meta_loss.py`` line 100)."""
    if weights is None:
        return None
    return weights.reshape(-1, 1).to(like.dtype)


def supcon(
    similarity: Tensor,
    labels: Tensor,
    exclude_diagonal: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Supervised contrastive loss of a B x B logit matrix (already divided by tau).

    Row i is anchor i; column k is contrast sample k; positives are the columns with
    anchor i's label. Transcribes the official VCL/ICL reduction (MCL
    ``losses/cifar_sup_mcl_loss.py`` lines 19-21 and 41-44 / 61-64; L-MCL
    ``losses/cifar_sup_layer_mcl_meta_loss.py`` lines 41-43 / 61-63)::

        log_prob = logit - log(sum_k exp(logit) * diag_mask)
        loss = -mean_i [ w_i * sum_k intra_mask_ik * log_prob_ik / sum_k intra_mask_ik ]

    ``exclude_diagonal=True`` (the official CIFAR code, for both VCL and ICL) removes
    column i from anchor i's positives and denominator; ``False`` keeps it (as a
    positive, and in the denominator: the memory-bank form where the other network's
    view of the same image is a positive). ``weights`` (B,) multiplies each anchor's
    term (L-MCL). Anchors with no positive are left out of the mean (the official code
    gives NaN); if no anchor has one the result is 0, still attached to the graph.
    """
    (logits,) = _working(similarity)
    size = logits.size(0)
    positives = labels.reshape(-1, 1) == labels.reshape(1, -1)
    denominator_logits = logits
    if exclude_diagonal:
        eye = torch.eye(size, dtype=torch.bool, device=logits.device)
        positives = positives & ~eye
        # finfo.min, not -inf: exp() gives exactly 0 and a 1 x 1 batch stays finite
        denominator_logits = logits.masked_fill(eye, torch.finfo(logits.dtype).min)
    log_prob = logits - torch.logsumexp(denominator_logits, dim=1, keepdim=True)
    counts = positives.sum(1)
    mean_log_prob_pos = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    mean_log_prob_pos = mean_log_prob_pos / counts.clamp(min=1).to(logits.dtype)
    w = _anchor_weights(weights, logits)
    if w is not None:
        mean_log_prob_pos = mean_log_prob_pos * w.reshape(-1)
    valid = counts > 0
    per_anchor = torch.where(valid, mean_log_prob_pos, torch.zeros_like(mean_log_prob_pos))
    return -per_anchor.sum() / valid.sum().clamp(min=1).to(logits.dtype)


def soft_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    weights: Tensor | None = None,
) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over each row,
    mean over the B rows; the teacher side is detached here.

    Transcribes the official ``KLDiv(y_s, y_t)``: MCL ``losses/cifar_sup_mcl_loss.py``
    lines 118-128 (``F.kl_div(log_softmax(y_s/T), softmax(y_t/T), 'batchmean') * T**2``)
    and its weighted form, L-MCL ``losses/cifar_sup_layer_mcl_meta_loss.py`` lines
    147-157: ``T**2 * (w * p_t * (log_p_t - log_p_s)).sum() / B`` with w (B, 1), i.e.
    each row's KL times its anchor's weight, divided by B (not by the sum of w).
    The official callers always pass ``y_t.detach()``.
    """
    student, teacher = _working(student_logits, teacher_logits.detach())
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    rows = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(1)
    w = _anchor_weights(weights, rows)
    if w is not None:
        rows = rows * w.reshape(-1)
    return temperature**2 * rows.mean()


def vcl(e: Tensor, labels: Tensor, tau: float, weights: Tensor | None = None) -> Tensor:
    """L_VCL, vanilla contrastive learning of one network's own embeddings:
    SupCon of e e^T / tau with the diagonal excluded (MCL ``losses/cifar_sup_mcl_loss.py``
    lines 47-64; L-MCL ``losses/cifar_sup_layer_mcl_meta_loss.py`` lines 45-63, where
    ``weight`` multiplies each anchor). ``e`` (B, D) must be L2-normalised."""
    (e,) = _working(e)
    return supcon(e @ e.T / tau, labels, exclude_diagonal=True, weights=weights)


def icl(
    e: Tensor,
    e_teacher: Tensor,
    labels: Tensor,
    tau: float,
    weights: Tensor | None = None,
    exclude_diagonal: bool = True,
) -> Tensor:
    """L_ICL, interactive contrastive learning between two networks a (``e``) and b
    (``e_teacher``): SupCon(C_ab) + SupCon(C_ba) with C_ab = e_a e_b^T / tau (a's
    anchors against b's contrast embeddings) and C_ba = e_b e_a^T / tau = C_ab^T.

    MCL ``losses/cifar_sup_mcl_loss.py`` lines 27-44 (``cos_simi_ij``, ``cos_simi_ji``,
    both reduced like VCL: diagonal excluded from positives and denominator); L-MCL
    ``losses/cifar_sup_layer_mcl_meta_loss.py`` lines 26-43. Symmetric in (e, e_teacher):
    the official joint loss counts it once per unordered pair, gradients reaching both
    networks; with ``e_teacher`` detached only ``e`` learns, through both matrices.
    """
    e, e_teacher = _working(e, e_teacher)
    return _icl_of(e @ e_teacher.T / tau, labels, exclude_diagonal, weights)


def _icl_of(cross: Tensor, labels: Tensor, exclude_diagonal: bool, weights: Tensor | None) -> Tensor:
    """SupCon(C_ab) + SupCon(C_ba) from C_ab (C_ba is its transpose)."""
    return supcon(cross, labels, exclude_diagonal, weights) + supcon(cross.T, labels, exclude_diagonal, weights)


def soft_vcl(
    e: Tensor,
    e_teacher: Tensor,
    tau: float,
    temperature: float,
    weights: Tensor | None = None,
) -> Tensor:
    """L_Soft-VCL for network a learning from b: T^2 * KL(S_b || S_a) row-wise, with
    S_x = softmax(e_x e_x^T / (tau T)) over the full row (diagonal included) and S_b
    detached. MCL ``losses/cifar_sup_mcl_loss.py`` lines 54-58
    (``self.kl(intra_logits[i], intra_logits[j].detach())`` for every i != j); L-MCL
    ``losses/cifar_sup_layer_mcl_meta_loss.py`` lines 55-57 (weighted)."""
    e, e_teacher = _working(e, e_teacher)
    return soft_kl(e @ e.T / tau, e_teacher @ e_teacher.T / tau, temperature, weights)


def soft_icl(
    e: Tensor,
    e_teacher: Tensor,
    tau: float,
    temperature: float,
    weights: Tensor | None = None,
) -> Tensor:
    """L_Soft-ICL between networks a (``e``) and b (``e_teacher``):
    T^2 * [KL(P(C_ba) || P(C_ab)) + KL(P(C_ab) || P(C_ba))], P the row-wise softmax at
    temperature T, and in each KL the target (first) side detached:
    ``kl(C_ab, C_ba.detach()) + kl(C_ba, C_ab.detach())``, MCL
    ``losses/cifar_sup_mcl_loss.py`` lines 37-38, L-MCL
    ``losses/cifar_sup_layer_mcl_meta_loss.py`` lines 36-37 (weighted).

    Row i of C_ab is a's anchor i against b's embeddings; row i of C_ba is b's anchor i
    against a's embeddings: each KL asks one network's view of anchor i to match the
    other's. Both matrices contain e, so both KLs move a; the detached targets are what
    makes the gradient of this term, with e_teacher detached, equal a's gradient of the
    official joint loss. Symmetric in (e, e_teacher) as a value; as in the official
    code, both KLs also move b unless ``e_teacher`` is detached (peers pass detached
    messages).
    """
    e, e_teacher = _working(e, e_teacher)
    return _soft_icl_of(e @ e_teacher.T / tau, temperature, weights)


def _soft_icl_of(cross: Tensor, temperature: float, weights: Tensor | None) -> Tensor:
    """The two detached-target KLs of soft ICL from C_ab (C_ba is its transpose)."""
    return soft_kl(cross, cross.T.detach(), temperature, weights) + soft_kl(
        cross.T, cross.detach(), temperature, weights
    )


def pair_terms(
    e: Tensor,
    e_teacher: Tensor,
    labels: Tensor,
    tau: float,
    temperature: float,
    weights: Tensor | None = None,
    exclude_diagonal: bool = True,
) -> dict[str, Tensor]:
    """The four terms of network a (``e``) learning from b (``e_teacher``), unscaled by
    alpha/gamma/beta/lambda: ``vcl`` (a's own, weighted by this pair's weights as in
    L-MCL), ``soft_vcl``, ``icl``, ``soft_icl`` (each as its function above), computing
    each similarity matrix once."""
    e, e_teacher = _working(e, e_teacher)
    own = e @ e.T / tau
    teacher_own = e_teacher @ e_teacher.T / tau
    cross = e @ e_teacher.T / tau
    return {
        "vcl": supcon(own, labels, True, weights),
        "soft_vcl": soft_kl(own, teacher_own, temperature, weights),
        "icl": _icl_of(cross, labels, exclude_diagonal, weights),
        "soft_icl": _soft_icl_of(cross, temperature, weights),
    }
