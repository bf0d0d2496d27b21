"""Pick calibration: the mixture estimate and the monotone posterior, by hand and on synthetic mixtures."""

import math

import numpy as np
import pytest
import torch
from helpers import small_dataset
from scipy.special import expit, logit
from scipy.stats import norm

from cryopick.calibrate import (
    Calibration,
    estimate_particle_count,
    estimated_best_f1,
    fit_calibration,
    known_particle_gain,
    label_recall,
    posterior_table,
    tightest_particle_count,
    with_known_particles,
)
from cryopick.errors import CryopickError

PEAKS = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
LABELED = np.array([0.9, 0.8, 0.6])  # 3 of 4 labels found among the peaks


def test_label_recall_counts_unmatched_labels_as_never_picked():
    assert list(label_recall(np.array([0.9, 0.7, 0.6, 0.01]), LABELED, 4)) == [0.25, 0.5, 0.75, 0.75]


def test_particle_count_is_read_where_the_labels_reach_the_recall():
    # recall 0.5 → 2 of 4 labels: t = 0.8, 2 peaks / (2/4) = 4; recall 0.75 → t = 0.6: 4 peaks / (3/4) = 16/3
    assert estimate_particle_count(PEAKS, LABELED, 4, recall=0.5) == pytest.approx(4.0)
    assert estimate_particle_count(PEAKS, LABELED, 4, recall=0.75) == pytest.approx(16 / 3)
    # the default 0.8 needs 4 labels, only 3 were picked: the lowest matched label (t = 0.6) is used
    assert estimate_particle_count(PEAKS, LABELED, 4) == pytest.approx(16 / 3)
    # every threshold bounds the count from above: the estimate is one of those bounds
    assert estimate_particle_count(PEAKS, LABELED, 4, recall=0.25) == pytest.approx(4.0)


def test_the_labels_count_is_the_tightest_bound_from_half_the_labels_up():
    # k = 2 of 4 labels (R = ½): 4; k = 3 (R = ¾, the most the 0.8 band holds with 3 picked): 16/3 → 4
    assert tightest_particle_count(PEAKS, LABELED, 4) == pytest.approx(4.0)
    assert tightest_particle_count(PEAKS, LABELED, 4, recalls=(0.75, 0.8)) == pytest.approx(16 / 3)
    # fewer labels picked than half of them: the lowest picked label's bound, as estimate_particle_count
    assert tightest_particle_count(PEAKS, np.array([0.9]), 4) == pytest.approx(1 / 0.25)
    # junk scoring with the particles: 10 labels among 10 particles and 30 junk peaks above the background;
    # the lowest labels sit among the junk, so R = 0.8 counts junk; from R = ½ up the bound stays near 10
    rng = np.random.default_rng(0)
    particles, junk = np.sort(rng.uniform(0.6, 0.99, 10))[::-1], rng.uniform(0.55, 0.8, 30)
    peaks = np.concatenate([particles, junk, rng.uniform(0.0, 0.3, 500)])
    assert estimate_particle_count(peaks, particles, 10) > 2 * tightest_particle_count(peaks, particles, 10)
    assert tightest_particle_count(peaks, particles, 10) < 20


