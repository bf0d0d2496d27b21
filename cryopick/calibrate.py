"""Pick-level calibration: what pick's score means, and how many particles there are, from the labels.

After training, the final model scores labeled micrographs densely (the code pick runs: dense map, peaks,
NMS). Their peaks are a mixture: particles and everything else. The labeled particles' peaks show what a
particle's score looks like (f_P; unmatched labels count as "never picked"), all peaks give the mixture f.

- **Mixture** (first choice): Gaussians fitted to the peaks' logits, one for the particles (the highest, where
  the held-out labels sit) and one or two for everything else, both fitted, each by EM from the peaks'
  quantiles and from the labels (EM can settle on part of the particles' mode); of those that pass the checks
  the one counting more particles is kept (one Gaussian cannot follow flat-topped background peaks; a
  second one can take the particles' lower tail, those cut by an edge or touching a neighbour, and
  under-count them). The particles'
  responsibility is the posterior, its sum over the peaks the count (``mixture_posterior``). A given count
  keeps the mixture's likelihood ratio and moves its prior. Labels are the clearest particles, so their
  recall over-states everyone's; the mixture uses them only to say which component is the particles and
  to start one EM fit there.
- Otherwise (fewer than 50 peaks, one population: Ashman's D below 2 or no dip of the density between the
  particles and the rest, labels outside the particles' component, or a mixture count more than
  ``MAX_COUNT_RATIO`` times the labels' bound at R = ``COUNT_RECALL``: its upper component then holds a
  population the labels do not, e.g. junk scoring between the background and the particles), from the labels:
- **Mixture proportion** α (particles per peak): above any threshold t there are at least as many peaks
  as particles, #peaks(≥ t) ≥ N·R(t), with R(t) the fraction of labels picked at ≥ t. So
  N ≤ #peaks(≥ t) / R(t) for every t, with equality where only particles score above t (Elkan–Noto/Scott
  style); the count is the tightest of these bounds over the thresholds that half to ``COUNT_RECALL`` of
  the labels reach (``tightest_particle_count``).
- **Posterior** P(particle | score): the expected particles among the top k peaks are C(k) = N·R(s_k);
  the slope of its least concave majorant is a non-increasing (in rank) estimate of the posterior,
  clipped to [0, 1]. The calibration peaks lack the particles whose labels trained the model; a fresh
  micrograph does not, so the posterior's prior odds are raised by (N + known) / N before it is stored
  (``known_particle_gain``).
  It is stored as a monotone table on logits (from the labels: knots at both ends of each run of equal
  slope, so every calibration peak keeps its own value) and applied by pick, so a pick's figure of
  merit is "the probability that this peak is a particle", and 0.5 means "more likely a particle than not".
  Pick's default cut is lower (``default_threshold``): on a posterior the F1-optimal cut is half the best
  F1 (Lipton et al. 2014): ``cryopick.config.DEFAULT_THRESHOLD``, or half a mixture's estimated best F1
  where that is lower (the labels' step table is too coarse to cut lower by).

The labels should not have trained the model (held-out micrographs), or f_P is optimistic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.special import expit
from scipy.special import logit as _logit
from scipy.stats import norm

from cryopick.config import DEFAULT_THRESHOLD
from cryopick.errors import CryopickError

MIN_MIXTURE_PEAKS = 50  # fewer peaks than this: no mixture fit, the labels' recall decides
MIN_SEPARATION = 2.0  # Ashman's D of the two components below which they are not two populations
# the mixture's density between the particles' mean and the next must dip below this fraction of its value at
# the particles' mean: Ashman's D > 2 separates two equal Gaussians, but particles are 5–20 % of the peaks, and
# a small wide component beside a large one can pass D without a mode of its own (it then absorbs background)
MAX_DIP_RATIO = 0.98
COUNT_RECALL = 0.8  # the held-out label recall at which the particle count is read (estimate_particle_count)
# the lowest recall whose bound the labels' count takes (tightest_particle_count): half the labels, so R is
# never read off one or two of the 10–30 held-out labels
MIN_COUNT_RECALL = 0.5
# Labels are the clearest particles, so the labels' estimate under-counts: where the mixture was right the two
# differed by 1.0–1.8×, and by 3.4× on the demo's model on an AVX-512 CPU (the 8th of 10 held-out labels
# scored high); a junk-counting mixture by 6.7× (benchmarks/RESULTS.md): more than 4× is not the particles alone
MAX_COUNT_RATIO = 4.0
LOGIT_CLIP = 30.0  # σ(30) = 1 − 1e-13: beyond this probabilities saturate in float64
TIE_BREAK = 0.01  # weight of the peaks' rank in the calibrated score: keeps the ranking through the 6 decimals
N_QUANTILES = 101  # quantiles of the calibration peaks' logits stored for the tie-break


@dataclass(frozen=True)
class Calibration:
    """A monotone map from the network's logit to P(particle | peak), and what it was estimated from."""

    knots: tuple[float, ...]  # logits, increasing
    values: tuple[float, ...]  # posterior at each knot, non-decreasing, in [0, 1]
    particles_per_micrograph: float  # estimated (or given) particles per micrograph
    n_micrographs: int
    n_peaks: int
    n_labels: int
    n_labels_matched: int
    held_out: bool  # True when the labels did not train the model
    count_given: bool = False  # True when N came from the user's count, not the estimate
    quantiles: tuple[float, ...] = ()  # logit quantiles of the calibration peaks (strictly increasing)
    best_f1_threshold: float | None = None  # calibrated score maximising the estimated F1 on these peaks
    best_f1_estimate: float | None = None  # that estimated F1 (against N particles)
    method: str = "labels"  # mixture: Gaussian mixture of the peaks' logits; labels: held-out label recall
    suggested_per_micrograph: float | None = None  # with a given count: the mixture's own estimate

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of raw probabilities σ(logit).

        The posterior table is flat beyond its end knots; a weight of ``TIE_BREAK`` on the (clipped,
        rescaled) logit keeps the map strictly increasing, so the network's ranking (and AP) is kept.
        """
        z = clipped_logit(probabilities)
        return (1 - TIE_BREAK) * np.interp(z, self.knots, self.values) + TIE_BREAK * self._rank(z)

    def _rank(self, z: np.ndarray) -> np.ndarray:
        """A strictly increasing map of logits onto [0, 1]: mostly the peaks' quantile, spread evenly."""
        linear = (z + LOGIT_CLIP) / (2 * LOGIT_CLIP)
        if len(self.quantiles) < 2:
            return linear
        return 0.9 * np.interp(z, self.quantiles, np.linspace(0, 1, len(self.quantiles))) + 0.1 * linear

    def raw_threshold(self, calibrated: float) -> float | None:
        """The raw probability from which the calibrated score reaches ``calibrated`` (None: never)."""
        values = np.asarray(self.values)
        knots = np.asarray(self.knots)
        hit = np.flatnonzero((1 - TIE_BREAK) * values + TIE_BREAK * self._rank(knots) >= calibrated)
        if len(hit) == 0:
            return None
        return float(1 / (1 + math.exp(-self.knots[hit[0]])))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["knots"], d["values"], d["quantiles"] = list(self.knots), list(self.values), list(self.quantiles)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        if not isinstance(data, dict):
            raise CryopickError(f"checkpoint calibration is malformed (a {type(data).__name__}, not a mapping)")
        try:
            tables = {k: tuple(float(v) for v in data.get(k, ())) for k in ("knots", "values", "quantiles")}
            cal = cls(**{**data, **tables})
        except (KeyError, TypeError, ValueError) as exc:
            raise CryopickError(f"checkpoint calibration is malformed ({exc})") from None
        if len(cal.knots) == 0 or len(cal.knots) != len(cal.values) or np.any(np.diff(cal.knots) < 0):
            raise CryopickError("checkpoint calibration is malformed (knots must be increasing, one value each)")
        return cal

    def describe(self) -> str:
        source = (f"your count; the peak scores suggest {self.suggested_per_micrograph:.1f}"
                  if self.count_given and self.suggested_per_micrograph is not None else
                  "your count" if self.count_given else "estimated from the peak scores" if self.method == "mixture"
                  else "estimated from the labels")
        where = "held-out" if self.held_out else "training (optimistic)"
        text = (f"{self.particles_per_micrograph:.1f} particles per micrograph ({source}; {self.n_labels_matched} of "
                f"{self.n_labels} {where} labels picked among {self.n_peaks} peaks on {self.n_micrographs} "
                f"micrograph{'s' if self.n_micrographs != 1 else ''})")
        if self.best_f1_threshold is not None:
            text += (f"; estimated best F1 {self.best_f1_estimate:.2f} at p ≥ {self.best_f1_threshold:.2f}")
        return text


