"""Pick evaluation: one-to-one matching of picks to reference coordinates, per-micrograph and pooled
precision/recall/F1/AP (the metrics themselves are in ``cryopick.metrics``), reports and plots.

Conventions used throughout (they are what ``cryopick evaluate`` reports):

- A pick matches a reference when their centres are at most ``radius`` pixels apart (inclusive) and the
  one-to-one assignment pairs them. A reference is matched at most once, so duplicate picks on one
  particle count as one true positive and the rest as false positives.
- Ranking is by score, descending; picks with equal scores form one group (one point of the curve).
  Picks without a score (NaN, e.g. from ``.box`` files) rank below every scored pick, tied together.
- A threshold keeps picks with ``score >= threshold``.
- Ratios whose denominator is zero are NaN (written as ``null`` in JSON and empty in CSV), except
  F1 = 2·TP / (n_picks + n_truth), which is defined whenever there are picks or references.
- Average precision is the non-interpolated sum over ranked groups of (R_k − R_{k−1})·P_k with R_0 = 0
  (the area under the step-wise precision-recall curve, as Topaz's ``auprc`` and scikit-learn's
  ``average_precision_score``); recall the picks never reach adds nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from cryopick.errors import CryopickError
from cryopick.fsutil import atomic_path, write_json_atomic
from cryopick.metrics import (
    average_precision,
    best_f1,
    best_f1_index,
    f1_from_counts,
    precision_recall_curve,
    ratio,
)
from cryopick.pickmatch import check_matching, match_picks

RESULT_COLUMNS = ["name", "n_picks", "n_truth", "n_matched", "precision", "recall", "f1", "ap"]


# ----------------------------------------------------------------------------------------------------------
# Per-micrograph and pooled evaluation
# ----------------------------------------------------------------------------------------------------------

@dataclass
class MicrographResult:
    """Counts at the threshold and AP over all picks of one micrograph."""

    name: str
    n_picks: int
    n_truth: int
    n_matched: int
    precision: float
    recall: float
    f1: float
    ap: float


def _json_value(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN/inf to null (strict JSON has neither)."""
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


@dataclass
class EvaluationReport:
    """Per-micrograph results, pooled metrics and the pooled precision-recall curve."""

    per_micrograph: list[MicrographResult]
    overall: dict[str, Any]
    curve: tuple[np.ndarray, np.ndarray, np.ndarray]
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        precision, recall, thresholds = self.curve
        return _json_value({
            "overall": self.overall,
            "per_micrograph": [asdict(r) for r in self.per_micrograph],
            "curve": {"threshold": thresholds, "precision": precision, "recall": recall},
            "skipped": list(self.skipped),
        })

    def to_dataframe(self) -> pd.DataFrame:
        """One row per evaluated micrograph (the pooled numbers are in ``overall`` / the JSON report)."""
        return pd.DataFrame([asdict(r) for r in self.per_micrograph], columns=RESULT_COLUMNS)


def _table_xy(table: pd.DataFrame, name: str, what: str) -> np.ndarray:
    missing = [c for c in ("x", "y") if c not in table.columns]
    if missing:
        raise CryopickError(f"{what} of micrograph {name} have no {'/'.join(missing)} column")
    return table[["x", "y"]].to_numpy(dtype=np.float64)


def _table_scores(table: pd.DataFrame) -> np.ndarray:
    if "score" not in table.columns:
        return np.full(len(table), np.nan)
    return table["score"].to_numpy(dtype=np.float64)


def _kept_by_threshold(scores: np.ndarray, threshold: float | None, name: str) -> np.ndarray:
    if threshold is None:
        return np.ones(len(scores), dtype=bool)
    if np.isnan(scores).any():
        raise CryopickError(f"picks of micrograph {name} have no scores, so a threshold cannot be applied; "
                            f"evaluate without a threshold")
    return scores >= threshold


@dataclass
class _MicrographOutcome:
    result: MicrographResult
    scores: np.ndarray  # all picks, for the pooled curve
    matched: np.ndarray


def _evaluate_micrograph(name: str, picks: pd.DataFrame | None, truth: pd.DataFrame, radius: float,
                         threshold: float | None, method: str) -> _MicrographOutcome:
    picks = picks if picks is not None else pd.DataFrame({"x": [], "y": [], "score": []})
    picks_xy = _table_xy(picks, name, "picks")
    truth_xy = _table_xy(truth, name, "reference coordinates")
    scores = _table_scores(picks)
    matched = match_picks(picks_xy, scores, truth_xy, radius, method)
    kept = _kept_by_threshold(scores, threshold, name)
    # At a threshold, match as if the pick file had been filtered first: with Hungarian matching a reference
    # taken by a discarded pick must be free for a kept one.
    matched_kept = matched if kept.all() else match_picks(picks_xy[kept], scores[kept], truth_xy, radius, method)
    n_picks, n_truth, n_matched = int(kept.sum()), len(truth_xy), int(matched_kept.sum())
    precision, recall, _ = precision_recall_curve(scores, matched, n_truth)
    result = MicrographResult(
        name=name, n_picks=n_picks, n_truth=n_truth, n_matched=n_matched,
        precision=ratio(n_matched, n_picks), recall=ratio(n_matched, n_truth),
        f1=f1_from_counts(n_matched, n_picks, n_truth),
        ap=average_precision(precision, recall) if n_truth else math.nan,
    )
    return _MicrographOutcome(result, scores, matched)