def test_posterior_is_the_slope_of_the_concave_majorant():
    # C(k) = 4·R = 0,1,2,2,3,3,…: majorant slopes 1,1,½,½,0,… → knots at both ends of each run
    knots, values = posterior_table(PEAKS, LABELED, 4, 4.0)
    assert knots == pytest.approx(logit([0.05, 0.5, 0.6, 0.7, 0.8, 0.9]))
    assert list(values) == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    # the table gives every calibration peak its own slope: below the lowest label (0.6) the posterior is 0,
    # not a value interpolated towards a run's median far below (which called 0.55 "30 % a particle")
    assert np.interp(logit(PEAKS), knots, values) == pytest.approx([1, 1, 0.5, 0.5, 0, 0, 0, 0, 0, 0])
    assert np.interp(logit(0.55), knots, values) == pytest.approx(0.5 * (logit(0.55) - logit(0.5)) / (logit(0.6) - logit(0.5)))
    estimated = fit_calibration(PEAKS, LABELED, 4, n_micrographs=2, held_out=True)
    assert estimated.particles_per_micrograph == pytest.approx(2.0)  # the tightest bound 4 / 2 micrographs
    cal = fit_calibration(PEAKS, LABELED, 4, n_micrographs=2, held_out=True, expected_particles=2)
    z = logit(0.75)
    assert cal.apply(np.array([0.75]))[0] == pytest.approx(0.5 + 0.5 * (z - knots[3]) / (knots[4] - knots[3]), abs=0.01)
    assert np.all(np.diff(cal.apply(np.array([1e-6, 0.01, 0.02, 0.98, 0.99]))) > 0)  # ranking kept in flat parts
    assert list(cal.apply(np.array([0.0, 1.0]))) == [0.0, 1.0]
    assert cal.raw_threshold(0.5) == pytest.approx(0.6)  # 0.99·0.5 + 0.01·(rank of 0.6 among the peaks) ≥ 0.5
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_given_count_replaces_the_estimate():
    cal = fit_calibration(PEAKS, LABELED, 4, n_micrographs=1, held_out=False, expected_particles=8)
    assert cal.count_given and cal.particles_per_micrograph == 8
    assert "your count" in cal.describe() and "optimistic" in cal.describe()


def test_known_particles_are_added_to_the_count_and_raise_the_posterior():
    """Dense training leaves the training labels' peaks out (``n_known`` of them): the count adds them back,
    and the posterior, fitted on the other peaks, takes a fresh micrograph's prior: odds × (N + known) / N."""
    base = fit_calibration(PEAKS, LABELED, 4, n_micrographs=2, held_out=True)
    # N = 4: C(k) = N·R = 1, 2, 2, 3, 3 …: majorant slopes 1, 1, ½, ½, 0 …
    assert base.values == pytest.approx((0.0, 0.0, 0.5, 0.5, 1.0, 1.0))
    known = fit_calibration(PEAKS, LABELED, 4, n_micrographs=2, held_out=True, n_known=6)
    assert known.particles_per_micrograph == pytest.approx(base.particles_per_micrograph + 3)
    assert known.knots == base.knots
    # gain (4 + 6) / 4 = 5/2: odds 1 → 5/2, posterior 5/7
    assert known.values == pytest.approx((0.0, 0.0, 5 / 7, 5 / 7, 1.0, 1.0))
    given = fit_calibration(PEAKS, LABELED, 4, n_micrographs=2, held_out=True, expected_particles=5, n_known=6)
    other = fit_calibration(PEAKS, LABELED, 4, n_micrographs=2, held_out=True, expected_particles=2)
    # 2·5 − 6 = 4 particles among the peaks, as 2·2 without known ones: the same fit, then odds × 10/4
    assert given.particles_per_micrograph == 5 and other.values == (0.0, 0.0, 0.5, 0.5, 1.0, 1.0)
    assert given.values == pytest.approx((0.0, 0.0, 5 / 7, 5 / 7, 1.0, 1.0))


def test_known_particle_gain_and_the_fresh_micrograph_f1_by_hand():
    assert known_particle_gain(4.0, 6) == 2.5 and known_particle_gain(4.0, 0) == 1.0
    assert list(with_known_particles(np.array([0.0, 0.5, 0.2, 1.0]), 2.5)) == pytest.approx([0, 5 / 7, 0.5 / 1.3, 1])
    # posteriors 1, ½, 0 and N = 2: TP 1, 1.5, 1.5 over 1, 2, 3 peaks: F1 2/3, 3/4, 3/5
    peaks = np.array([0.9, 0.5, 0.1])
    assert estimated_best_f1(peaks, np.array([1.0, 0.5, 0.0]), 2.0) == pytest.approx((0.5, 0.75))
    # gain 2: particle peaks count twice, N = 4: TP 2, 3, 3 over 2, 3.5, 4.5 peaks: F1 4/6, 6/7.5, 6/8.5
    assert estimated_best_f1(peaks, np.array([1.0, 0.5, 0.0]), 2.0, gain=2.0) == pytest.approx((0.5, 0.8))