def default_threshold(calibration: Calibration | None) -> float:
    """Pick's cut when the user gives none (``default_cut``)."""
    return default_cut(calibration)[0]


def default_cut(calibration: Calibration | None) -> tuple[float, str]:
    """Pick's cut when the user gives none, and why in words for the log: half the estimated best F1 of a
    mixture calibration, at most ``DEFAULT_THRESHOLD``; ``DEFAULT_THRESHOLD`` otherwise.

    Keeping a peak of posterior q raises the expected F1 exactly when q > F1*/2 (Lipton et al. 2014). The cap
    keeps a usable model's cut (best F1 0.8–1: 0.40–0.50) at 0.4, because the estimated counts, and with
    them the posteriors, err low more often than high. Only the mixture's smooth posterior is trusted below
    0.4: the labels' posterior is a step table read off 10–30 held-out labels, where one label more or less
    in a band of peaks moves its value by 0.1–0.3, so F1*/2 falls on either side of a step by chance (on
    dev-sparse: 0.633 against 0.624 at 0.4 on one machine, 0.560 against 0.632 on another;
    benchmarks/RESULTS.md). Uncalibrated models (raw scores) and calibrations without an F1 estimate get
    ``DEFAULT_THRESHOLD`` too.
    """
    if calibration is None:
        return DEFAULT_THRESHOLD, "an uncalibrated model's fixed cut"
    if calibration.best_f1_estimate is None:
        return DEFAULT_THRESHOLD, "the fixed cut (a calibration without an F1 estimate)"
    if calibration.method != "mixture":
        return DEFAULT_THRESHOLD, "the fixed cut: the held-out labels' step posterior is too coarse to cut lower by"
    return (float(min(DEFAULT_THRESHOLD, calibration.best_f1_estimate / 2)),
            f"half the estimated best F1 ({calibration.best_f1_estimate:.2f}), at most {DEFAULT_THRESHOLD:g}")


