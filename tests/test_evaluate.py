"""Evaluation metrics on hand-made cases (hand-computed expectations) and on real coordinate files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from cryopick.errors import CryopickError
from cryopick.evaluate import (
    EvaluationReport,
    evaluate_coordinates,
    match_picks,
    print_report,
    write_report_csv,
    write_report_json,
)

TRUTH_XY = np.array([[100.0, 100.0], [300.0, 120.0], [200.0, 400.0]])


def _frame(xy, scores=None) -> pd.DataFrame:
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    scores = np.full(len(xy), np.nan) if scores is None else np.asarray(scores, dtype=float)
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "score": scores})


# ---------------------------------------------------------------------------------------------- matching

@pytest.mark.parametrize("method", ["hungarian", "greedy"])
def test_perfect_picks_score_one_everywhere(method):
    report = evaluate_coordinates({"m": _frame(TRUTH_XY + 2.0, [0.9, 0.8, 0.7])}, {"m": _frame(TRUTH_XY)},
                                  radius=10, method=method)
    o = report.overall
    assert (o["precision"], o["recall"], o["f1"], o["ap"], o["best_f1"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert o["best_threshold"] == pytest.approx(0.7)  # all three picks are needed for recall 1
    assert (o["n_picks"], o["n_truth"], o["n_matched"]) == (3, 3, 3)


@pytest.mark.parametrize("method", ["hungarian", "greedy"])
def test_picks_shifted_beyond_radius_match_nothing(method):
    report = evaluate_coordinates({"m": _frame(TRUTH_XY + [10.5, 0.0], [0.9, 0.8, 0.7])},
                                  {"m": _frame(TRUTH_XY)}, radius=10, method=method)
    o = report.overall
    assert (o["precision"], o["recall"], o["f1"], o["ap"], o["n_matched"]) == (0.0, 0.0, 0.0, 0.0, 0)


def test_radius_is_inclusive():
    # (6, 8) away: distance exactly 10
    assert match_picks([[106.0, 108.0]], [1.0], [[100.0, 100.0]], radius=10).tolist() == [True]
    assert match_picks([[106.0, 108.0]], [1.0], [[100.0, 100.0]], radius=9.99).tolist() == [False]


@pytest.mark.parametrize("method", ["hungarian", "greedy"])
def test_duplicate_picks_on_one_particle_count_once(method):
    # The higher-scored pick is farther away; it still takes the particle, the duplicate is a false positive.
    picks = _frame([[104.0, 100.0], [101.0, 100.0]], [0.9, 0.8])
    matched = match_picks(picks[["x", "y"]].to_numpy(), picks["score"].to_numpy(), TRUTH_XY[:1], 10, method)
    assert matched.tolist() == [True, False]
    o = evaluate_coordinates({"m": picks}, {"m": _frame(TRUTH_XY[:1])}, radius=10, method=method).overall
    assert o["precision"] == 0.5
    assert o["recall"] == 1.0
    assert o["f1"] == pytest.approx(2 * 1 / (2 + 1))  # 2·TP / (n_picks + n_truth)
    assert o["ap"] == 1.0  # the first-ranked pick already finds the only particle


@pytest.mark.parametrize("method", ["hungarian", "greedy"])
def test_equally_scored_duplicates_credit_the_closer_pick(method):
    matched = match_picks([[104.0, 100.0], [101.0, 100.0]], [0.5, 0.5], TRUTH_XY[:1], 10, method)
    assert matched.tolist() == [False, True]


def test_empty_picks_give_zero_recall_and_ap():
    report = evaluate_coordinates({"m": _frame(np.zeros((0, 2)))}, {"m": _frame(TRUTH_XY)}, radius=10)
    o = report.overall
    assert (o["recall"], o["ap"], o["f1"], o["n_picks"]) == (0.0, 0.0, 0.0, 0)
    assert math.isnan(o["precision"])  # no picks: precision undefined
    assert math.isnan(o["best_threshold"])


def test_greedy_and_hungarian_differ():
    # Pick 0 (score 0.9) is 3 px from A and 5 px from B; pick 1 (score 0.5) is 4 px from A only.
    # Greedy: pick 0 takes its nearest, A, and pick 1 is left with nothing (B is 12 px away).
    # Hungarian: pick 0 -> B, pick 1 -> A, two matches.
    truth = np.array([[0.0, 0.0], [8.0, 0.0]])
    picks = np.array([[3.0, 0.0], [-4.0, 0.0]])
    scores = np.array([0.9, 0.5])
    assert match_picks(picks, scores, truth, 6, "greedy").tolist() == [True, False]
    assert match_picks(picks, scores, truth, 6, "hungarian").tolist() == [True, True]


def test_hungarian_finds_a_maximum_matching():
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    picks = rng.uniform(0, 200, (150, 2))
    truth = rng.uniform(0, 200, (120, 2))
    radius = 12.0
    matched = match_picks(picks, rng.normal(size=150), truth, radius)
    reference = maximum_bipartite_matching(csr_matrix(cdist(picks, truth) <= radius), perm_type="column")
    assert matched.sum() == (reference >= 0).sum()
    assert match_picks(picks, rng.normal(size=150), truth, radius, "greedy").sum() <= matched.sum()


def test_matching_rejects_bad_arguments():
    with pytest.raises(CryopickError, match="radius"):
        match_picks([[0.0, 0.0]], [1.0], [[0.0, 0.0]], radius=0)
    with pytest.raises(CryopickError, match="method"):
        match_picks([[0.0, 0.0]], [1.0], [[0.0, 0.0]], radius=5, method="nearest")


# ---------------------------------------------------------------------------------------------- pooling

def test_micrograph_without_picks_counts_as_misses_and_unreferenced_picks_are_skipped():
    truth = {"a": _frame(TRUTH_XY[:2]), "b": _frame(TRUTH_XY[1:])}
    picks = {"a": _frame(TRUTH_XY[:2], [0.9, 0.8]), "c": _frame(TRUTH_XY, [1.0, 1.0, 1.0])}
    report = evaluate_coordinates(picks, truth, radius=10)
    by_name = {r.name: r for r in report.per_micrograph}
    assert set(by_name) == {"a", "b"}
    assert (by_name["b"].n_picks, by_name["b"].n_truth, by_name["b"].recall, by_name["b"].ap) == (0, 2, 0.0, 0.0)
    assert (by_name["a"].precision, by_name["a"].recall, by_name["a"].ap) == (1.0, 1.0, 1.0)
    o = report.overall
    # both picks right, 2 of 4 references found: P = 1, R = 1/2, AP = 1·(1/2)
    assert (o["precision"], o["recall"], o["ap"]) == (1.0, 0.5, 0.5)
    assert o["f1"] == pytest.approx(2 * 2 / (2 + 4))
    assert report.skipped == ["c: no reference coordinates"]


def test_picks_on_micrograph_with_empty_reference_are_false_positives():
    truth = {"a": _frame(TRUTH_XY[:1]), "empty": _frame(np.zeros((0, 2)))}
    picks = {"a": _frame(TRUTH_XY[:1], [0.5]), "empty": _frame([[5.0, 5.0]], [0.9])}
    report = evaluate_coordinates(picks, truth, radius=10)
    o = report.overall
    # pooled ranking [FP (0.9), TP (0.5)] over 1 reference: AP = 1·(1/2)
    assert (o["precision"], o["recall"], o["ap"]) == (0.5, 1.0, 0.5)
    empty = [r for r in report.per_micrograph if r.name == "empty"][0]
    assert empty.precision == 0.0 and math.isnan(empty.recall) and math.isnan(empty.ap)


def test_threshold_counts_only_picks_at_or_above_it():
    # picks on the 3 references with scores 0.9, 0.5, 0.2 plus a false positive at 0.6
    picks = _frame(np.vstack([TRUTH_XY, [[500.0, 500.0]]]), [0.9, 0.5, 0.2, 0.6])
    report = evaluate_coordinates({"m": picks}, {"m": _frame(TRUTH_XY)}, radius=10, threshold=0.5)
    o = report.overall
    # kept: 0.9 (TP), 0.6 (FP), 0.5 (TP)
    assert (o["n_picks"], o["n_matched"], o["precision"], o["recall"]) == (3, 2, 2 / 3, 2 / 3)
    assert o["threshold"] == 0.5
    # AP uses every pick: [TP, FP, TP, TP] -> 1/3 + (1/3)(2/3) + (1/3)(3/4)
    assert o["ap"] == pytest.approx(1 / 3 + 2 / 9 + 1 / 4)


def test_threshold_needs_scores():
    with pytest.raises(CryopickError, match="no scores"):
        evaluate_coordinates({"m": _frame(TRUTH_XY)}, {"m": _frame(TRUTH_XY)}, radius=10, threshold=0.5)


# ---------------------------------------------------------------------------------------------- output

def _small_report() -> EvaluationReport:
    truth = {"a": _frame(TRUTH_XY[:2]), "b": _frame(TRUTH_XY[1:])}
    picks = {"a": _frame(TRUTH_XY[:2], [0.9, 0.8])}
    return evaluate_coordinates(picks, truth, radius=10)


def test_json_and_csv_reports(tmp_path):
    report = _small_report()
    write_report_json(report, tmp_path / "out" / "report.json")
    write_report_csv(report, tmp_path / "out" / "report.csv")
    data = json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON: NaN became null
    assert data["overall"]["recall"] == 0.5 and data["overall"]["method"] == "hungarian"
    assert data["curve"] == {"threshold": [0.9, 0.8], "precision": [1.0, 1.0], "recall": [0.25, 0.5]}
    b = [r for r in data["per_micrograph"] if r["name"] == "b"][0]
    assert b["precision"] is None and b["n_truth"] == 2
    table = pd.read_csv(tmp_path / "out" / "report.csv")
    assert list(table.columns) == ["name", "n_picks", "n_truth", "n_matched", "precision", "recall", "f1", "ap"]
    assert table["n_matched"].tolist() == [2, 0]
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_print_report_lists_micrographs_and_overall():
    from rich.console import Console

    console = Console(record=True, width=200)
    print_report(_small_report(), console)
    text = console.export_text()
    assert "overall" in text and "AP 0.500" in text and "2/4 references" in text
    assert any(line.strip().startswith("│ b") for line in text.splitlines())


def test_plot_pr_curve(tmp_path):
    pytest.importorskip("matplotlib")
    from cryopick.evaluate import plot_pr_curve

    plot_pr_curve(_small_report(), tmp_path / "pr.png")
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- files

def _write_truth_star(path, xy) -> None:
    from cryopick.fsutil import write_text_atomic
    from cryopick.io.relion import star_loop

    write_text_atomic(path, star_loop("", ["rlnCoordinateX", "rlnCoordinateY"], [tuple(map(float, p)) for p in xy]))


def _write_pick_files(tmp_path):
    from cryopick.io.relion import write_coordinate_star

    truth_a = TRUTH_XY
    truth_b = np.array([[50.0, 60.0], [400.0, 450.0]])
    _write_truth_star(tmp_path / "truth" / "mic_a.star", truth_a)
    _write_truth_star(tmp_path / "truth" / "mic_b.star", truth_b)
    picks = tmp_path / "picks"
    # mic_a: the 3 particles (3 px off) at 0.9, 0.7, 0.4 and a false positive at 0.8
    a = np.vstack([truth_a + [3.0, 0.0], [[600.0, 600.0]]])
    write_coordinate_star(picks / "mic_a_cryopick.star", a[:, 0], a[:, 1], [0.9, 0.7, 0.4, 0.8])
    # mic_b: one particle picked twice (0.6, 0.5), the other missed
    b = np.array([[52.0, 60.0], [47.0, 63.0]])
    write_coordinate_star(picks / "mic_b_cryopick.star", b[:, 0], b[:, 1], [0.6, 0.5])
    # mic_c has no reference
    write_coordinate_star(picks / "mic_c_cryopick.star", [10.0, 20.0], [10.0, 20.0], [0.99, 0.98])
    return picks


def test_evaluate_reads_star_files_and_gives_hand_computed_numbers(tmp_path):
    from cryopick.evaluate import evaluate

    picks = _write_pick_files(tmp_path)
    report = evaluate(picks, tmp_path / "truth", radius=10, threshold=0.55)
    o = report.overall
    # Kept at 0.55: 0.9 TP, 0.8 FP, 0.7 TP (mic_a), 0.6 TP (mic_b) -> 3 of 4 picks, 3 of 5 references
    assert (o["n_picks"], o["n_matched"], o["n_truth"], o["n_micrographs"]) == (4, 3, 5, 2)
    assert (o["precision"], o["recall"]) == (0.75, 0.6)
    assert o["f1"] == pytest.approx(2 * 3 / (4 + 5))
    # Pooled ranking: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 TP, 0.5 FP (duplicate), 0.4 TP over 5 references:
    # AP = 0.2·1 + 0.2·(2/3) + 0.2·(3/4) + 0.2·(4/6) = 0.61667
    assert o["ap"] == pytest.approx(0.2 * (1 + 2 / 3 + 3 / 4 + 4 / 6))
    # F1 after k picks = 2·TP/(k + 5): 2/6, 2/7, 4/8, 6/9, 6/10, 8/11 -> best 8/11 at score 0.4
    assert o["best_f1"] == pytest.approx(8 / 11)
    assert o["best_threshold"] == pytest.approx(0.4)
    by_name = {r.name: r for r in report.per_micrograph}
    assert sorted(by_name) == ["mic_a", "mic_b"]
    a, b = by_name["mic_a"], by_name["mic_b"]
    assert (a.n_picks, a.n_matched, a.precision, a.recall) == (3, 2, 2 / 3, 2 / 3)
    assert a.ap == pytest.approx((1 / 3) * 1 + (1 / 3) * (2 / 3) + (1 / 3) * (3 / 4))  # [TP, FP, TP, TP] of 3
    assert (b.n_picks, b.n_matched, b.precision, b.recall, b.ap) == (1, 1, 1.0, 0.5, 0.5)
    assert len(report.skipped) == 1 and "mic_c_cryopick.star" in report.skipped[0]

    write_report_json(report, tmp_path / "report.json")
    write_report_csv(report, tmp_path / "report.csv")
    assert json.loads((tmp_path / "report.json").read_text())["overall"]["ap"] == pytest.approx(o["ap"])
    assert pd.read_csv(tmp_path / "report.csv")["name"].tolist() == ["mic_a", "mic_b"]


def test_evaluate_topaz_truth_against_binned_star_picks(tmp_path):
    from cryopick.evaluate import evaluate
    from cryopick.io.relion import write_coordinate_star, write_topaz_table

    write_topaz_table(tmp_path / "truth.txt", [("mic_a", x, y, 1.0) for x, y in TRUTH_XY])
    half = TRUTH_XY / 2  # picks made on 2x binned images
    write_coordinate_star(tmp_path / "picks" / "mic_a_autopick.star", half[:, 0], half[:, 1], [0.3, 0.2, 0.1])
    o = evaluate(tmp_path / "picks", tmp_path / "truth.txt", radius=5, coord_scale=2.0).overall
    assert (o["precision"], o["recall"], o["ap"]) == (1.0, 1.0, 1.0)
    o = evaluate(tmp_path / "picks", tmp_path / "truth.txt", radius=5).overall
    assert o["n_matched"] == 0


def test_evaluate_thresholds_topaz_log_odds_on_their_own_scale(tmp_path):
    from typer.testing import CliRunner

    from cryopick.cli import app
    from cryopick.io.relion import write_coordinate_star, write_topaz_table

    write_coordinate_star(tmp_path / "truth" / "mic_a.star", TRUTH_XY[:, 0], TRUTH_XY[:, 1], [1.0] * 3)
    write_topaz_table(tmp_path / "picks.txt", [("mic_a", x, y, s) for (x, y), s in zip(TRUTH_XY, (2.0, -0.5, -3.0))])
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "picks.txt"), "--truth", str(tmp_path / "truth"),
                                      "--radius-px", "5", "--threshold", "-1", "--json", str(tmp_path / "r.json"), "-q"])
    assert result.exit_code == 0, result.output
    o = json.loads((tmp_path / "r.json").read_text())["overall"]
    assert (o["n_picks"], o["n_matched"], o["precision"]) == (2, 2, 1.0)  # scores 2.0 and -0.5 pass -1
    assert o["recall"] == pytest.approx(2 / 3) and o["ap"] == 1.0


def test_evaluate_refuses_picks_of_no_reference_micrograph(tmp_path):
    from cryopick.evaluate import evaluate
    from cryopick.io.relion import write_coordinate_star

    write_coordinate_star(tmp_path / "truth" / "mic_a.star", TRUTH_XY[:, 0], TRUTH_XY[:, 1], [1.0] * 3)
    write_coordinate_star(tmp_path / "picks" / "other_autopick.star", [100.0], [100.0], [0.5])
    with pytest.raises(CryopickError, match=r"none of the 1 pick set\(s\) belongs .*other_autopick\.star"):
        evaluate(tmp_path / "picks", tmp_path / "truth", radius=10)  # all-zero scores before, exit 0


def test_evaluate_refuses_two_pick_files_for_one_micrograph(tmp_path):
    from cryopick.evaluate import evaluate
    from cryopick.io.relion import write_coordinate_star

    picks = _write_pick_files(tmp_path)
    write_coordinate_star(picks / "mic_a_autopick.star", [100.0], [100.0], [0.5])
    with pytest.raises(CryopickError, match="mic_a"):
        evaluate(picks, tmp_path / "truth", radius=10)


def test_dev_set_truth_against_itself_is_perfect():
    from pathlib import Path

    from cryopick.evaluate import evaluate

    truth = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev-shell" / "truth"
    if not truth.is_dir():
        pytest.skip("shared dev set not available")
    n_truth = sum(sum(1 for line in p.read_text().splitlines() if line.strip()[:1].isdigit())
                  for p in truth.glob("*.star"))
    report = evaluate(truth, truth, radius=35)
    o = report.overall
    assert (o["n_truth"], o["n_matched"], o["n_micrographs"]) == (n_truth, n_truth, 4)
    assert (o["precision"], o["recall"], o["ap"]) == (1.0, 1.0, 1.0)


def test_plot_without_matplotlib_stops_before_any_work(tmp_path, monkeypatch):
    import sys

    from typer.testing import CliRunner

    from cryopick.cli import app

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "no-picks"), "--truth", str(tmp_path / "none"),
                                      "--radius-px", "5", "--plot", str(tmp_path / "pr.png")])
    assert result.exit_code == 1 and "plotting needs matplotlib" in result.output  # not "no coordinate files"