def test_posterior_holds_on_a_fresh_micrograph_when_most_particles_were_labeled():
    """Three quarters of the calibration micrographs' particles trained the model (left out of its peaks),
    and particles and the rest overlap: given the true count, the posterior must sum to a fresh micrograph's
    particles, not to the quarter left over (which the posterior of the leftover peaks alone gives)."""
    rng = np.random.default_rng(0)

    def peaks(n_particles, n_other):
        return expit(rng.normal(1.0, 1.0, n_particles)), expit(rng.normal(-1.5, 1.2, n_other))

    particles, other = peaks(60, 900)  # calibration peaks: 60 particles left after 180 known ones
    calibration_peaks, labels = np.concatenate([particles, other]), particles[:30]  # 30 held-out labels
    fresh = np.concatenate(peaks(240, 900))  # as many micrographs, nothing left out: 240 particles
    cal = fit_calibration(calibration_peaks, labels, 30, n_micrographs=2, held_out=True, expected_particles=120,
                          n_known=180)
    assert cal.apply(fresh).sum() == pytest.approx(240, rel=0.15)
    leftover = fit_calibration(calibration_peaks, labels, 30, n_micrographs=2, held_out=True, expected_particles=30)
    assert leftover.apply(fresh).sum() < 0.75 * 240


def test_mixture_ignores_that_labels_are_the_clearest_particles():
    """Labels drawn from the best-scoring half of the particles: their recall over-states everyone's and the
    label estimate under-counts by about half; the mixture of the peaks' logits does not."""
    from cryopick.calibrate import mixture_posterior

    rng = np.random.default_rng(1)
    z_p, z_n = rng.normal(3.0, 1.5, 300), rng.normal(-3.0, 2.0, 2000)
    peaks = expit(np.concatenate([z_p, z_n]))
    labels = expit(rng.choice(np.sort(z_p)[150:], 30, replace=False))
    assert estimate_particle_count(peaks, labels, 30) < 200
    knots, values, n = mixture_posterior(peaks, labels)
    assert 270 < n < 330 and np.all(np.diff(values) >= 0) and np.all(np.diff(knots) > 0)
    assert np.interp(3.0, knots, values) > 0.9 and np.interp(-3.0, knots, values) < 0.05
    # labels in the lower component (a model that ranks junk above them): no mixture, the labels decide
    assert mixture_posterior(peaks, expit(rng.normal(-3.0, 1.0, 30))) is None
    # one population (a weak model: particles inside the background's spread): no mixture either
    flat = expit(np.concatenate([rng.normal(0.5, 2.0, 300), rng.normal(0.0, 2.0, 2000)]))
    assert mixture_posterior(flat, flat[:30]) is None


def test_a_mixture_count_far_above_the_labels_estimate_is_not_trusted():
    """Junk scoring between the background and the particles joins the particles' component: the mixture then
    counts 223 where the labels (10, all particles) say 52; beyond 3× the labels decide."""
    from cryopick.calibrate import MAX_COUNT_RATIO, mixture_posterior

    rng = np.random.default_rng(3)
    z_junk, z_p = rng.normal(1.5, 1.0, 200), rng.normal(3.2, 0.5, 25)
    peaks = expit(np.concatenate([rng.normal(-4.0, 1.0, 2000), z_junk, z_p]))
    labels = expit(rng.choice(z_p, 10, replace=False))
    mixture_count, label_count = mixture_posterior(peaks, labels)[2], estimate_particle_count(peaks, labels, 10)
    assert mixture_count > 200 and label_count < 60 and mixture_count > MAX_COUNT_RATIO * label_count
    cal = fit_calibration(peaks, labels, 10, n_micrographs=2, held_out=True)
    assert cal.method == "labels" and cal.particles_per_micrograph * 2 == pytest.approx(
        tightest_particle_count(peaks, labels, 10))  # 42 for 25 particles: junk scores among them
    # labels spread over the whole upper population: the two estimates agree and the mixture is kept
    agreeing = expit(rng.choice(np.concatenate([z_junk, z_p]), 10, replace=False))
    cal = fit_calibration(peaks, agreeing, 10, n_micrographs=2, held_out=True)
    agreeing_count = mixture_posterior(peaks, agreeing)[2]  # the labels also start one EM fit
    assert agreeing_count == pytest.approx(mixture_count, rel=0.01)
    assert cal.method == "mixture" and cal.particles_per_micrograph * 2 == pytest.approx(agreeing_count)