def _overall(results: list[MicrographResult], curve, radius: float, threshold: float | None,
             method: str) -> dict[str, Any]:
    n_picks = sum(r.n_picks for r in results)
    n_truth = sum(r.n_truth for r in results)
    n_matched = sum(r.n_matched for r in results)
    precision, recall, thresholds = curve
    top_f1, top_threshold = best_f1(precision, recall, thresholds)
    return {
        "precision": ratio(n_matched, n_picks),
        "recall": ratio(n_matched, n_truth),
        "f1": f1_from_counts(n_matched, n_picks, n_truth),
        "ap": average_precision(precision, recall) if n_truth else math.nan,
        "best_f1": top_f1,
        "best_threshold": top_threshold,
        "n_picks": n_picks,
        "n_truth": n_truth,
        "n_matched": n_matched,
        "n_micrographs": len(results),
        "radius": float(radius),
        "threshold": None if threshold is None else float(threshold),
        "method": method,
    }


def evaluate_coordinates(picks: dict[str, pd.DataFrame], truth: dict[str, pd.DataFrame], radius: float,
                         threshold: float | None = None, method: str = "hungarian") -> EvaluationReport:
    """Evaluate picks against references, both keyed by the same micrograph names (columns x, y[, score]).

    Every micrograph in ``truth`` is evaluated, even one whose reference table is empty (its picks are then
    all false positives); one without picks counts all its references as misses. Picks of micrographs absent
    from ``truth`` are not evaluated and are listed in ``skipped``. Pooled metrics rank all picks together,
    with recall over all references; ``threshold=None`` counts every pick.
    """
    check_matching(radius, method)
    if threshold is not None and math.isnan(threshold):
        raise CryopickError("the score threshold must be a number, got NaN")
    outcomes = [_evaluate_micrograph(name, picks.get(name), truth[name], radius, threshold, method)
                for name in sorted(truth)]
    results = [o.result for o in outcomes]
    all_scores = np.concatenate([o.scores for o in outcomes]) if outcomes else np.zeros(0)
    all_matched = np.concatenate([o.matched for o in outcomes]) if outcomes else np.zeros(0, dtype=bool)
    curve = precision_recall_curve(all_scores, all_matched, sum(r.n_truth for r in results))
    skipped = [f"{name}: no reference coordinates" for name in sorted(set(picks) - set(truth))]
    return EvaluationReport(results, _overall(results, curve, radius, threshold, method), curve, skipped)


# ----------------------------------------------------------------------------------------------------------
# Reading coordinate files and pairing picks with references
# ----------------------------------------------------------------------------------------------------------

def _table_name(table) -> str:
    """The name a table is matched by: the micrograph named inside the file, else the file's own path."""
    return table.micrograph if table.micrograph is not None else str(table.source)


def _collect_tables(tables: Iterable, what: str) -> tuple[dict[str, pd.DataFrame], dict[str, Path]]:
    """Coordinates per name, and the file each came from; refuses one micrograph spread over two files."""
    frames: dict[str, list[pd.DataFrame]] = {}
    sources: dict[str, Path] = {}
    seen: set[tuple[Path, str | None]] = set()
    for table in tables:
        identity = (Path(table.source).resolve(), table.micrograph)
        if identity in seen:  # the same file reached twice (e.g. also through a RELION suffix node)
            continue
        seen.add(identity)
        name = _table_name(table)
        if name in sources and sources[name].resolve() != identity[0]:
            raise CryopickError(f"{what}: both {sources[name]} and {table.source} hold coordinates for "
                                f"micrograph {name}; give one file per micrograph")
        sources[name] = Path(table.source)
        frames.setdefault(name, []).append(table.coords)
    return {n: pd.concat(f, ignore_index=True) if len(f) > 1 else f[0] for n, f in frames.items()}, sources


def _display_names(names: list[str]) -> dict[str, str]:
    """Short report names (the micrograph stem), the full name where two stems would collide."""
    from cryopick.io.micrographs import micrograph_stem

    stems = {name: micrograph_stem(name) for name in names}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {name: stem if counts[stem] == 1 else name for name, stem in stems.items()}


