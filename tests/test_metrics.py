"""Ranking and classification metrics on hand-made cases with hand-computed expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryopick.errors import CryopickError
from cryopick.metrics import (
    average_precision,
    best_f1,
    binary_metrics,
    precision_recall_curve,
    pu_corrected_auc,
    roc_auc,
)


def test_average_precision_by_hand():
    # ranking [TP, FP, TP], 3 references: (1/3)·1 + 0·(1/2) + (1/3)·(2/3) = 0.5556
    precision, recall, thresholds = precision_recall_curve(np.array([0.9, 0.8, 0.7]),
                                                           np.array([True, False, True]), n_truth=3)
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7])
    assert average_precision(precision, recall) == pytest.approx(1 / 3 + (1 / 3) * (2 / 3))
    assert average_precision(precision, recall) == pytest.approx(0.5556, abs=1e-4)


def test_tied_scores_form_one_curve_point():
    # scores 0.9 (FP), then 0.5 twice (TP, FP) as one group; 3 references.
    # Points: (P=0, R=0) at 0.9, (P=1/3, R=1/3) at 0.5 -> AP = (1/3)·(1/3) = 1/9.
    # Without grouping the TP would be ranked second: AP = (1/3)·(1/2) = 1/6.
    precision, recall, thresholds = precision_recall_curve(np.array([0.5, 0.5, 0.9]),
                                                           np.array([True, False, False]), n_truth=3)
    np.testing.assert_allclose(precision, [0.0, 1 / 3])
    np.testing.assert_allclose(recall, [0.0, 1 / 3])
    np.testing.assert_allclose(thresholds, [0.9, 0.5])
    assert average_precision(precision, recall) == pytest.approx(1 / 9)


def test_best_f1_by_hand():
    # [TP, FP, TP] of 3 references: F1 = 2TP/(k + 3) = 2/4, 2/5, 4/6 -> best 2/3 at the last score
    precision, recall, thresholds = precision_recall_curve(np.array([0.9, 0.8, 0.7]),
                                                           np.array([True, False, True]), n_truth=3)
    f1, threshold = best_f1(precision, recall, thresholds)
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.7)


def test_unscored_picks_rank_below_scored_ones():
    precision, recall, thresholds = precision_recall_curve(np.array([np.nan, 0.1]), np.array([False, True]), 1)
    np.testing.assert_allclose(precision, [1.0, 0.5])
    assert thresholds[0] == pytest.approx(0.1) and thresholds[1] == -np.inf


def test_roc_auc_with_ties_by_hand():
    # positives 0.9, 0.5; negatives 0.5, 0.1. Pairs: (0.9>0.5)=1, (0.9>0.1)=1, (0.5=0.5)=1/2, (0.5>0.1)=1 -> 3.5/4
    assert roc_auc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert roc_auc([0.3, 0.3, 0.3], [1, 0, 1]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([0.3, 0.4], [1, 1]))


def test_binary_metrics_by_hand():
    # predicted positive at >= 0.5: [1, 1, 0, 0] vs labels [1, 0, 1, 0] -> TP 1, FP 1, FN 1, TN 1
    m = binary_metrics([0.9, 0.6, 0.4, 0.2], [1, 0, 1, 0])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.5, 0.5, 0.5, 0.5)
    assert m["auc"] == pytest.approx(0.75)  # 0.9 beats both negatives, 0.4 only beats 0.2
    assert (m["n_pos"], m["n_neg"]) == (2, 2)
    assert binary_metrics([0.9, 0.6, 0.4, 0.2], [1, 0, 1, 0], threshold=0.95)["f1"] == 0.0


def test_pu_corrected_auc():
    assert pu_corrected_auc(0.8, 0.2) == pytest.approx((0.8 - 0.1) / 0.8)
    # a perfect classifier scores π/2 + (1 − π) against unlabeled data; the correction recovers 1
    assert pu_corrected_auc(0.3 / 2 + 0.7, 0.3) == pytest.approx(1.0)
    assert pu_corrected_auc(0.75, 0.0) == 0.75
    with pytest.raises(CryopickError, match="prior"):
        pu_corrected_auc(0.8, 1.0)


def _imported_by(module: str) -> set[str]:
    """The cryopick modules a fresh interpreter has loaded after importing ``module``."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('cryopick')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})
    return set(done.stdout.split())


def test_evaluation_and_training_do_not_import_each_other():
    assert not {"cryopick.train", "cryopick.trainstep"} & _imported_by("cryopick.evaluate, cryopick.validation")
    assert "cryopick.evaluate" not in _imported_by("cryopick.train")


def test_auc_standard_error_by_hand():
    from cryopick.metrics import auc_standard_error

    # Hanley–McNeil, A = 0.75, 2 positives, 3 negatives: Q1 = 0.6, Q2 = 0.642857;
    # var = (0.1875 + 1·0.0375 + 2·0.080357) / 6 = 0.0642857
    assert auc_standard_error(0.75, 2, 3) == pytest.approx(math.sqrt(0.0642857), rel=1e-5)
    assert auc_standard_error(0.95, 10, 900) == pytest.approx(0.0482, abs=1e-3)  # a dense run's held-out labels
    assert auc_standard_error(0.9, 0, 10) == math.inf