def test_particles_without_a_mode_of_their_own_are_not_a_population():
    """Ashman's D > 2 separates two equal Gaussians; a small component on the flank of a large one passes it
    with no mode of its own (on hard models such a component took in background and doubled the count):
    the density must dip between the two means."""
    from cryopick.calibrate import MAX_DIP_RATIO, MIN_SEPARATION, Mixture, _accepted_mixture

    def mixture(weights):
        return Mixture(np.array(weights), np.array([0.0, 3.5]), np.array([1.5, 1.5]))

    equal, flank = mixture([0.5, 0.5]), mixture([0.8, 0.2])
    assert equal.separation == flank.separation == pytest.approx(3.5 / 1.5)
    assert equal.separation > MIN_SEPARATION
    # equal weights: density 2·φ(1.75/1.5)/1.5 at the midpoint against (φ(0) + φ(3.5/1.5))/1.5 at a mean
    assert equal.dip_ratio == pytest.approx(2 * norm.pdf(1.75 / 1.5) / (norm.pdf(0) + norm.pdf(3.5 / 1.5)), rel=1e-3)
    assert equal.dip_ratio < MAX_DIP_RATIO
    assert flank.dip_ratio == 1.0  # the density only rises from the large component's mean to the small one's
    z = np.concatenate([np.zeros(10), np.full(5, 3.5)])
    knots = np.linspace(-5, 8, 50)
    assert _accepted_mixture(equal, z, np.array([3.5, 4.0]), knots, math.inf) is not None
    assert _accepted_mixture(flank, z, np.array([3.5, 4.0]), knots, math.inf) is None


def test_synthetic_mixture_recovers_count_and_posterior():
    rng = np.random.default_rng(0)
    n_particles, n_other = 400, 3000
    z_p, z_n = rng.normal(2.0, 1.0, n_particles), rng.normal(-2.0, 1.0, n_other)
    peaks = expit(np.concatenate([z_p, z_n]))
    labels = expit(rng.choice(z_p, 80, replace=False))
    n = estimate_particle_count(peaks, labels, 80)
    assert 0.85 * n_particles < n < 1.2 * n_particles
    cal = fit_calibration(peaks, labels, 80, n_micrographs=4, held_out=True)
    assert cal.method == "mixture" and cal.particles_per_micrograph * 4 == pytest.approx(n_particles, rel=0.1)
    # true posterior: equal-variance Gaussians → logit P = log(400/3000) + 4z
    for z in (-1.0, 0.0, 1.0):
        true = expit(math.log(n_particles / n_other) + 4 * z)
        assert cal.apply(np.array([expit(z)]))[0] == pytest.approx(true, abs=0.2)
    assert np.all(np.diff(cal.apply(expit(np.linspace(-5, 5, 101)))) >= 0)


def test_flat_topped_background_gets_a_second_component():
    """Background peaks with a sharp upper edge: one Gaussian cannot follow them, and its "particles" take in
    the background's top (more than half the peaks: rejected); the two-Gaussian background is kept, and the
    count comes back near the truth."""
    from cryopick.calibrate import fit_peak_mixture, mixture_posterior

    rng = np.random.default_rng(3)
    z_p = rng.normal(5.5, 1.5, 250)
    z = np.concatenate([z_p, rng.uniform(-8, 2, 2000) + rng.normal(0, 0.5, 2000)])
    one, two = fit_peak_mixture(z, 1).posterior(z).sum(), fit_peak_mixture(z, 2).posterior(z).sum()
    assert one > 0.5 * len(z) and 0.75 * 250 < two < 1.2 * 250
    assert fit_peak_mixture(z, 2).means[-1] == pytest.approx(5.5, abs=0.6)
    labels = expit(rng.choice(z_p, 30))
    assert mixture_posterior(expit(z), labels)[2] == pytest.approx(two, rel=0.02)
    # started on the labels, one background Gaussian passes the checks but leaves particles out: the larger
    # count, the two-Gaussian background's, is the one kept
    one_kept = mixture_posterior(expit(z), labels, background_components=(1,))
    assert one_kept is None or one_kept[2] < two
    cal = fit_calibration(expit(z), labels, 30, n_micrographs=5, held_out=True)
    assert cal.method == "mixture" and 0.75 * 50 < cal.particles_per_micrograph < 1.2 * 50


