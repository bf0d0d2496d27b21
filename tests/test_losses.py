"""Loss functions checked against hand-computed values.

softplus(x) = ln(1 + eˣ); softplus(x) = x + softplus(−x). Values used below (6 decimals):
  softplus(0)  = ln 2                = 0.693147
  softplus(−1) = ln(1 + 0.367879)    = 0.313262     softplus(1) = 1 + 0.313262 = 1.313262
  softplus(−2) = ln(1 + 0.135335)    = 0.126928     softplus(2) = 2 + 0.126928 = 2.126928
  softplus(−3) = ln(1 + 0.049787)    = 0.048587
  softplus(−4) = ln(1 + 0.018316)    = 0.018150     softplus(4) = 4.018150
  softplus(−6) = ln(1 + 0.002479)    = 0.002476     softplus(6) = 6.002476
  σ(−2) = 0.119203, σ(−3) = 0.047426, σ(4) = 0.982014, σ(6) = 0.997527
"""

from __future__ import annotations

import math

import pytest
import torch

from cryopick.errors import CryopickError
from cryopick.losses import (
    consistency_loss,
    entropy_loss,
    nnpu_loss,
    prior_from_expected_particles,
    ramp,
)

TOL = 1e-5


def logits(values, grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


# ------------------------------------------------------------------ nnPU

def test_nnpu_clamp_branch_matches_hand_values():
    # p = [0, 2], u = [0, −1, 1], π = 0.3
    # R_p^+ = (sp(0) + sp(−2))/2 = (0.693147 + 0.126928)/2 = 0.410038 -> positive risk 0.3·0.410038 = 0.123011
    # R_p^- = (sp(0) + sp(2))/2  = (0.693147 + 2.126928)/2 = 1.410038
    # R_u^- = (sp(0) + sp(−1) + sp(1))/3 = (0.693147 + 0.313262 + 1.313262)/3 = 0.773224
    # negative risk = 0.773224 − 0.3·1.410038 = 0.350212 (≥ 0: not clamped, no defitting)
    # loss = risk = 0.123011 + 0.350212 = 0.473224
    out = nnpu_loss(logits([0.0, 2.0]), logits([0.0, -1.0, 1.0]), prior=0.3)
    assert out.positive_risk.item() == pytest.approx(0.123011, abs=TOL)
    assert out.negative_risk.item() == pytest.approx(0.350212, abs=TOL)
    assert out.loss.item() == pytest.approx(0.473224, abs=TOL)
    assert out.risk.item() == pytest.approx(0.473224, abs=TOL)
    assert out.defitting is False


# p = [4, 6], u = [−2, −3], π = 0.5: the positives are fitted so hard that the negative risk is < 0.
# R_p^+ = (sp(−4) + sp(−6))/2 = (0.018150 + 0.002476)/2 = 0.010313 -> positive risk 0.005157
# R_p^- = (4.018150 + 6.002476)/2 = 5.010313, π·R_p^- = 2.505157
# R_u^- = (sp(−2) + sp(−3))/2 = (0.126928 + 0.048587)/2 = 0.087758
# negative risk = 0.087758 − 2.505157 = −2.417399; clamped risk = 0.005157 + 0 = 0.005157
P_OVERFIT, U_OVERFIT, PI_OVERFIT = [4.0, 6.0], [-2.0, -3.0], 0.5


def test_nnpu_defitting_branch_value_and_gradient_sign():
    lp, lu = logits(P_OVERFIT, grad=True), logits(U_OVERFIT, grad=True)
    out = nnpu_loss(lp, lu, prior=PI_OVERFIT, gamma=1.0)
    assert out.defitting is True
    assert out.negative_risk.item() == pytest.approx(-2.417399, abs=TOL)
    assert out.positive_risk.item() == pytest.approx(0.005157, abs=TOL)
    assert out.risk.item() == pytest.approx(0.005157, abs=TOL)
    assert out.loss.item() == pytest.approx(2.417399, abs=TOL)  # −γ·(−2.417399)
    out.loss.backward()
    # d loss/d u_i = −γ·σ(u_i)/n_u = −σ(u_i)/2 = [−0.059601, −0.023713]: negative, so a descent step
    # raises the unlabeled logits, which raises softplus(u) and therefore the negative risk.
    assert lu.grad.tolist() == pytest.approx([-0.059601, -0.023713], abs=TOL)
    # d loss/d p_i = +γ·π·σ(p_i)/n_p = 0.25·σ(p_i) = [0.245503, 0.249382]; the positive risk takes no part.
    assert lp.grad.tolist() == pytest.approx([0.245503, 0.249382], abs=TOL)


def test_nnpu_defitting_step_increases_the_negative_risk():
    lp, lu = logits(P_OVERFIT, grad=True), logits(U_OVERFIT, grad=True)
    before = nnpu_loss(lp, lu, prior=PI_OVERFIT)
    before.loss.backward()
    with torch.no_grad():
        after = nnpu_loss(lp - 0.5 * lp.grad, lu - 0.5 * lu.grad, prior=PI_OVERFIT)
    assert after.negative_risk.item() > before.negative_risk.item()


def test_nnpu_gamma_scales_the_defitting_loss():
    out = nnpu_loss(logits(P_OVERFIT), logits(U_OVERFIT), prior=PI_OVERFIT, gamma=0.5)
    assert out.loss.item() == pytest.approx(0.5 * 2.417399, abs=TOL)


def test_nnpu_without_defitting_clamps_the_negative_risk():
    lp, lu = logits(P_OVERFIT, grad=True), logits(U_OVERFIT, grad=True)
    out = nnpu_loss(lp, lu, prior=PI_OVERFIT, defitting=False)
    assert out.defitting is False
    assert out.loss.item() == pytest.approx(0.005157, abs=TOL)  # positive risk + max(0, −2.417399)
    out.loss.backward()
    # Only the positive risk is left: d/du = 0, d/dp_i = π·(σ(p_i) − 1)/n_p = 0.25·(σ(p_i) − 1).
    assert lu.grad.tolist() == [0.0, 0.0]
    assert lp.grad.tolist() == pytest.approx([0.25 * (0.982014 - 1), 0.25 * (0.997527 - 1)], abs=TOL)


def test_nnpu_beta_threshold():
    # negative risk −2.417399: defitting only when it lies below −β.
    assert nnpu_loss(logits(P_OVERFIT), logits(U_OVERFIT), PI_OVERFIT, beta=2.0).defitting is True
    tolerant = nnpu_loss(logits(P_OVERFIT), logits(U_OVERFIT), PI_OVERFIT, beta=3.0)
    assert tolerant.defitting is False
    assert tolerant.loss.item() == pytest.approx(0.005157, abs=TOL)


def test_nnpu_accepts_column_logits_and_low_precision():
    flat = nnpu_loss(logits([0.0, 2.0]), logits([0.0, -1.0, 1.0]), prior=0.3)
    column = nnpu_loss(logits([[0.0], [2.0]]).bfloat16(), logits([[0.0], [-1.0], [1.0]]).bfloat16(), prior=0.3)
    assert column.loss.dtype == torch.float32
    # 0, ±1, 2 are exact in bf16 and the loss is computed in float32, so the values agree
    assert column.loss.item() == pytest.approx(flat.loss.item(), abs=1e-6)


@pytest.mark.parametrize("prior", [0.0, -0.1, 1.5, float("nan")])
def test_nnpu_rejects_bad_prior(prior):
    with pytest.raises(CryopickError, match="prior"):
        nnpu_loss(logits([0.0]), logits([0.0]), prior=prior)


def test_nnpu_rejects_empty_batches():
    with pytest.raises(ValueError, match="empty"):
        nnpu_loss(logits([]), logits([0.0]), prior=0.3)


# ------------------------------------------------------------------ consistency

def _teacher_logits(probs):
    return torch.tensor([math.log(p / (1 - p)) for p in probs], dtype=torch.float32)


def test_consistency_mask_pseudo_labels_and_loss():
    # teacher probs 0.99, 0.5, 0.01, 0.97, 0.98 -> conf = |p − 0.5|·2 = 0.98, 0, 0.98, 0.94, 0.96
    # τ = 0.95 -> mask [1, 0, 1, 0, 1]; ŷ = 1[p ≥ 0.5] = [1, 1, 0, 1, 1]
    teacher = _teacher_logits([0.99, 0.5, 0.01, 0.97, 0.98])
    student = logits([2.0, 0.0, -1.0, 3.0, 0.0], grad=True)
    out = consistency_loss(student, teacher, threshold=0.95)
    assert out.mask.tolist() == [True, False, True, False, True]
    assert out.pseudo_labels.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    # kept BCEs: BCE(2, 1) = sp(−2) = 0.126928; BCE(−1, 0) = sp(−1) = 0.313262; BCE(0, 1) = ln 2 = 0.693147
    # loss = (0.126928 + 0.313262 + 0.693147) / 5 (all samples, not the 3 kept) = 1.133337/5 = 0.226667
    assert out.loss.item() == pytest.approx(0.226667, abs=TOL)
    assert out.mask_rate.item() == pytest.approx(3 / 5)
    assert out.pseudo_positive_rate.item() == pytest.approx(2 / 3)  # kept labels [1, 0, 1]
    out.loss.backward()
    # Masked samples get no gradient; kept ones get (σ(s) − ŷ)/5, e.g. (σ(0) − 1)/5 = −0.1.
    assert student.grad[1].item() == 0.0 and student.grad[3].item() == 0.0
    assert student.grad[4].item() == pytest.approx(-0.1, abs=TOL)


def test_consistency_teacher_is_detached():
    teacher = _teacher_logits([0.99, 0.01]).requires_grad_(True)
    student = logits([0.5, 0.5], grad=True)
    consistency_loss(student, teacher).loss.backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_consistency_nothing_confident():
    out = consistency_loss(logits([1.0, -1.0]), _teacher_logits([0.6, 0.3]), threshold=0.95)
    assert out.loss.item() == 0.0
    assert out.mask_rate.item() == 0.0
    assert out.pseudo_positive_rate.item() == 0.0


def test_consistency_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        consistency_loss(logits([1.0, 2.0]), logits([1.0]))


# ------------------------------------------------------------------ entropy, ramp, prior

def test_entropy_values():
    # H(0.5) = ln 2 = 0.693147; logit ln 3 -> p = 0.75: H = −0.75·ln 0.75 − 0.25·ln 0.25
    #   = 0.75·0.287682 + 0.25·1.386294 = 0.215762 + 0.346574 = 0.562335
    assert entropy_loss(logits([0.0])).item() == pytest.approx(math.log(2), abs=TOL)
    assert entropy_loss(logits([math.log(3)])).item() == pytest.approx(0.562335, abs=TOL)
    assert entropy_loss(logits([0.0, math.log(3)])).item() == pytest.approx((0.693147 + 0.562335) / 2, abs=TOL)
    confident = entropy_loss(logits([100.0, -100.0]))
    assert torch.isfinite(confident) and confident.item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_gradient_pushes_away_from_half():
    f = logits([0.5, -0.5], grad=True)
    entropy_loss(f).backward()
    # dH/df = −f·σ(f)(1 − σ(f)) / n: descent moves positive logits up and negative ones down.
    assert f.grad[0].item() < 0 < f.grad[1].item()


@pytest.mark.parametrize(
    "epoch,start,end,expected",
    [(-1.0, 0.0, 10.0, 0.0), (0.0, 0.0, 10.0, 0.0), (2.5, 0.0, 10.0, 0.25), (10.0, 0.0, 10.0, 1.0),
     (12.0, 0.0, 10.0, 1.0), (15.0, 10.0, 20.0, 0.5), (4.9, 5.0, 5.0, 0.0), (5.0, 5.0, 5.0, 1.0)],
)
def test_ramp(epoch, start, end, expected):
    assert ramp(epoch, start, end) == pytest.approx(expected)


def test_ramp_rejects_reversed_range():
    with pytest.raises(CryopickError):
        ramp(1.0, 10.0, 0.0)


def test_prior_from_expected_particles():
    # 100 · π · 10² / 10⁶ = π/100 = 0.031415926536
    assert prior_from_expected_particles(100, 10, 1e6) == pytest.approx(0.031415926536, abs=1e-12)
    # 50 · π · 3² / 512² = 1413.7167 / 262144 = 0.00539291
    assert prior_from_expected_particles(50, 3.0, 512 * 512) == pytest.approx(0.00539291, abs=1e-8)
    assert prior_from_expected_particles(1e6, 10, 1e6) == 1.0  # capped


@pytest.mark.parametrize("args", [(0, 10, 1e6), (-5, 10, 1e6), (100, 0, 1e6), (100, 10, 0),
                                  (float("nan"), 10, 1e6), (100, float("inf"), 1e6), ("100", 10, 1e6)])
def test_prior_rejects_bad_inputs(args):
    with pytest.raises(CryopickError):
        prior_from_expected_particles(*args)


def test_balanced_prior_reweights_both_risks_by_hand():
    """Imbalanced nnPU (Su et al. 2021) with π = 0.3, π' = 0.5, logits p = [0, 2], u = [0, −1, 1].

    R_p^+ = (ln 2 + ln(1 + e^-2)) / 2 = (0.693147 + 0.126928) / 2 = 0.410038
    R_p^- = (ln 2 + ln(1 + e^2)) / 2 = (0.693147 + 2.126928) / 2 = 1.410038
    R_u^- = (0.693147 + 0.313262 + 1.313262) / 3 = 0.773224
    negative = (1 − 0.5)/(1 − 0.3) · (0.773224 − 0.3·1.410038) = 0.714286 · 0.350212 = 0.250152
    positive = 0.5 · 0.410038 = 0.205019;  loss = 0.455171
    """
    out = nnpu_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0, 1.0]), 0.3, balanced_prior=0.5)
    assert float(out.positive_risk) == pytest.approx(0.205019, abs=1e-6)
    assert float(out.negative_risk) == pytest.approx(0.250152, abs=1e-6)
    assert float(out.loss) == pytest.approx(0.455171, abs=1e-6)
    plain = nnpu_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0, 1.0]), 0.3)
    assert float(plain.positive_risk) == pytest.approx(0.3 * 0.410038, abs=1e-6)


def test_balanced_prior_with_zero_prior_is_balanced_p_vs_u_by_hand():
    """π = 0 with π' = 0.5 (dense training without a count): 0.5·R_p^+ + 0.5·R_u^-, never clamped.

    Same logits as above: 0.5·0.410038 + 0.5·0.773224 = 0.205019 + 0.386612 = 0.591631.
    """
    out = nnpu_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0, 1.0]), 0.0, balanced_prior=0.5)
    assert float(out.positive_risk) == pytest.approx(0.205019, abs=1e-6)
    assert float(out.negative_risk) == pytest.approx(0.386612, abs=1e-6)
    assert float(out.loss) == pytest.approx(0.591631, abs=1e-6) and not out.defitting
    with pytest.raises(CryopickError, match="prior"):
        nnpu_loss(torch.tensor([0.0]), torch.tensor([0.0]), 0.0)  # plain nnPU needs π > 0
