"""Training objectives: non-negative PU risk (nnPU), FixMatch-style consistency, entropy, schedules, prior.

Conventions: ``ℓ`` is the logistic (BCE-with-logits) loss, ``ℓ(f, 1) = softplus(−f)`` and
``ℓ(f, 0) = softplus(f)``. All losses are computed in float32 whatever the logits' dtype (autocast
may hand us bf16), and every input batch is flattened, so ``(N,)`` and ``(N, 1)`` logits both work.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryopick.errors import CryopickError


@dataclass
class NNPUOutput:
    """One nnPU evaluation. ``loss`` is what to backpropagate; the rest are for logging."""

    loss: torch.Tensor  # nnPU objective, or −γ·negative_risk when the defitting branch was taken
    risk: torch.Tensor  # π·R_p^+ + max(0, R_u^- − π·R_p^-), detached
    positive_risk: torch.Tensor  # π·E_P[ℓ(f, 1)], detached (logged as loss_pos)
    negative_risk: torch.Tensor  # E_U[ℓ(f, 0)] − π·E_P[ℓ(f, 0)], detached (loss_neg; may be negative)
    defitting: bool  # True when negative_risk < −β and the defitting branch was taken


@dataclass
class ConsistencyOutput:
    """Consistency loss plus detached statistics (0-dim tensors: no device sync until logged)."""

    loss: torch.Tensor  # mean over all samples of mask·BCE(student, pseudo-label)
    mask_rate: torch.Tensor  # fraction of samples whose teacher confidence reached the threshold
    pseudo_positive_rate: torch.Tensor  # fraction of kept samples with pseudo-label 1 (0 if none kept)
    mask: torch.Tensor  # (N,) bool, samples that contribute
    pseudo_labels: torch.Tensor  # (N,) float 0/1, 1[σ(teacher) ≥ 0.5]


def nnpu_loss(logits_p: torch.Tensor, logits_u: torch.Tensor, prior: float, beta: float = 0.0,
              gamma: float = 1.0, defitting: bool = True, balanced_prior: float | None = None) -> NNPUOutput:
    """Non-negative PU risk of Kiryo et al. (NeurIPS 2017) with the logistic loss.

    ``R_p^+ = E_P[ℓ(f,1)]``, ``R_p^- = E_P[ℓ(f,0)]``, ``R_u^- = E_U[ℓ(f,0)]``;
    positive risk ``π·R_p^+``, negative risk ``R_u^- − π·R_p^-`` (an estimate of ``(1−π)·E_N[ℓ(f,0)]``
    that goes below zero once the network overfits the positives).

    Branches (the choice made here):

    - ``defitting`` and negative risk ``< −β``: ``loss = −γ·negative_risk``. Descending on it is
      gradient *ascent* on the negative risk, Kiryo's Algorithm 1, which pulls it back towards zero.
    - otherwise: ``loss = positive_risk + max(0, negative_risk)`` (the clamped nnPU objective).
      With β = 0 (the default, and Topaz's ``--method PU``) this is exactly Algorithm 1. With β > 0
      it differs from Algorithm 1 only while ``−β ≤ negative_risk < 0``: Algorithm 1 then follows the
      unclamped uPU gradient, we follow the positive risk alone, so the negative risk is never pushed
      further below zero by the optimiser.

    ``risk`` is always the nnPU value ``π·R_p^+ + max(0, negative_risk)``, so it is comparable
    across steps whichever branch was taken.

    ``balanced_prior`` π' (Su, Chen & Xu, IJCAI 2021, "PU learning from imbalanced data") reweights
    the two risks as if the classes had prior π': ``π'·R_p^+`` and ``(1−π')/(1−π)·negative_risk``.
    With rare particles (π ≈ 0.01–0.05) the plain risk gives positives almost no weight and the
    posterior stays far below 0.5; with π' = 0.5 a threshold of 0.5 is the balanced decision. With π' given,
    π = 0 is allowed: the limit is the balanced positive-vs-unlabeled risk ``π'·R_p^+ + (1−π')·R_u^-``, whose
    score ranks like the true posterior whatever the prior (Elkan & Noto 2008): dense training's default when
    no particle count is given.
    """
    if balanced_prior is not None and prior == 0:
        _check_prior(balanced_prior)
    else:
        _check_prior(prior)
    if beta < 0 or gamma <= 0:
        raise CryopickError(f"nnPU needs beta >= 0 and gamma > 0, got beta={beta}, gamma={gamma}")
    f_p = _flat_float(logits_p, "positive logits")
    f_u = _flat_float(logits_u, "unlabeled logits")

    if balanced_prior is None:
        w_pos, w_neg = prior, 1.0
    else:
        _check_prior(balanced_prior)
        if prior >= 1:
            raise CryopickError("a balanced prior needs the class prior π below 1")
        w_pos, w_neg = balanced_prior, (1 - balanced_prior) / (1 - prior)
    positive_risk = w_pos * F.softplus(-f_p).mean()
    negative_risk = w_neg * (F.softplus(f_u).mean() - prior * F.softplus(f_p).mean())
    clamped = positive_risk + torch.clamp(negative_risk, min=0.0)

    # One host sync per step to pick the branch; it decides which graph to backpropagate.
    take_defitting = bool(defitting and negative_risk.item() < -beta)
    loss = -gamma * negative_risk if take_defitting else clamped
    return NNPUOutput(loss=loss, risk=clamped.detach(), positive_risk=positive_risk.detach(),
                      negative_risk=negative_risk.detach(), defitting=take_defitting)


def consistency_loss(student_logits_strong: torch.Tensor, teacher_logits_weak: torch.Tensor,
                     threshold: float = 0.95) -> ConsistencyOutput:
    """FixMatch consistency: the student's strong view must match the teacher's confident weak view.

    Pseudo-label ``ŷ = 1[σ(t) ≥ 0.5]``, confidence ``conf = |σ(t) − 0.5|·2`` (so τ = 0.95 keeps
    ``σ(t) ≥ 0.975`` or ``≤ 0.025``), mask ``conf ≥ τ``. The loss is the sum of
    ``mask·BCE(student, ŷ)`` divided by the number of samples passed, not by the number kept
    (FixMatch's convention: few confident samples give a small loss, not a noisy large one).
    Teacher logits are detached here. Which samples take part ("selective": unlabeled only; "all":
    labeled and unlabeled) is the caller's choice of what it passes in.
    """
    if not 0.0 <= threshold <= 1.0:
        raise CryopickError(f"consistency threshold must be in [0, 1], got {threshold}")
    student = _flat_float(student_logits_strong, "student logits", allow_empty=True)
    teacher = _flat_float(teacher_logits_weak.detach(), "teacher logits", allow_empty=True)
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student.shape)} vs "
                         f"{tuple(teacher.shape)}")
    prob = torch.sigmoid(teacher)
    pseudo = (prob >= 0.5).float()
    mask = (prob - 0.5).abs() * 2.0 >= threshold
    if student.numel() == 0:
        zero = student.sum()
        return ConsistencyOutput(zero, zero.detach(), zero.detach(), mask, pseudo)
    per_sample = F.binary_cross_entropy_with_logits(student, pseudo, reduction="none")
    loss = (per_sample * mask.float()).sum() / student.numel()
    kept = mask.float().sum()
    pseudo_positive_rate = (pseudo * mask.float()).sum() / kept.clamp(min=1.0)
    return ConsistencyOutput(loss=loss, mask_rate=(kept / student.numel()).detach(),
                             pseudo_positive_rate=pseudo_positive_rate.detach(), mask=mask,
                             pseudo_labels=pseudo)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of σ(logits) in nats; ln 2 at logit 0, → 0 for confident logits.

    Uses ``H = softplus(f) − σ(f)·f``, stable for large |f|. An empty batch gives 0.
    """
    f = _flat_float(logits, "logits", allow_empty=True)
    if f.numel() == 0:
        return f.sum()
    return (F.softplus(f) - torch.sigmoid(f) * f).mean()


def ramp(epoch: float, start: float, end: float) -> float:
    """Weight schedule: 0 before ``start``, linear to 1 at ``end``, 1 after; a step at ``start`` if equal."""
    if end < start:
        raise CryopickError(f"ramp end ({end}) must not come before its start ({start})")
    if epoch < start:
        return 0.0
    if epoch >= end:
        return 1.0
    return (epoch - start) / (end - start)


def prior_from_expected_particles(expected_particles: float, radius_px: float, area_px: float) -> float:
    """Class prior π from the expected number of particles per micrograph.

    π is the fraction of uniformly random unlabeled patch centres that lie within ``radius_px`` of a
    particle centre: ``min(1, N·π·r²/A)``, counting disjoint tolerance disks (particles sit at least
    ~0.8 diameter apart and r is below half a diameter). ``radius_px`` and ``area_px`` must be in
    the same pixels (binned, as the patches are).

    Topaz 0.3.20 builds this disk on a 3-D grid (``stats.pixels_given_radius``), counting
    (2r+1)× too many pixels (203 instead of 29 at r = 3); its priors are inflated accordingly.
    """
    values = {"expected particles": expected_particles, "radius": radius_px, "area": area_px}
    for name, value in values.items():
        if not _is_finite_real(value):
            raise CryopickError(f"prior from expected particles: {name} must be a finite number, got {value!r}")
    if expected_particles <= 0:
        raise CryopickError(f"expected particles per micrograph must be > 0, got {expected_particles}")
    if radius_px <= 0:
        raise CryopickError(f"positive radius must be > 0 pixels, got {radius_px}")
    if area_px <= 0:
        raise CryopickError(f"micrograph area must be > 0 pixels, got {area_px}")
    return min(1.0, expected_particles * math.pi * radius_px**2 / area_px)


def _check_prior(prior: float) -> None:
    if not (_is_finite_real(prior) and 0.0 < prior <= 1.0):
        raise CryopickError(f"class prior π must be in (0, 1], got {prior!r}")


def _is_finite_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _flat_float(logits: torch.Tensor, what: str, allow_empty: bool = False) -> torch.Tensor:
    if not allow_empty and logits.numel() == 0:
        raise ValueError(f"{what}: empty batch (nnPU needs at least one positive and one unlabeled sample)")
    return logits.reshape(-1).float()