def clipped_logit(probabilities) -> np.ndarray:
    """Logits of probabilities in [0, 1], float64, clipped to ±``LOGIT_CLIP``."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    return np.clip(_logit(p), -LOGIT_CLIP, LOGIT_CLIP)


def label_recall(peak_scores: np.ndarray, label_scores: np.ndarray, n_labels: int) -> np.ndarray:
    """R at each peak's score: the fraction of all ``n_labels`` labels whose peak scores at least as high."""
    ordered = np.sort(np.asarray(label_scores, dtype=np.float64))
    return (len(ordered) - np.searchsorted(ordered, peak_scores, side="left")) / n_labels


def estimate_particle_count(peak_scores: np.ndarray, label_scores: np.ndarray, n_labels: int,
                            recall: float = COUNT_RECALL) -> float:
    """N = #peaks(≥ t) / R(t) at the score t that ``recall`` of the labels reach (R(t) ≥ ``recall``).

    Every threshold bounds N from above (peaks(≥ t) ≥ N·R(t)); the bound is tight where few non-particles
    score above t. The minimum over all thresholds is the tightest bound in theory but, with the 10–30
    held-out labels of a typical run, it follows the noise of R at the top and under-counts; at R ≈ 0.8
    most particles and few other peaks lie above t when the model separates them. With fewer labels
    matched than that, the lowest matched label's score is used.

    ``peak_scores``: every peak of the micrographs; ``label_scores``: the scores of the peaks matched to
    labels (a subset of ``peak_scores``); ``n_labels``: all labels, matched or not.
    """
    peaks = np.asarray(peak_scores, dtype=np.float64)
    matched = np.sort(np.asarray(label_scores, dtype=np.float64))[::-1]
    if n_labels <= 0 or len(matched) == 0:
        raise CryopickError("no label was found among the peaks: cannot estimate the number of particles "
                            "from the labels")
    k = min(len(matched), max(1, math.ceil(recall * n_labels - 1e-9)))
    t = matched[k - 1]
    above = int(np.count_nonzero(peaks >= t))
    return float(above / label_recall(np.array([t]), matched, n_labels)[0])


