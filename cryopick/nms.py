"""Picks from a score map: peaks, sub-sample refinement, greedy NMS, edge exclusion and thresholding.

Pick works on the logit map of the dense classifier: local maxima are candidate particles, a
quadratic fit on each maximum's 3×3 neighbourhood refines its position below the map's stride,
and greedy NMS in original micrograph pixels keeps one pick per particle. Numpy only: the map's
geometry (``cryopick.inference.MapGeometry``) says where its samples lie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import expit

if TYPE_CHECKING:
    from cryopick.inference import MapGeometry

HISTOGRAM_BINS = 10


def local_maxima(score_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of samples at least as high as their 8 neighbours (plateaus give several)."""
    score_map = np.asarray(score_map, dtype=np.float64)
    neighbourhood_max = ndimage.maximum_filter(score_map, size=3, mode="constant", cval=-np.inf)
    rows, cols = np.nonzero((score_map >= neighbourhood_max) & np.isfinite(score_map))
    return rows, cols


def _quadratic_fit_matrix() -> np.ndarray:
    """Least-squares solver mapping the 9 samples of a 3×3 window to the coefficients of
    ``c0 + c1·u + c2·v + c3·u² + c4·u·v + c5·v²`` (u = column offset, v = row offset)."""
    v, u = np.mgrid[-1:2, -1:2]
    u, v = u.ravel().astype(np.float64), v.ravel().astype(np.float64)
    design = np.stack([np.ones(9), u, v, u * u, u * v, v * v], axis=1)
    return np.linalg.pinv(design)


_QUADRATIC_FIT = _quadratic_fit_matrix()


def refine_peaks(score_map: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-sample offsets ``(drow, dcol)`` in [-0.5, 0.5] of the peaks at ``(rows, cols)``.

    The vertex of a quadratic surface fitted to the 3×3 neighbourhood; where the fit is not a
    maximum (saddle, ridge), each axis gets its own 1-D parabola through the centre row/column.
    The map is mirrored at its border so a peak on the border is not moved.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0), np.zeros(0)
    padded = np.pad(np.asarray(score_map, dtype=np.float64), 1, mode="reflect" if min(score_map.shape) > 1 else "edge")
    offsets = np.arange(-1, 2)
    row_index = (rows + 1)[:, None, None] + offsets[None, :, None]
    col_index = (cols + 1)[:, None, None] + offsets[None, None, :]
    windows = padded[row_index, col_index]
    coeffs = windows.reshape(len(rows), 9) @ _QUADRATIC_FIT.T
    _, c1, c2, c3, c4, c5 = coeffs.T
    hxx, hxy, hyy = 2 * c3, c4, 2 * c5
    det = hxx * hyy - hxy * hxy
    # a clear maximum: both curvatures negative and the surface not (numerically) a ridge
    is_maximum = (hxx < 0) & (hyy < 0) & (det > 1e-9 * (hxx * hxx + hyy * hyy))
    safe_det = np.where(is_maximum, det, 1.0)
    dcol_2d = -(hyy * c1 - hxy * c2) / safe_det
    drow_2d = -(hxx * c2 - hxy * c1) / safe_det
    centre = windows[:, 1, 1]
    dcol_1d = _parabola_vertex(windows[:, 1, 0], centre, windows[:, 1, 2])
    drow_1d = _parabola_vertex(windows[:, 0, 1], centre, windows[:, 2, 1])
    drow = np.where(is_maximum, drow_2d, drow_1d)
    dcol = np.where(is_maximum, dcol_2d, dcol_1d)
    return np.clip(drow, -0.5, 0.5), np.clip(dcol, -0.5, 0.5)


def _parabola_vertex(left: np.ndarray, centre: np.ndarray, right: np.ndarray) -> np.ndarray:
    curvature = left - 2 * centre + right
    ok = curvature < 0
    return np.where(ok, (left - right) / (2 * np.where(ok, curvature, -1.0)), 0.0)