def _pair_picks_with_truth(picks: dict[str, pd.DataFrame], pick_sources: dict[str, Path],
                           truth_names: list[str]) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Re-key picks by the reference name each belongs to; unmatched pick sets are reported, not used."""
    from cryopick.io.matching import match_name

    paired: dict[str, pd.DataFrame] = {}
    paired_from: dict[str, str] = {}
    unmatched: list[str] = []
    for name in sorted(picks):
        index = match_name(name, truth_names)
        if index is None:
            where = str(pick_sources[name])
            unmatched.append(f"{where}: no reference coordinates match "
                             + ("this file" if name == where else f"micrograph {name}"))
            continue
        target = truth_names[index]
        if target in paired:
            raise CryopickError(f"picks {paired_from[target]} and {name} both belong to the micrograph of "
                                f"reference {target}; evaluate one picking run at a time")
        paired[target] = picks[name]
        paired_from[target] = name
    return paired, unmatched


def evaluate(picks_spec: str | Path, truth_spec: str | Path, radius: float, threshold: float | None = None,
             method: str = "hungarian", coord_scale: float = 1.0) -> EvaluationReport:
    """Read picks and references (directory, glob or file; any coordinate format), pair them by micrograph
    name and evaluate. ``coord_scale`` multiplies the pick coordinates (e.g. picks made on binned images);
    references are read as they are."""
    from cryopick.io.coords import read_coordinates
    from cryopick.progress import warn

    truth_tables = read_coordinates(truth_spec)
    pick_tables = read_coordinates(picks_spec, coord_scale=coord_scale)
    for message in truth_tables.warnings + pick_tables.warnings:
        warn(message)
    truth, _ = _collect_tables(truth_tables, "reference coordinates")
    picks, pick_sources = _collect_tables(pick_tables, "picks")
    truth_names = sorted(truth)
    paired, unmatched = _pair_picks_with_truth(picks, pick_sources, truth_names)
    if picks and not paired:  # every micrograph would count as missed: a wrong folder, not a bad picker
        example = pick_sources[min(picks)]
        raise CryopickError(f"none of the {len(picks)} pick set(s) belongs to a reference micrograph (picks e.g. "
                            f"{example}, references e.g. {truth_names[0]}); check that PICKS and --truth name "
                            "the same micrographs")
    short = _display_names(truth_names)
    report = evaluate_coordinates({short[n]: f for n, f in paired.items()},
                                  {short[n]: f for n, f in truth.items()}, radius, threshold, method)
    report.skipped = unmatched + report.skipped
    return report


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------

def write_report_json(report: EvaluationReport, path: str | Path) -> None:
    write_json_atomic(path, report.to_json())


def write_report_csv(report: EvaluationReport, path: str | Path) -> None:
    """Per-micrograph table; undefined ratios are left empty."""
    with atomic_path(path) as tmp:
        report.to_dataframe().to_csv(tmp, index=False)


def require_matplotlib() -> None:
    """Checked before any work when a plot is asked for."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CryopickError("plotting needs matplotlib: pip install 'cryopick[plot]'") from None


def plot_pr_curve(report: EvaluationReport, path: str | Path) -> None:
    """Pooled precision-recall curve with the best-F1 point (and the threshold's point if one was given)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    path = Path(path)
    precision, recall, thresholds = report.curve
    overall = report.overall
    # Figure + Agg canvas instead of pyplot: no global backend state, safe without a display.
    fig = Figure(figsize=(5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(np.r_[0.0, recall], np.r_[precision[:1], precision], where="pre", label="pooled picks")
    best = best_f1_index(precision, recall)
    if best is not None:
        ax.plot(recall[best], precision[best], "o", label=f"best F1 {overall['best_f1']:.3f} "
                                                            f"(score ≥ {thresholds[best]:.3g})")
    if overall.get("threshold") is not None:
        ax.plot(overall["recall"], overall["precision"], "s", label=f"threshold {overall['threshold']:.3g}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"AP {overall['ap']:.3f}, radius {overall['radius']:g} px, {overall['method']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)


def _cell(value: float | None, spec: str = ".3f") -> str:
    """A table cell; undefined values (NaN/None) as a dash."""
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def print_report(report: EvaluationReport, console) -> None:
    """Rich table per micrograph, then the pooled line."""
    from rich.table import Table

    table = Table(title="Picks vs references")
    for column in RESULT_COLUMNS:
        table.add_column(column, justify="left" if column == "name" else "right")
    for r in report.per_micrograph:
        table.add_row(r.name, str(r.n_picks), str(r.n_truth), str(r.n_matched),
                      _cell(r.precision), _cell(r.recall), _cell(r.f1), _cell(r.ap))
    console.print(table)
    o = report.overall
    kept = "all picks" if o["threshold"] is None else f"score ≥ {o['threshold']:g}"
    console.print(
        f"[bold]overall[/bold] ({o['n_micrographs']} micrographs, {kept}, radius {o['radius']:g} px, "
        f"{o['method']}): precision {_cell(o['precision'])}, recall {_cell(o['recall'])}, F1 {_cell(o['f1'])} "
        f"({o['n_matched']}/{o['n_truth']} references found by {o['n_picks']} picks); AP {_cell(o['ap'])}, "
        f"best F1 {_cell(o['best_f1'])} at score ≥ {_cell(o['best_threshold'], '.4g')}",
        highlight=False,
    )
    for line in report.skipped:
        console.print(f"[yellow]skipped:[/yellow] {line}", highlight=False)