def tightest_particle_count(peak_scores: np.ndarray, label_scores: np.ndarray, n_labels: int,
                            recalls: tuple[float, float] = (MIN_COUNT_RECALL, COUNT_RECALL)) -> float:
    """The lowest bound #peaks(≥ t) / R(t) over the thresholds t that from ``recalls[0]`` to ``recalls[1]`` of
    the labels reach (``estimate_particle_count`` at each): the labels' count where the calibration has
    nothing better.

    Every bound counts the non-particles above t as particles; where junk scores like particles (the
    junk-rich dev set: 25 particles and 60 junk blobs per micrograph) the bound at R = 0.8 counted 4–5×
    the particles, the tightest bound from R = 0.5 up 1.2–1.7×. Where the labels are the clearest particles
    the tightest bound under-counts more than the one at R = 0.8 (0.6–0.8× on the ring's models; their F1 at
    the default cut moved by 0.01 of the best F1 at most, ``benchmarks/RESULTS.md``). Falls back to
    ``estimate_particle_count`` when fewer labels than ``recalls[0]`` were picked.
    """
    matched = np.sort(np.asarray(label_scores, dtype=np.float64))[::-1]
    low = max(1, math.ceil(recalls[0] * n_labels - 1e-9))
    high = min(len(matched), max(1, math.ceil(recalls[1] * n_labels - 1e-9)))
    if n_labels <= 0 or high < low:
        return estimate_particle_count(peak_scores, label_scores, n_labels, recalls[1])
    return min(estimate_particle_count(peak_scores, label_scores, n_labels, k / n_labels)
               for k in range(low, high + 1))


def posterior_table(peak_scores: np.ndarray, label_scores: np.ndarray, n_labels: int,
                    n_particles: float) -> tuple[np.ndarray, np.ndarray]:
    """Monotone P(particle | score) at the peaks: (logits increasing, posterior non-decreasing).

    C(k) = N·R(s_k) particles among the top k peaks; the posterior is the slope of C's least concave
    majorant (a decreasing function of rank), clipped to [0, 1], taken per group of equal slope.
    """
    peaks = np.sort(np.asarray(peak_scores, dtype=np.float64))[::-1]
    if len(peaks) == 0:
        raise CryopickError("no peaks to calibrate on")
    cumulative = np.concatenate([[0.0], n_particles * label_recall(peaks, label_scores, n_labels)])
    hull = _concave_majorant(np.arange(len(cumulative), dtype=np.float64), cumulative)
    slopes = np.clip(np.diff(hull), 0.0, 1.0)  # slope of segment k-1 → k belongs to peak k
    z = clipped_logit(peaks)
    # knots at both ends of each run of equal slope: a compact, monotone step table. Knots at the runs'
    # medians let the interpolation spread a run's value far below its last peak (below the lowest label
    # the posterior drops to 0, but a median knot many logits lower made everything between half-likely)
    breaks = np.flatnonzero(np.abs(np.diff(slopes)) > 1e-9) + 1  # float rounding of equal hull slopes
    knots, values = [], []
    for run in np.split(np.arange(len(slopes)), breaks):
        knots += [float(z[run[0]]), float(z[run[-1]])]  # z decreases along a run: its top, then its bottom
        values += [float(slopes[run[0]])] * 2
    knots, values = np.asarray(knots[::-1]), np.asarray(values[::-1])
    keep = np.concatenate([[True], np.diff(knots) > 0])  # equal knots: keep the lower-ranked (first) value
    return knots[keep], np.maximum.accumulate(values[keep])


