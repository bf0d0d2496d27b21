"""What calibrated cuts are worth, calibration by calibration, on checkpoints already trained (prints tables).

"0.5" below is pick's default until 2026-12-06; from then to 2026-12-07 it is ``DEFAULT_THRESHOLD`` (0.4, the
second table's "calibrated 0.4" column), chosen with this script; since then half the calibration's estimated
best F1, at most 0.4 (``cryopick.calibrate.default_threshold``: the column "pick's default"), and since the
later 2026-12-07 release only for a mixture calibration, 0.4 for the labels' step posterior.

For each trained run, the calibration peaks are found as ``train`` finds them (its held-out labels on the
labeled micrographs, training labels set aside), every micrograph is picked with raw scores, and F1 at
calibrated 0.5 is scored against the full truth within D/2 for:

- ``1 bg``: particles vs one background Gaussian (the calibration before 2026-11-29);
- ``shipped``: ``fit_calibration`` as ``train`` runs it (since 2026-12-04: of the mixtures with one and with two
  background Gaussians that pass its checks, the one counting more particles; since 2026-12-07 a mixture must
  also show a dip between the particles and the rest, and the labels' count is the tightest bound from half
  to 80 % of the labels);
- ``shipped, true count``: the same given the true count (``train --expected-particles``);

next to the best F1 over all thresholds, and the estimated particles per calibration set against the truth.
A second table scores other rules and cuts: 0.5 with BIC's choice of one or two background Gaussians (the
calibration from 2026-11-29 to 2026-12-04), with one then two tried in turn, or two alone; the
**count-matching cut** (the raw score above which the calibration peaks number the particles: the estimated
count, the calibration set's true count, or the whole data set's mean count per micrograph, as a user would
give it) and fixed calibrated cuts.
Runs come from ``benchmarks/accuracy.py --out DIR`` work directories and ``cryopick demo`` directories:

    python benchmarks/calibration.py --accuracy-dir /tmp/acc --demo-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryopick.calibrate import (
    MAX_COUNT_RATIO,
    clipped_logit,
    default_threshold,
    estimate_particle_count,
    fit_calibration,
    fit_gaussians,
    mixture_posterior,
    posterior_table,
    tightest_particle_count,
)
from cryopick.calibrate_model import scored_peaks
from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.config import PickConfig
from cryopick.crops import hold_out_labels
from cryopick.dataset import load_labeled_micrographs
from cryopick.evaluate import evaluate
from cryopick.fsutil import save_torch_atomic
from cryopick.io.coords import read_coordinates
from cryopick.pick import pick
from cryopick.pickmatch import match_picks

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass
class Run:
    name: str
    checkpoint: Path
    dataset: Path
    micrographs: Path
    truth: Path
    project: Path | None = None


def accuracy_runs(work: Path) -> list[Run]:
    """Every trained cryopick run of a ``benchmarks/accuracy.py`` work directory."""
    runs = []
    for ckpt in sorted(work.glob("*/cryopick/experiments/*/checkpoints/best.pt")):
        case = ckpt.parents[4].name
        data = work / "data" / case
        star, project = data / "micrographs.star", None
        if not star.exists():  # a shared dev set: its STAR names micrographs relative to the set
            project = SHARED / case
            star, data = project / "micrographs_ctf.star", project
        runs.append(Run(f"{case} {ckpt.parents[1].name}", ckpt, work / case / "cryopick" / "dataset", star,
                        data / "truth", project))
    return runs


def demo_run(demo: Path) -> Run:
    return Run(f"demo {demo.name}", demo / "experiments" / "demo" / "checkpoints" / "best.pt", demo / "dataset",
               demo / "sim" / "micrographs.star", demo / "sim" / "truth")


def truth_by_name(truth: Path) -> dict[str, np.ndarray]:
    return {Path(t.micrograph or t.source.stem).stem: t.coords[["x", "y"]].to_numpy() for t in read_coordinates(truth)}


def pick_run(run: Run, out: Path, checkpoint: Path | None = None) -> Path:
    """Pick every micrograph of ``run`` as ``cryopick pick`` does, at threshold 0 (``checkpoint``: instead of
    the run's); returns the folder of coordinate files."""
    picks = out / "picks"
    pick(str(run.micrographs), checkpoint or run.checkpoint, picks,
         PickConfig(threshold=0.0, device="cpu", overwrite=True), quiet=True, project_dir=run.project)
    return picks


def scored_run(run: Run, radius: float, threshold: float = 0.5) -> dict:
    """Pooled metrics (AP, best F1, F1 and picks at ``threshold`` …) of the run's picks against its full truth."""
    with tempfile.TemporaryDirectory() as tmp:
        return evaluate(pick_run(run, Path(tmp)), run.truth, radius, threshold=threshold).overall


def raw_picks(run: Run, ckpt: dict, truth: dict[str, np.ndarray], radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(raw probabilities, matched to truth) of every peak of every micrograph, picked without calibration."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = dict(ckpt)
        raw.pop("calibration", None)
        save_torch_atomic(Path(tmp) / "raw.pt", raw)
        scores, hits = [], []
        for table in read_coordinates(pick_run(run, Path(tmp), Path(tmp) / "raw.pt")):
            stem = Path(table.micrograph or table.source.stem).stem
            key = next(k for k in truth if stem.startswith(k))
            xy, score = table.coords[["x", "y"]].to_numpy(), table.coords["score"].to_numpy()
            scores.append(score)
            hits.append(match_picks(xy, score, truth[key], radius))
    return np.concatenate(scores), np.concatenate(hits)


def f1_at(probability: np.ndarray, hits: np.ndarray, n_truth: int, threshold: float = 0.5) -> float:
    """F1 of the peaks whose calibrated probability is at least ``threshold`` (pick's default: 0.5)."""
    kept = probability >= threshold
    return float(2 * hits[kept].sum() / (kept.sum() + n_truth))


def best_f1(scores: np.ndarray, hits: np.ndarray, n_truth: int) -> float:
    order = np.argsort(-scores)
    return float((2 * np.cumsum(hits[order]) / (np.arange(1, len(order) + 1) + n_truth)).max())


def evaluate_run(run: Run) -> dict:
    ckpt = load_checkpoint(run.checkpoint)
    record, model = preprocess_from_checkpoint(ckpt), model_from_checkpoint(ckpt)
    config = ckpt.get("config", {})
    fraction = config.get("data", {}).get("holdout_labels", 0.2)
    seed = config.get("train", {}).get("seed", 0)
    radius = record.diameter_A / 2 / record.pixel_size
    truth = truth_by_name(run.truth)
    mics = [m for m in load_labeled_micrographs(run.dataset) if len(m["labels"])]
    _, held = hold_out_labels(mics, fraction, seed)
    peaks, labeled, n_labels = scored_peaks(model, held, record.patch_size // 2, radius, torch.device("cpu"))
    # the same peaks matched to the full truth: how many particles the calibration set really holds
    truth_held = [{**m, "labels": torch.as_tensor(truth[Path(m["name"]).stem])} for m in held]
    _, particles, _ = scored_peaks(model, truth_held, record.patch_size // 2, radius, torch.device("cpu"))
    n_known = sum(len(m["exclude"]) for m in held)
    scores, hits = raw_picks(run, ckpt, truth, radius)
    n_truth = sum(len(v) for v in truth.values())

    row = {"run": run.name, "best": best_f1(scores, hits, n_truth), "true": int(particles.sum())}
    one = mixture_posterior(peaks, peaks[labeled], background_components=(1,))
    if one is None:  # as before: the labels' recall decides
        count = tightest_particle_count(peaks, peaks[labeled], n_labels)
        one = (*posterior_table(peaks, peaks[labeled], n_labels, count), count)
    knots, values, row["1 bg count"] = one
    row["1 bg"] = f1_at(np.interp(clipped_logit(scores), knots, values), hits, n_truth)
    shipped = fit_calibration(peaks, peaks[labeled], n_labels, len(held), True, None, n_known)
    shipped_scores = shipped.apply(scores)
    row["shipped"] = f1_at(shipped_scores, hits, n_truth)
    row["shipped count"] = shipped.particles_per_micrograph * len(held) - n_known
    row["shipped cut"] = f1_at(shipped_scores, hits, n_truth, shipped.best_f1_threshold)
    row["shipped thr"] = shipped.best_f1_threshold
    row["method"] = shipped.method
    per_mic = (particles.sum() + n_known) / len(held)
    given = fit_calibration(peaks, peaks[labeled], n_labels, len(held), True, per_mic, n_known)
    calibrated = given.apply(scores)
    row["given"] = f1_at(calibrated, hits, n_truth)
    row["given cut"] = f1_at(calibrated, hits, n_truth, given.best_f1_threshold)
    row["default"] = f1_at(shipped_scores, hits, n_truth, default_threshold(shipped))
    row["given default"] = f1_at(calibrated, hits, n_truth, default_threshold(given))
    row["given thr"] = given.best_f1_threshold
    row["n peaks"] = len(peaks)
    mean_per_mic = n_truth / len(truth)
    for key, count in (("cut est", row["shipped count"]), ("cut true", float(particles.sum())),
                       ("cut mean", mean_per_mic * len(held) - n_known)):
        row[key] = f1_at(scores, hits, n_truth, count_matching_cut(peaks, count))
    row["given mean"] = f1_at(fit_calibration(peaks, peaks[labeled], n_labels, len(held), True, mean_per_mic,
                                              n_known).apply(scores), hits, n_truth)
    for key, order in {**ALTERNATIVE_ORDERS, "BIC": bic_order(peaks)}.items():
        knots, values, row[f"{key} count"], row[f"{key} method"] = first_valid_mixture(
            peaks, peaks[labeled], n_labels, order)
        row[key] = f1_at(np.interp(clipped_logit(scores), knots, values), hits, n_truth)
    for cut in FIXED_CUTS:
        row[f"p {cut}"] = f1_at(shipped_scores, hits, n_truth, cut)
    return row


FIXED_CUTS = (0.3, 0.4)
# background-component counts tried in turn (the first whose mixture passes calibrate's checks wins), against
# the shipped rule (of the mixtures that pass, the one counting more particles)
ALTERNATIVE_ORDERS = {"1 then 2 bg": ((1,), (2,)), "2 bg": ((2,),)}


def bic_order(peaks: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """The calibration until 2026-12-04: one or two background Gaussians, whichever BIC prefers, and no other."""
    z = clipped_logit(peaks)
    bic = {b: (3 * (1 + b) - 1) * np.log(len(z)) - 2 * fit_gaussians(z, 1 + b)[3] for b in (1, 2)}
    return ((min(bic, key=bic.get),),)


def first_valid_mixture(peaks: np.ndarray, labels: np.ndarray, n_labels: int,
                        order: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray, float, str]:
    """(knots, posterior, count, method) of the first mixture in ``order`` that calibrate would accept (a
    population of its own, the labels inside it, a count at most MAX_COUNT_RATIO × the labels'), else the
    labels' recall, as ``fit_calibration`` falls back."""
    upper = estimate_particle_count(peaks, labels, n_labels)
    for components in order:
        fitted = mixture_posterior(peaks, labels, background_components=components,
                                   max_count=MAX_COUNT_RATIO * upper)
        if fitted is not None:
            return *fitted, f"{components[0]} bg"
    by_labels = tightest_particle_count(peaks, labels, n_labels)
    return *posterior_table(peaks, labels, n_labels, by_labels), by_labels, "labels"


def count_matching_cut(peaks: np.ndarray, count: float) -> float:
    """The raw score of the ``count``-th highest peak: the cut that keeps as many peaks as particles."""
    ordered = np.sort(np.asarray(peaks, dtype=np.float64))[::-1]
    return float(ordered[int(np.clip(round(count), 1, len(ordered))) - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy-dir", action="append", default=[], help="a benchmarks/accuracy.py --out directory")
    ap.add_argument("--demo-dir", action="append", default=[], help="a cryopick demo output directory")
    ap.add_argument("--match", default="", help="only runs whose name matches this regular expression")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    runs = [r for d in args.accuracy_dir for r in accuracy_runs(Path(d))] + [demo_run(Path(d)) for d in args.demo_dir]
    runs = [r for r in runs if re.search(args.match, r.name)]
    print("| run | best F1 | F1 at 0.5: 1 bg | F1 at 0.5: shipped | F1 at 0.5: shipped, true count | "
          "F1 at the estimated best-F1 cut: shipped / true count (cut) | particles est. 1 bg / shipped (true) | peaks |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = {"1 bg": [], "shipped": [], "given": [], "shipped cut": [], "given cut": []}
    rows = []
    for run in runs:
        row = evaluate_run(run)
        rows.append(row)
        for key in ratios:
            ratios[key].append(row[key] / row["best"])
        one = f"{row['1 bg']:.3f} ({row['1 bg'] / row['best']:.2f})"
        one_count = f"{row['1 bg count']:.0f}"
        print(f"| {row['run']} | {row['best']:.3f} | {one} | {row['shipped']:.3f} ({row['shipped'] / row['best']:.2f}"
              f"{', labels' if row['method'] == 'labels' else ''}) | {row['given']:.3f} ({row['given'] / row['best']:.2f}) | "
              f"{row['shipped cut']:.3f} ({row['shipped cut'] / row['best']:.2f}, p ≥ {row['shipped thr']:.2f}) / "
              f"{row['given cut']:.3f} ({row['given cut'] / row['best']:.2f}, p ≥ {row['given thr']:.2f}) | "
              f"{one_count} / {row['shipped count']:.0f} ({row['true']}) | {row['n peaks']} |", flush=True)
    for key, values in ratios.items():
        print(f"F1 / best F1, {key}: mean {np.mean(values):.3f}, min {np.min(values):.3f} over {len(values)} runs")
    print_cut_table(rows)


CUT_COLUMNS = {"shipped": "calibrated 0.5 (shipped)", "BIC": "0.5, BIC's choice (until 2026-12-04)",
               "1 then 2 bg": "0.5, 1 bg then 2 bg", "2 bg": "0.5, 2 bg", "cut est": "count cut, estimated count",
               "cut true": "count cut, true count", "given mean": "0.5 given the mean count",
               "cut mean": "count cut, mean count", **{f"p {c}": f"calibrated {c}" for c in FIXED_CUTS},
               "default": "pick's default (mixture: F1*/2, at most 0.4)", "given default": "pick's default, true count"}


def print_cut_table(rows: list[dict]) -> None:
    """F1 / best F1 of every run at each cut, and how many runs reach 0.95 of their best F1."""
    print()
    print("| run | " + " | ".join(CUT_COLUMNS.values()) + " |")
    print("|---|" + "---|" * len(CUT_COLUMNS))
    for row in rows:
        print(f"| {row['run']} | " + " | ".join(f"{row[k] / row['best']:.2f}" for k in CUT_COLUMNS) + " |")
    summary = []
    for key in CUT_COLUMNS:
        ratios = np.array([row[key] / row["best"] for row in rows])
        summary.append(f"{ratios.mean():.3f} / {ratios.min():.2f} / {(ratios >= 0.95).sum()} of {len(ratios)}")
    print("| mean / min / runs ≥ 0.95 | " + " | ".join(summary) + " |", flush=True)


if __name__ == "__main__":
    main()
