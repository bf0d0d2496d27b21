"""Ranking and classification metrics: precision-recall curve, AP, best F1, ROC AUC, PU-corrected AUC.

Used by ``cryopick evaluate`` (picks vs references) and by training's validation (patches). Ratios whose
denominator is zero are NaN, except F1 = 2·TP / (n_picks + n_truth), defined whenever there are picks or
references. Missing scores (NaN) rank below every real score.
"""

from __future__ import annotations

import math

import numpy as np

from cryopick.errors import CryopickError


def rank_key(scores: np.ndarray) -> np.ndarray:
    """Scores as ranking keys: a missing score (NaN) ranks below every real score."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(np.isnan(scores), -np.inf, scores)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is zero."""
    return float(numerator) / float(denominator) if denominator else math.nan


def f1_from_counts(n_matched: int, n_picks: int, n_truth: int) -> float:
    """F1 = 2·TP / (n_picks + n_truth)."""
    return ratio(2 * n_matched, n_picks + n_truth)


def precision_recall_curve(scores: np.ndarray, matched: np.ndarray,
                           n_truth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), one point per group of equal scores, highest score first.

    Point k counts the picks with ``score >= thresholds[k]``; recall divides by ``n_truth`` (all references,
    found or not), so it is NaN when there are none.
    """
    key = rank_key(scores).reshape(-1)
    hits = np.asarray(matched, dtype=bool).reshape(-1)
    if len(key) != len(hits):
        raise ValueError(f"{len(key)} scores for {len(hits)} match flags")
    if int(hits.sum()) > n_truth:
        raise ValueError(f"{int(hits.sum())} matched picks but only {n_truth} references")
    if len(key) == 0:
        empty = np.zeros(0)
        return empty, empty.copy(), empty.copy()
    order = np.argsort(-key, kind="stable")
    sorted_key = key[order]
    group_end = np.r_[sorted_key[1:] != sorted_key[:-1], True]
    true_pos = np.cumsum(hits[order])[group_end].astype(np.float64)
    n_kept = (np.flatnonzero(group_end) + 1).astype(np.float64)
    precision = true_pos / n_kept
    recall = true_pos / n_truth if n_truth > 0 else np.full(len(true_pos), np.nan)
    return precision, recall, sorted_key[group_end]


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Non-interpolated AP: sum over curve points of (R_k − R_{k−1})·P_k with R_0 = 0.

    Example: ranking [TP, FP, TP] with 3 references gives (1/3)·1 + 0·(1/2) + (1/3)·(2/3) = 0.5556.
    An empty curve (no picks) gives 0.
    """
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    if len(precision) != len(recall):
        raise ValueError(f"{len(precision)} precision values for {len(recall)} recall values")
    if len(recall) == 0:
        return 0.0
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1_curve(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    f1[np.isnan(total)] = np.nan  # no references: recall, hence F1, undefined
    return f1


def best_f1(precision: np.ndarray, recall: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """(best F1 over the curve, its threshold); the highest threshold wins ties; (0, NaN) for an empty curve."""
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    index = best_f1_index(precision, recall)
    if index is None:
        return (0.0, math.nan) if len(precision) == 0 else (math.nan, math.nan)
    return float(f1_curve(precision, recall)[index]), float(np.asarray(thresholds)[index])


def best_f1_index(precision: np.ndarray, recall: np.ndarray) -> int | None:
    f1 = f1_curve(precision, recall)
    if len(f1) == 0 or np.all(np.isnan(f1)):
        return None
    return int(np.nanargmax(f1))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score_pos > score_neg) + 0.5·P(tie); NaN if a class is missing."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)  # average ranks: a tied positive/negative pair counts one half
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float | int]:
    """Classifier metrics at ``probs >= threshold``: auc, precision, recall, f1, accuracy, n_pos, n_neg."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    predicted = probs >= threshold
    true_pos = int(np.sum(predicted & labels))
    n_pos = int(labels.sum())
    return {
        "auc": roc_auc(probs, labels),
        "precision": ratio(true_pos, int(predicted.sum())),
        "recall": ratio(true_pos, n_pos),
        "f1": f1_from_counts(true_pos, int(predicted.sum()), n_pos),
        "accuracy": ratio(int(np.sum(predicted == labels)), len(labels)),
        "n_pos": n_pos,
        "n_neg": len(labels) - n_pos,
    }


def pu_corrected_auc(auc_pu: float, prior: float) -> float:
    """AUC against true negatives from the AUC of labeled positives vs unlabeled data.

    The unlabeled set holds a fraction π of positives, which score like positives (AUC 1/2 against them),
    so AUC_PU = π/2 + (1 − π)·AUC_PN, hence AUC_PN = (AUC_PU − π/2)/(1 − π) (Menon et al. 2015; Kiryo 2017).
    """
    if not (0.0 <= prior < 1.0):
        raise CryopickError(f"the class prior must lie in [0, 1), got {prior}")
    return (auc_pu - prior / 2.0) / (1.0 - prior)


def auc_standard_error(auc: float, n_positive: int, n_negative: int) -> float:
    """Standard error of an AUC from ``n_positive`` and ``n_negative`` scores (Hanley & McNeil 1982)."""
    if n_positive <= 0 or n_negative <= 0:
        return math.inf
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_positive - 1) * (q1 - auc * auc) + (n_negative - 1) * (q2 - auc * auc))
    return math.sqrt(max(variance, 0.0) / (n_positive * n_negative))