def _concave_majorant(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Values at ``x`` of the least concave majorant of points (x, y), x increasing (monotone chain)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or below the chord a → i
            if (y[b] - y[a]) * (x[i] - x[a]) <= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return np.interp(x, x[hull], y[hull])


def fit_calibration(peak_scores: np.ndarray, label_scores: np.ndarray, n_labels: int, n_micrographs: int,
                    held_out: bool, expected_particles: float | None = None, n_known: int = 0) -> Calibration:
    """Calibration from the peaks of ``n_micrographs`` labeled micrographs (see the module docstring).

    ``expected_particles`` (per micrograph), when given, replaces the estimated count. ``n_known``: particles
    whose peaks were left out of ``peak_scores`` (the labels that trained the model); they are added to the
    count, and the posterior, fitted on the other peaks, is moved to a fresh micrograph's prior, where no
    particle is left out (``known_particle_gain``).
    """
    peaks = np.asarray(peak_scores, dtype=np.float64)
    labels = np.asarray(label_scores, dtype=np.float64)
    if len(peaks) == 0 or n_micrographs <= 0:
        raise CryopickError("no peaks on the labeled micrographs: cannot calibrate")
    if np.ptp(peaks) == 0:
        raise CryopickError("every peak has the same score (an untrained model?): cannot calibrate; "
                            "train longer, or pick with your own --threshold")
    if len(labels) == 0:
        raise CryopickError("no label was found among the peaks (the model does not yet score the "
                            "particles above the background): cannot calibrate; train longer or on more labels, "
                            "or pick with your own --threshold")
    given = expected_particles is not None
    n_given = max(float(expected_particles) * n_micrographs - n_known, 1.0) if given else None
    # the mixture is checked against a generous bound, the labels' own count is the tightest one
    upper = estimate_particle_count(peaks, labels, n_labels)
    mixture = _mixture_posterior(peaks, labels, n_given, max_count=MAX_COUNT_RATIO * upper)
    suggested = None
    if mixture is not None:
        knots, values, n_total, estimated = mixture
        method = "mixture"
        if given:  # what the peaks alone say, so a count far from it can be questioned
            suggested = (estimated + n_known) / n_micrographs
    else:
        n_total = n_given if given else tightest_particle_count(peaks, labels, n_labels)
        knots, values = posterior_table(peaks, labels, n_labels, n_total)
        method = "labels"
    gain = known_particle_gain(n_total, n_known)
    fresh_values = with_known_particles(values, gain)
    z = clipped_logit(peaks)
    quantiles = np.unique(np.quantile(z, np.linspace(0, 1, N_QUANTILES)))
    calibration = Calibration(tuple(float(v) for v in knots), tuple(float(v) for v in fresh_values),
                              float((n_total + n_known) / n_micrographs), int(n_micrographs), len(peaks),
                              int(n_labels), len(labels), bool(held_out), given,
                              tuple(float(v) for v in quantiles), method=method, suggested_per_micrograph=suggested)
    order = np.argsort(peaks)[::-1]
    raw_threshold, f1 = estimated_best_f1(peaks[order], np.interp(z[order], knots, values), n_total, gain)
    return replace(calibration, best_f1_threshold=float(calibration.apply(np.array([raw_threshold]))[0]),
                   best_f1_estimate=f1)


def known_particle_gain(n_particles: float, n_known: int) -> float:
    """How many times more particles a fresh micrograph's peaks hold than the calibration peaks: (N + known) / N.

    The calibration peaks leave out the particles whose labels trained the model; a micrograph to pick has
    none left out, so its particles are that much more frequent among its peaks (everything else is not).
    Where users label most particles of a micrograph the calibration peaks hold few particles, and a
    posterior read off them under-states a fresh micrograph's, the more so the more was labeled."""
    if n_known <= 0 or n_particles <= 0:
        return 1.0
    return float((n_particles + n_known) / n_particles)


def with_known_particles(posterior: np.ndarray, gain: float) -> np.ndarray:
    """The posterior with the particles' prior odds multiplied by ``gain`` (Saerens et al. 2002: the same
    likelihood ratio, another prior): g·p / (g·p + 1 − p)."""
    p = np.clip(np.asarray(posterior, dtype=np.float64), 0.0, 1.0)
    return gain * p / (gain * p + 1.0 - p)


def estimated_best_f1(peaks_desc: np.ndarray, posterior_desc: np.ndarray, n_particles: float,
                      gain: float = 1.0) -> tuple[float, float]:
    """(raw threshold, F1) maximising the estimated F1 = 2·TP(t) / (#peaks(≥ t) + N) over the peaks (sorted by
    decreasing score), TP(t) the summed posterior of the peaks kept.

    ``gain`` (``known_particle_gain``): the F1 of a fresh micrograph, whose particle peaks are ``gain`` times
    as many: each peak counts p·g particle peaks and 1 − p others, and N becomes g·N."""
    p = np.clip(np.asarray(posterior_desc, dtype=np.float64), 0.0, 1.0)
    n = gain * n_particles
    tp = np.minimum(np.cumsum(gain * p), n)
    kept = np.cumsum(gain * p + 1.0 - p)
    f1 = 2 * tp / (kept + n)
    best = int(np.argmax(f1))
    return float(peaks_desc[best]), float(f1[best])


def fit_gaussians(z: np.ndarray, k: int, iterations: int = 300,
                  start: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(weights, means, standard deviations, log-likelihood) of a ``k``-component Gaussian mixture fitted to
    ``z`` by EM, means increasing, started at ``start`` (weights, means, sds) or, by default, deterministically
    at quantiles from the 15th to the 95th."""
    z = np.asarray(z, dtype=np.float64)
    if start is None:
        w, mu, sd = np.full(k, 1.0 / k), np.quantile(z, np.linspace(0.15, 0.95, k)), np.full(k, max(z.std() / k, 1e-3))
    else:
        w, mu, sd = (np.asarray(v, dtype=np.float64) for v in start)
    for _ in range(iterations):
        resp = _responsibilities(z, w, mu, sd)
        nk = resp.sum(axis=0) + 1e-12
        w, mu = nk / len(z), (resp * z[:, None]).sum(axis=0) / nk
        sd = np.sqrt((resp * (z[:, None] - mu) ** 2).sum(axis=0) / nk) + 1e-3
    order = np.argsort(mu)
    w, mu, sd = w[order], mu[order], sd[order]
    return w, mu, sd, float(_log_densities(z, w, mu, sd).sum())


def _log_joint(z: np.ndarray, w: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return norm.logpdf(z[:, None], mu, sd) + np.log(np.maximum(w, 1e-300))


def _log_densities(z: np.ndarray, w: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return np.logaddexp.reduce(_log_joint(z, w, mu, sd), axis=1)


def _responsibilities(z: np.ndarray, w: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    log_p = _log_joint(z, w, mu, sd)
    return np.exp(log_p - np.logaddexp.reduce(log_p, axis=1)[:, None])


@dataclass(frozen=True)
class Mixture:
    """Gaussians on the peaks' logits, means increasing: the last is the particles, the others the rest."""

    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray

    def posterior(self, z: np.ndarray) -> np.ndarray:
        """The particle (last) component's responsibility at logits ``z``."""
        z = np.atleast_1d(np.asarray(z, dtype=np.float64))
        return _responsibilities(z, self.weights, self.means, self.sds)[:, -1]

    def log_odds(self, z: np.ndarray) -> np.ndarray:
        """log P(particle, z) − log P(other, z)."""
        joint = _log_joint(np.atleast_1d(np.asarray(z, dtype=np.float64)), self.weights, self.means, self.sds)
        return joint[:, -1] - np.logaddexp.reduce(joint[:, :-1], axis=1)

    @property
    def dip_ratio(self) -> float:
        """The lowest density between the particles' mean and the next lower mean over the density at the
        particles' mean: below 1 where the particles have a mode of their own, 1 where the density only rises."""
        x = np.linspace(self.means[-2], self.means[-1], 256)
        density = np.exp(_log_densities(x, self.weights, self.means, self.sds))
        return float(density.min() / density[-1])

    @property
    def separation(self) -> float:
        """Ashman's D of the particles and the component below them: above 2, two populations."""
        return float(math.sqrt(2) * (self.means[-1] - self.means[-2]) / math.hypot(self.sds[-1], self.sds[-2]))


def fit_peak_mixture(z: np.ndarray, background_components: int, z_labels: np.ndarray | None = None) -> Mixture:
    """The particles as one Gaussian, everything else as ``background_components`` Gaussians (EM), started at
    the peaks' quantiles or, given the held-out labels' logits ``z_labels``, at them (``labels_start``)."""
    k = 1 + background_components
    start = None if z_labels is None else labels_start(z, z_labels, background_components)
    return Mixture(*fit_gaussians(z, k, start=start)[:3])


def labels_start(z: np.ndarray, z_labels: np.ndarray, background_components: int,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """An EM start whose particle Gaussian sits on the held-out labels (median, spread at least 0.5 logit,
    weight 0.1) and whose background Gaussians share the peaks below every label, spread over its quartiles;
    None when fewer than two peaks lie below the labels.

    EM from the quantiles can settle with the particle Gaussian on the top of the particles' mode and a
    background Gaussian on the rest of it: on a ring model trained 16 epochs it counted 54 where the peaks
    held about 105 clear particles, and the labels' start found the whole mode (123; benchmarks/RESULTS.md).
    """
    below = z[z < z_labels.min()]
    if len(below) < 2:
        return None
    b = background_components
    means = np.append(np.quantile(below, np.linspace(0.25, 0.75, b)) if b > 1 else [np.median(below)],
                      np.median(z_labels))
    sds = np.append(np.full(b, max(below.std() / b, 1e-3)), max(z_labels.std(), 0.5))
    return np.append(np.full(b, 0.9 / b), 0.1), means, sds


def mixture_posterior(peak_scores: np.ndarray, label_scores: np.ndarray, n_particles: float | None = None,
                      n_knots: int = 200, background_components: tuple[int, ...] = (1, 2),
                      max_count: float = math.inf) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(knots, posterior, particles) from a Gaussian mixture of the peaks' logits, or None when no mixture's
    particles' component is a population of its own (Ashman's D against the component below <
    ``MIN_SEPARATION``, no dip of the density between them (``Mixture.dip_ratio`` > ``MAX_DIP_RATIO``), more
    particles than half the peaks or than ``max_count``) with the held-out labels in it (then the label-recall
    estimate is used).

    Labels are the particles users pick first, isolated and clear, so they score above the typical particle
    and their recall over-states everyone's; the mixture does not rely on them for the count: its upper
    component is the particles, its responsibility (made non-decreasing in the logit) P(particle | score)
    and the sum of that over the peaks their number. The labels only confirm which component is the
    particles and start one of its EM fits. ``n_particles``, when given, replaces the count: the mixture's
    likelihood ratio is kept and its prior odds are scaled until the posteriors sum to it.

    Everything else is fitted with each number of Gaussians in ``background_components``, each mixture by EM
    from two starts (the peaks' quantiles; the particle Gaussian on the labels, ``labels_start``), and of the
    mixtures that pass the checks the one counting the most particles is kept. One Gaussian cannot follow
    flat-topped background peaks (its fit then fails the checks or under-counts); a second one can take the
    particles' lower tail, those cut by an edge or touching a neighbour: BIC, which judged the fit rather
    than the count, chose it on most blob models and under-counted them by 10–20 % (``benchmarks/RESULTS.md``).
    """
    fitted = _mixture_posterior(peak_scores, label_scores, n_particles, n_knots, background_components, max_count)
    return None if fitted is None else fitted[:3]


def _mixture_posterior(peak_scores: np.ndarray, label_scores: np.ndarray, n_particles: float | None,
                       n_knots: int = 200, background_components: tuple[int, ...] = (1, 2),
                       max_count: float = math.inf) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """``mixture_posterior`` plus the count the mixture estimates by itself (the same as the third element
    when no count is given)."""
    z, z_labels = clipped_logit(peak_scores), clipped_logit(label_scores)
    if len(z) < MIN_MIXTURE_PEAKS or len(z_labels) == 0:
        return None
    knots = np.linspace(z.min(), z.max(), n_knots)
    fits = [fit_peak_mixture(z, b, start) for b in background_components for start in (None, z_labels)
            if start is None or labels_start(z, z_labels, b) is not None]  # no start there: the same fit twice
    accepted = [fit for mixture in fits
                if (fit := _accepted_mixture(mixture, z, z_labels, knots, max_count)) is not None]
    if not accepted:
        return None
    mixture, values, estimated = max(accepted, key=lambda fit: fit[2])
    if n_particles is None:
        return knots, values, estimated, estimated
    return knots, _with_count(mixture, knots, z, n_particles), float(n_particles), estimated


def _accepted_mixture(mixture: Mixture, z: np.ndarray, z_labels: np.ndarray, knots: np.ndarray,
                      max_count: float) -> tuple[Mixture, np.ndarray, float] | None:
    """(mixture, posterior at ``knots``, count) when the mixture's particles are a population of their own that
    holds the labels and counts fewer than half the peaks and at most ``max_count``; else None."""
    if (mixture.separation < MIN_SEPARATION or mixture.dip_ratio > MAX_DIP_RATIO
            or np.median(mixture.posterior(z_labels)) < 0.5):
        return None
    values = _monotone(mixture.posterior(knots))
    estimated = float(np.interp(z, knots, values).sum())
    if estimated >= 0.5 * len(z) or estimated > max_count:
        return None  # "particles" that outnumber everything else, or a population the labels do not hold
    return mixture, values, estimated


def _monotone(values: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(np.clip(values, 0.0, 1.0))


def _with_count(mixture: Mixture, knots: np.ndarray, z: np.ndarray, n_particles: float) -> np.ndarray:
    """The mixture's posterior at ``knots`` with its prior odds scaled so the peaks' posteriors sum to
    ``n_particles`` (Saerens et al. 2002: a new prior, the same likelihood ratio)."""
    target = float(np.clip(n_particles, 0.0, len(z)))
    log_odds = mixture.log_odds(z)
    low, high = -60.0, 60.0
    for _ in range(100):  # bisection: the summed posterior increases with the shift
        shift = 0.5 * (low + high)
        if expit(log_odds + shift).sum() < target:
            low = shift
        else:
            high = shift
    return _monotone(expit(mixture.log_odds(knots) + 0.5 * (low + high)))
