"""One-to-one matching of picks to reference coordinates within a radius (Hungarian or greedy), shared by
``cryopick.evaluate`` and the calibration of training (``cryopick.calibrate_model``)."""

from __future__ import annotations

import math

import numpy as np

from cryopick.errors import CryopickError
from cryopick.metrics import rank_key

MATCH_METHODS = ("hungarian", "greedy")


def as_xy(points: np.ndarray, what: str) -> np.ndarray:
    xy = np.asarray(points, dtype=np.float64)
    if xy.size == 0:
        return xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"{what} must be an (N, 2) array of x, y centres, got shape {xy.shape}")
    return xy


def _score_ranks(scores: np.ndarray) -> np.ndarray:
    """Dense rank per pick, 0 = highest score; equal scores share a rank."""
    _, inverse = np.unique(-rank_key(scores), return_inverse=True)
    return inverse.reshape(-1)


def _pairs_within(picks_xy: np.ndarray, truth_xy: np.ndarray, radius: float):
    """All (pick, reference, distance) pairs with distance <= radius."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(picks_xy).sparse_distance_matrix(cKDTree(truth_xy), radius, output_type="ndarray")
    return pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"].astype(np.float64)


def _match_greedy(pick_idx, ref_idx, dist, ranks, n_picks: int, n_truth: int) -> np.ndarray:
    """Picks in descending score order take the nearest free reference.

    Candidate pairs are taken in order of (pick score descending, distance, pick index, reference index), so
    among equally scored picks the closest pair goes first, whatever the input order.
    """
    matched = np.zeros(n_picks, dtype=bool)
    taken = np.zeros(n_truth, dtype=bool)
    order = np.lexsort((ref_idx, pick_idx, dist, ranks[pick_idx]))
    for p, r in zip(pick_idx[order], ref_idx[order]):
        if not matched[p] and not taken[r]:
            matched[p] = taken[r] = True
    return matched


def _assignment_costs(local_ranks: np.ndarray, dist: np.ndarray, radius: float, k: int) -> np.ndarray:
    """Costs whose minimum-sum assignment is lexicographic: most matches, then best-ranked picks, then closest.

    A match costs −1; the rank term of all matches together stays below one match (``b·k·max_rank < 1``) and
    the distance term of all matches together below one rank step (``c·k < b``).
    """
    b = 1.0 / (k * (int(local_ranks.max()) + 1) + 1)
    c = b / (k + 1)
    return -1.0 + b * local_ranks + c * (dist / radius)


def _match_hungarian(pick_idx, ref_idx, dist, ranks, n_picks: int, n_truth: int, radius: float) -> np.ndarray:
    """Maximum one-to-one matching, solved per connected group of picks and references."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    matched = np.zeros(n_picks, dtype=bool)
    n_nodes = n_picks + n_truth
    graph = coo_matrix((np.ones(len(pick_idx)), (pick_idx, n_picks + ref_idx)), shape=(n_nodes, n_nodes))
    _, component = connected_components(graph, directed=False)
    edge_component = component[pick_idx]
    order = np.argsort(edge_component, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(edge_component[order]) != 0])
    for edges in np.split(order, starts[1:]):
        if len(edges) == 1:  # the common case: one pick near one reference, nothing to decide
            matched[pick_idx[edges[0]]] = True
            continue
        rows, row_of_edge = np.unique(pick_idx[edges], return_inverse=True)
        cols, col_of_edge = np.unique(ref_idx[edges], return_inverse=True)
        _, local_ranks = np.unique(ranks[rows], return_inverse=True)
        k = min(len(rows), len(cols))
        # Pairs beyond the radius cost 0, the same as leaving both unmatched, so they are never preferred
        # and are dropped after solving.
        cost = np.zeros((len(rows), len(cols)))
        allowed = np.zeros((len(rows), len(cols)), dtype=bool)
        cost[row_of_edge, col_of_edge] = _assignment_costs(local_ranks[row_of_edge], dist[edges], radius, k)
        allowed[row_of_edge, col_of_edge] = True
        r, c = linear_sum_assignment(cost)
        matched[rows[r[allowed[r, c]]]] = True
    return matched


def check_matching(radius: float, method: str) -> None:
    if method not in MATCH_METHODS:
        raise CryopickError(f"unknown matching method {method!r}; choose one of {', '.join(MATCH_METHODS)}")
    if not (isinstance(radius, (int, float, np.number)) and math.isfinite(radius) and radius > 0):
        raise CryopickError(f"the matching radius must be a positive number of pixels, got {radius!r}")


def match_picks(picks_xy: np.ndarray, scores: np.ndarray, truth_xy: np.ndarray, radius: float,
                method: str = "hungarian") -> np.ndarray:
    """Boolean array over picks: True where the pick is matched one-to-one to a reference within ``radius`` px.

    ``hungarian`` maximises the number of matched pairs with ``scipy.optimize.linear_sum_assignment``, as
    Topaz ``precision_recall_curve`` does (Topaz minimises the sum of d² − r², which may trade a match for a
    closer pair; here the count always comes first); among maximum matchings it prefers higher-scored picks,
    then shorter distances. ``greedy`` lets picks in descending score order take the nearest free reference
    (COCO-style). Both are deterministic.
    """
    check_matching(radius, method)
    picks_xy = as_xy(picks_xy, "picks_xy")
    truth_xy = as_xy(truth_xy, "truth_xy")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(picks_xy):
        raise ValueError(f"{len(scores)} scores for {len(picks_xy)} picks")
    n_picks, n_truth = len(picks_xy), len(truth_xy)
    if n_picks == 0 or n_truth == 0:
        return np.zeros(n_picks, dtype=bool)
    pick_idx, ref_idx, dist = _pairs_within(picks_xy, truth_xy, radius)
    if len(pick_idx) == 0:
        return np.zeros(n_picks, dtype=bool)
    ranks = _score_ranks(scores)
    if method == "greedy":
        return _match_greedy(pick_idx, ref_idx, dist, ranks, n_picks, n_truth)
    return _match_hungarian(pick_idx, ref_idx, dist, ranks, n_picks, n_truth, radius)