# peaks of a ring model (SNR 0.02) trained 16 epochs, per 1-logit bin from -12 to +9, against the truth
RING_OTHER = [3, 9, 7, 20, 55, 88, 95, 129, 94, 45, 64, 70, 55, 50, 30, 13, 4, 1, 0, 1, 0, 0]
RING_PARTICLES = [0, 0, 0, 0, 0, 1, 2, 6, 5, 1, 2, 1, 4, 2, 7, 8, 24, 21, 26, 14, 4, 2]
RING_LABEL_BINS = [3, 4, 4, 5, 6, 6, 7, 7, 7, 8]  # lower bin edges of its 10 held-out labels


def test_em_started_on_the_labels_finds_the_whole_particle_mode():
    """From the quantiles, EM puts the particle Gaussian on the top of the particles' mode and a background
    Gaussian on the rest (46 particles); started on the held-out labels it finds the whole mode, the 116
    particles above the background's tail, and the calibration keeps that larger count."""
    from cryopick.calibrate import fit_peak_mixture, labels_start

    rng = np.random.default_rng(3)
    edges = np.arange(-12, 10)
    other = np.concatenate([e + rng.uniform(0, 1, n) for e, n in zip(edges, RING_OTHER)])
    particles = np.concatenate([e + rng.uniform(0, 1, n) for e, n in zip(edges, RING_PARTICLES)])
    z_labels = np.array(RING_LABEL_BINS) + rng.uniform(0, 1, 10)
    z = np.concatenate([other, particles, z_labels])
    clear = int(np.count_nonzero(particles >= 2)) + len(z_labels)
    assert clear == 116
    assert fit_peak_mixture(z, 2).posterior(z).sum() < 0.5 * clear
    from_labels = fit_peak_mixture(z, 2, z_labels)
    assert from_labels.posterior(z).sum() == pytest.approx(clear, rel=0.1)
    assert from_labels.means[-1] == pytest.approx(np.median(particles[particles >= 2]), abs=0.5)
    cal = fit_calibration(expit(z), expit(z_labels), 10, n_micrographs=3, held_out=True)
    assert cal.method == "mixture" and cal.particles_per_micrograph * 3 == pytest.approx(clear, rel=0.1)
    # no start from labels that have nothing below them
    assert labels_start(np.array([4.0, 5.0, 6.0]), np.array([4.0, 6.0]), 1) is None


def test_a_second_background_component_that_takes_particles_is_not_kept():
    """Particles with a lower tail (cut by an edge, touching a neighbour) above a Gaussian background: a second
    background Gaussian takes that tail and under-counts; the one-Gaussian background counts them, and the
    larger count wins (BIC, judging the fit, had kept the second component on such blob models)."""
    from cryopick.calibrate import fit_peak_mixture, mixture_posterior

    rng = np.random.default_rng(5)
    z_p = np.concatenate([rng.normal(5.2, 0.7, 220), rng.uniform(-2, 4, 40)])  # 260 particles, 40 in the tail
    z = np.concatenate([z_p, rng.normal(-6.4, 1.3, 1500)])
    labels = expit(rng.choice(z_p[:220], 12))
    one, two = fit_peak_mixture(z, 1).posterior(z).sum(), fit_peak_mixture(z, 2).posterior(z).sum()
    assert two < one
    knots, values, count = mixture_posterior(expit(z), labels)
    assert count == pytest.approx(max(one, two), rel=0.02) and abs(count - 260) < abs(two - 260)


def test_a_given_count_keeps_the_mixtures_likelihood_ratio():
    """With the user's count the mixture's prior odds move until the peaks' posteriors sum to it."""
    from cryopick.calibrate import fit_peak_mixture, mixture_posterior

    rng = np.random.default_rng(4)
    z_p = rng.normal(2.0, 1.0, 400)
    z = np.concatenate([z_p, rng.normal(-2.0, 1.0, 3000)])
    peaks, labels = expit(z), expit(rng.choice(z_p, 40))
    estimated = mixture_posterior(peaks, labels)
    knots, more, n = mixture_posterior(peaks, labels, n_particles=600.0)
    _, fewer, _ = mixture_posterior(peaks, labels, n_particles=200.0)
    assert n == 600.0 and np.interp(z, knots, more).sum() == pytest.approx(600, rel=0.02)
    assert np.all(more >= fewer) and np.all(np.diff(more) >= 0)
    assert len(fit_peak_mixture(z, 1).weights) == 2
    # the log-odds shift is the same everywhere: a new prior, the same likelihood ratio
    mid = (estimated[1] > 0.05) & (estimated[1] < 0.95) & (more > 0.05) & (more < 0.95)
    shift = logit(more[mid]) - logit(estimated[1][mid])
    assert np.ptp(shift) < 0.05 and shift.mean() > 0
    given = fit_calibration(peaks, labels, 40, n_micrographs=4, held_out=True, expected_particles=150)
    assert given.method == "mixture" and given.count_given and given.particles_per_micrograph == 150
    assert given.suggested_per_micrograph == pytest.approx(100, rel=0.15)  # 400 particles on 4 micrographs
    assert "your count; the peak scores suggest" in given.describe()