def greedy_nms(x: np.ndarray, y: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the picks kept, best first: no two kept picks are closer than ``radius``.

    Highest score first; equal scores are taken in (y, x) order so results never depend on the
    input order. A pick closer than ``radius`` to an already kept pick is suppressed.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((x, y, -scores))
    if radius <= 0 or len(order) < 2:
        return order
    points = np.stack([x, y], axis=1)
    tree = cKDTree(points)
    within = np.nextafter(float(radius), 0.0)  # query_ball_point includes the boundary; NMS excludes it
    suppressed = np.zeros(len(order), dtype=bool)
    kept = []
    for index in order:
        if suppressed[index]:
            continue
        kept.append(index)
        suppressed[tree.query_ball_point(points[index], within)] = True
    return np.asarray(kept, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# picks from one score map


@dataclass(frozen=True)
class Picks:
    """Centres in original pixels (x = column, y = row) and probabilities, best first."""

    x: np.ndarray
    y: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def take(self, index) -> "Picks":
        return Picks(self.x[index], self.y[index], self.score[index])


def candidate_picks(logits: np.ndarray, geometry: MapGeometry, binned_shape: tuple[int, int],
                    shape: tuple[int, int], radius_px: float, edge: float = 0.0,
                    calibrate: Callable[[np.ndarray], np.ndarray] | None = None,
                    halve_border_peaks: bool = False) -> Picks:
    """Every peak of the map inside the micrograph and ``edge`` px from its border, after NMS.

    Scores are σ(logit), mapped by ``calibrate`` when given; ``halve_border_peaks`` (pick's final
    probabilities) multiplies them by ``inside_probability`` (a peak on the reflection axis at the border is
    half as likely to be a particle centred inside), before NMS so that such a peak cannot suppress a better one.
    Thresholding afterwards gives the same picks as thresholding first: greedy NMS only lets a
    pick be suppressed by a better one.
    """
    # peaks among the samples inside the micrograph: where the border's mirror axis lies between two samples
    # (right and bottom borders, as a rule), a particle straddling it peaks on the sample just outside, and
    # its inside neighbour is where it must be picked; refinement still reads the samples outside
    rows, cols = local_maxima(np.where(inside_samples(logits.shape, geometry, binned_shape), logits, -np.inf))
    drow, dcol = refine_peaks(logits, rows, cols)
    x, y = geometry.to_original(rows + drow, cols + dcol)
    # RELION's Extract truncates coordinates to integers; rounding here centres its boxes on the nearest pixel
    x = np.clip(np.rint(x), 0, shape[1] - 1)
    y = np.clip(np.rint(y), 0, shape[0] - 1)
    away = away_from_edges(x, y, shape, edge)
    x, y = x[away], y[away]
    score = expit(logits[rows[away], cols[away]].astype(np.float64))
    if calibrate is not None:
        score = calibrate(score)
    if halve_border_peaks:
        score = score * inside_probability(x, y, shape, geometry.mirror_band())
    candidates = Picks(x, y, score)
    return candidates.take(greedy_nms(candidates.x, candidates.y, candidates.score, radius_px))


def inside_samples(map_shape: tuple[int, int], geometry: MapGeometry, binned_shape: tuple[int, int]) -> np.ndarray:
    """Mask of the score-map samples whose centres lie inside the binned micrograph."""
    y_binned, x_binned = geometry.to_binned(np.arange(map_shape[0]), np.arange(map_shape[1]))
    rows_inside = (y_binned >= 0) & (y_binned < binned_shape[0])
    cols_inside = (x_binned >= 0) & (x_binned < binned_shape[1])
    return rows_inside[:, None] & cols_inside[None, :]


def inside_probability(x: np.ndarray, y: np.ndarray, shape: tuple[int, int],
                       band: tuple[float, float]) -> np.ndarray:
    """P(the particle of a peak at (x, y) is centred inside the micrograph), from where the peak lies.

    Micrographs are reflect-padded, so near the border the map is (up to the network's own asymmetry)
    mirror-symmetric about the border's pixel: a particle centred d px outside, half of it visible, looks
    like one centred d px inside, and both give a peak on the axis. Within ``band`` = (rows, cols) original
    px of the border (half a map sample: closer than that the map cannot tell a centre from its mirror
    image), and with particles as dense on either side, the centre is inside with probability 1/2.
    """
    by, bx = band
    on_axis = (x < bx) | (x > shape[1] - 1 - bx) | (y < by) | (y > shape[0] - 1 - by)
    return np.where(on_axis, 0.5, 1.0)


def away_from_edges(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], edge: float) -> np.ndarray:
    """Mask of centres whose RELION box of edge ``2·edge`` lies inside the micrograph.

    RELION cuts ``x − B/2 … x + B/2 − 1``, so a box of B = 2·edge fits for ``edge ≤ x ≤ nx − edge``.
    """
    return (x >= edge) & (x <= shape[1] - edge) & (y >= edge) & (y <= shape[0] - edge)


# ---------------------------------------------------------------------------------------------
# thresholds


def select_picks(candidates: Picks, threshold: float, max_picks: int | None = None) -> Picks:
    """Candidates (best first) with probability ≥ ``threshold``, at most ``max_picks`` of them."""
    kept = candidates.take(candidates.score >= threshold)
    return kept.take(slice(0, max_picks)) if max_picks is not None else kept


def threshold_for_expected(scores: np.ndarray, n_micrographs: int, expected: float) -> float | None:
    """Probability threshold giving about ``expected`` picks per micrograph over ``scores``."""
    wanted = int(round(expected * n_micrographs))
    if n_micrographs == 0 or wanted <= 0 or len(scores) == 0:
        return None
    ordered = np.sort(np.asarray(scores))[::-1]
    return float(ordered[min(wanted, len(ordered)) - 1])


def score_histogram(scores: np.ndarray) -> list[int]:
    """Candidates per 0.1 of probability (``HISTOGRAM_BINS`` bins over [0, 1])."""
    counts, _ = np.histogram(np.asarray(scores, dtype=np.float64), bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return [int(c) for c in counts]
