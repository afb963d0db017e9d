"""Pure loss maths, one function per loss term, each citing its equation.

Equation numbers refer to the AMLN paper (Zhang et al., ECCV 2020, section 3)
unless marked DML (Zhang et al., CVPR 2018) or AFD (Chung et al., ICML 2020).

Choices the papers leave open, made once here for every method:
- Reduction: the papers sum over samples; we average over the batch (and, for
  feature distances, over elements) so loss scales do not depend on batch size.
- Each function returns the term as it enters the peer's total loss (weights such
  as T^2 or beta included), so logged values add up to the optimised loss.
- Precision: every function computes in float32 whatever its inputs (bf16 under
  ``run.precision=bf16``), so softmax, log-softmax, KL and distances keep their
  accuracy; only the networks' forward passes run in bf16.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

OWN, TEACHER = 0, 1  # the two classes of an AMLN discriminator (eq. 1)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """L_C: cross-entropy with one-hot labels (eq. 4-5), mean over the batch."""
    return F.cross_entropy(logits.float(), targets)


def softened_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    direction: Literal["student_teacher", "teacher_student"],
) -> Tensor:
    """T^2 * L_KL between temperature-softened predictions (eq. 6-8).

    direction "student_teacher" is KL(rho_student || rho_teacher), eq. 7 as printed
    in the AMLN paper; "teacher_student" is KL(p_teacher || p_student), DML's eq. 2
    and Hinton et al.'s KD. Sum over classes, mean over the batch ("batchmean").
    The T^2 factor keeps gradient scale comparable to L_C (eq. 8).
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)  # eq. 6
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)  # eq. 6
    if direction == "student_teacher":
        kl = F.kl_div(log_teacher, log_student, log_target=True, reduction="batchmean")  # eq. 7
    else:
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")  # DML eq. 2
    return temperature**2 * kl  # eq. 8


def alignment_distance(aligned: Tensor, teacher_final: Tensor, normalise: str = "none") -> Tensor:
    """d(C_j^b(f_j^b), f_t^last) of eq. 2: L2 taken as the mean squared error.

    ``normalise="sample"`` (an open choice, ``method.feature_norm``): each sample's map
    is flattened and L2-normalised first and the squared distance summed per sample
    (= 2 - 2 cos), mean over the batch; independent of the features' scale, in [0, 4].
    """
    aligned, teacher_final = aligned.float(), teacher_final.float()
    if normalise == "sample":
        a = F.normalize(aligned.flatten(1), dim=1)
        t = F.normalize(teacher_final.flatten(1), dim=1)
        return (a - t).pow(2).sum(1).mean()
    if is_channels_last(aligned):  # the same elements, read in memory order (see in_memory_order)
        aligned, teacher_final = in_memory_order(aligned), in_memory_order(teacher_final)
    return F.mse_loss(aligned, teacher_final)


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is a 4-D map stored channels-last (and not also plain contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def in_memory_order(t: Tensor) -> Tensor:
    """A 4-D map as its (N, H, W, C) view: for a channels-last map, its dimensions in
    memory order. An elementwise loss on that view sees the same elements and hands
    back its gradient channels-last; ``F.mse_loss`` on the (N, C, H, W) view of a
    channels-last map returns a plain contiguous gradient, which the convolution behind
    it then converts, and takes twice as long (1.6 against 0.8 ms for 128x64x7x7 on
    CPU, docs/benchmarks.md). The value and gradient came out the same to the bit on
    CPU (tested); PyTorch does not promise its reductions' order, so elsewhere (CUDA)
    they may differ at rounding."""
    return t.permute(0, 2, 3, 1)


def teacher_probability(scores: Tensor) -> Tensor:
    """D(.) of eq. 1: the probability D's two-way output gives to "the teacher's"."""
    return scores.float().softmax(dim=1)[:, TEACHER]


def discriminator_loss(own_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """The max-over-D side of eq. 1 for one block, as printed (no logarithm):
    D maximises E[1 - D(sigma(f_own))] + E[D(sigma(f_teacher))]; we minimise its
    negation shifted by 2, E[D(own)] + E[1 - D(teacher)], which lies in [0, 2].

    The probability-space form keeps gradients bounded when D is confident, which
    the log (cross-entropy) GAN form does not; in our runs the log form collapsed
    peers to chance within an epoch once D learned (docs/benchmarks.md notes).
    """
    return teacher_probability(own_scores).mean() + (1 - teacher_probability(teacher_scores)).mean()


def fooling_loss(own_scores: Tensor) -> Tensor:
    """The min-over-f side of eq. 1 for one block: E[1 - D(sigma(f_own))], i.e. the
    peer makes D take its own feature for the teacher's."""
    return (1 - teacher_probability(own_scores)).mean()


def log_discriminator_loss(own_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """The log (cross-entropy) form of eq. 1's max-over-D side (``method.gan_form=log``):
    D classifies own features as OWN and the teacher's as TEACHER."""
    own, theirs = own_scores.float(), teacher_scores.float()
    own_labels = torch.full((len(own),), OWN, dtype=torch.long, device=own.device)
    teacher_labels = torch.full((len(theirs),), TEACHER, dtype=torch.long, device=theirs.device)
    return F.cross_entropy(own, own_labels) + F.cross_entropy(theirs, teacher_labels)


def log_fooling_loss(own_scores: Tensor) -> Tensor:
    """The non-saturating log form of eq. 1's min-over-f side: -log D(sigma(f_own))."""
    own = own_scores.float()
    return F.cross_entropy(own, torch.full((len(own),), TEACHER, dtype=torch.long, device=own.device))


def least_squares_discriminator_loss(own_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """AFD's discriminator objective (least-squares GAN): the teacher's feature map
    is real (1), the peer's own is fake (0)."""
    return (1 - teacher_scores.float()).pow(2).mean() + own_scores.float().pow(2).mean()


def least_squares_generator_loss(own_scores: Tensor) -> Tensor:
    """AFD's adversarial loss for the peer: make D score its own map as real."""
    return (1 - own_scores.float()).pow(2).mean()


def discriminator_accuracy(own_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """How often D tells the two apart (a diagnostic, not a loss): own features scored
    below 1/2 for "teacher", the teacher's above, averaged over both sides."""
    own_right = (teacher_probability(own_scores) < 0.5).float().mean()
    teacher_right = (teacher_probability(teacher_scores) > 0.5).float().mean()
    return (own_right + teacher_right) / 2