def test_failures_say_what_to_do():
    with pytest.raises(CryopickError, match="train longer or on more labels, or pick with your own --threshold"):
        fit_calibration(PEAKS, np.zeros(0), 4, 1, True)
    with pytest.raises(CryopickError, match="no label was found"):  # the count would not help: not suggested
        fit_calibration(PEAKS, np.zeros(0), 4, 1, True, expected_particles=10)
    with pytest.raises(CryopickError, match="same score"):
        fit_calibration(np.full(5, 0.3), np.full(2, 0.3), 2, 1, True)
    with pytest.raises(CryopickError, match="malformed"):
        Calibration.from_dict({"knots": [1.0, 0.0], "values": [0, 1]})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from cryopick.config import TrainConfig, resolve
    from cryopick.train import train

    root = tmp_path_factory.mktemp("calib")
    small_dataset(root)
    cfg = resolve(TrainConfig, None, {"data.data_dir": str(root / "ds"), "train.output_root": str(root / "exp"),
                                      "train.exp_name": "run", "model.backbone": "resnet8", "train.epochs": 1,
                                      "train.steps_per_epoch": 2, "train.device": "cpu"})
    train(cfg, quiet=True)
    return root


def test_extract_keeps_the_labeled_micrographs_binned(trained):
    from cryopick.dataset import load_labeled_micrographs

    mics = load_labeled_micrographs(trained / "ds")
    assert len(mics) == 2 and {m["split"] for m in mics} == {"train", "val"}
    for m in mics:
        assert m["binned"].dtype == torch.float16 and m["binned"].shape == (384, 384)  # 80-px particle: bin ×1
        assert m["labels"].shape[1] == 2 and len(m["labels"]) > 0 and list(m["shape"]) == [384, 384]


def test_train_stores_a_calibration_that_pick_applies(trained, tmp_path, monkeypatch):
    from cryopick.calibrate_model import calibration_micrographs
    from cryopick.checkpoint import load_checkpoint
    from cryopick.config import PickConfig
    from cryopick.crops import hold_out_labels
    from cryopick.dataset import load_labeled_micrographs
    from cryopick.io.outputs import read_coordinate_star
    from cryopick.pick import pick

    mics, held_out = calibration_micrographs(trained / "ds")  # patch mode's calibration set: the val split
    assert held_out and [m["split"] for m in mics] == ["val"]
    # dense training crops the val split too: without held-out labels it calibrates on every labeled
    # micrograph and does not call them held out
    mics, held_out = calibration_micrographs(trained / "ds", split_held_out=False)
    assert not held_out and sorted(m["split"] for m in mics) == ["train", "val"]
    best = trained / "exp" / "run" / "checkpoints" / "best.pt"
    cal = Calibration.from_dict(load_checkpoint(best)["calibration"])
    # dense training (the default) calibrates on the labels it held out of every labeled micrograph
    _, held = hold_out_labels([m for m in load_labeled_micrographs(trained / "ds") if len(m["labels"])], 0.2, 0)
    assert cal.held_out and cal.n_micrographs == len(held) >= 1
    assert cal.n_labels == sum(len(m["labels"]) for m in held)
    raw_dir, cal_dir = tmp_path / "raw", tmp_path / "cal"
    # the border factor (tests/test_pick.py) reorders NMS between raw and calibrated scores: off here
    monkeypatch.setattr("cryopick.nms.inside_probability", lambda x, y, shape, band: np.ones(len(x)))
    ckpt = load_checkpoint(best)
    del ckpt["calibration"]
    torch.save(ckpt, tmp_path / "raw.pt")
    star = trained / "sim" / "micrographs.star"
    pick(str(star), tmp_path / "raw.pt", raw_dir, PickConfig(threshold=0.0, device="cpu"), quiet=True)
    pick(str(star), best, cal_dir, PickConfig(threshold=0.0, device="cpu"), quiet=True)
    files = [f for f in sorted(raw_dir.rglob("*_cryopick.star")) if not f.name.startswith(("coord", "micrographs"))]
    assert len(files) == 3
    for f in files:
        raw, calibrated = read_coordinate_star(f), read_coordinate_star(cal_dir / f.relative_to(raw_dir))
        assert np.array_equal(raw.x, calibrated.x)
        assert calibrated.score == pytest.approx(cal.apply(raw.score), abs=0.01)


def test_an_old_dataset_asks_for_a_new_extract(trained, tmp_path):
    import json
    import shutil

    from cryopick.dataset import load_dataset

    old = tmp_path / "old"
    shutil.copytree(trained / "ds", old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CryopickError, match="calibrate pick's probabilities.*re-run extract"):
        load_dataset(old)


def test_estimated_best_f1_threshold_by_hand():
    from cryopick.calibrate import estimated_best_f1

    # posterior 1, 1, ½, ½, 0…, N = 3: TP = 1, 2, 2.5, 3, 3 → F1 = 2·TP/(k + 3) = 0.5, 0.8, 0.833, 0.857, 0.75
    posterior = np.array([1.0, 1.0, 0.5, 0.5] + [0.0] * 6)
    threshold, f1 = estimated_best_f1(PEAKS, posterior, 3.0)
    assert threshold == 0.6 and f1 == pytest.approx(6 / 7)
    cal = fit_calibration(PEAKS, LABELED, 4, n_micrographs=2, held_out=True, expected_particles=2)
    assert f"best F1 {cal.best_f1_estimate:.2f}" in cal.describe() and 0 < cal.best_f1_threshold <= 1


def test_default_threshold_is_half_a_mixtures_estimated_best_f1_capped_at_0_4():
    from cryopick.calibrate import Calibration, default_threshold

    def calibration(f1, method="mixture"):
        return Calibration((-3.0, 3.0), (0.0, 1.0), 20.0, 2, 500, 10, 10, True, best_f1_estimate=f1, method=method)

    assert default_threshold(None) == 0.4  # raw scores: the fixed cut
    assert default_threshold(calibration(None)) == 0.4  # a calibration stored before the F1 estimate
    assert default_threshold(calibration(0.64)) == pytest.approx(0.32)  # a weak model: its optimal cut
    assert default_threshold(calibration(0.79)) == pytest.approx(0.395)
    assert default_threshold(calibration(0.81)) == 0.4 and default_threshold(calibration(0.99)) == 0.4
    # the labels' step posterior is too coarse to cut below 0.4 by: one label moves a step by 0.1–0.3
    assert default_threshold(calibration(0.64, "labels")) == 0.4


def test_the_f1_optimal_cut_of_a_posterior_is_half_the_best_f1():
    """Why pick's default threshold sits below 0.5 (Lipton et al. 2014): keeping a peak of posterior q raises
    the expected F1 = 2·TP/(k + N) exactly when q > F1/2, so the best cut is where the posterior crosses F1/2."""
    from cryopick.calibrate import estimated_best_f1
    from cryopick.config import DEFAULT_THRESHOLD

    rng = np.random.default_rng(3)
    for _ in range(5):
        posterior = np.sort(rng.beta(0.4, 0.4, 4000))[::-1]  # a well-separated model
        n_particles = float(posterior.sum())  # calibrated: the posteriors sum to the count
        peaks = np.linspace(1, 0, len(posterior))
        threshold, f1 = estimated_best_f1(peaks, posterior, n_particles)
        last_kept = int(np.flatnonzero(peaks == threshold)[0])
        assert posterior[last_kept] >= f1 / 2 - 1e-9 > posterior[last_kept + 1] - 2e-3
        assert 0.8 < f1 < 0.96 and abs(DEFAULT_THRESHOLD - f1 / 2) < 0.09
