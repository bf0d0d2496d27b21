"""Peak finding on trained maps: pick's peaks against smoothed maps, prominence and wider NMS (prints a table).

Each trained model of a ``benchmarks/accuracy.py`` run picks its micrographs once (pick's own code, threshold
0); the dense logit maps pick scores are kept, and every variant re-runs ``cryopick.nms.candidate_picks`` on
them (calibration and the border factor included), scored against the full truth within D/2:

- ``pick``: what ``cryopick pick`` does (peaks of the map, NMS at D/2);
- ``NMS 0.7 D``: a wider suppression radius;
- ``smooth σ``: peaks and scores of the map smoothed by a Gaussian of σ map samples (noise-driven spikes);
- ``prominence D, δ``: after NMS, a pick is dropped when a better pick within D is joined to it by a straight
  path on which the map never falls more than δ logits below it (a secondary peak on one particle, where
  two touching particles have a dip between them).

    python benchmarks/peak_variants.py --accuracy-dir /tmp/acc [--match selective_EMA]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from calibration import accuracy_runs, pick_run, truth_by_name  # benchmarks/calibration.py (on sys.path)
from scipy import ndimage

import cryopick.pick
from cryopick.checkpoint import load_checkpoint, preprocess_from_checkpoint
from cryopick.evaluate import evaluate_coordinates
from cryopick.nms import Picks, candidate_picks


@dataclass
class MapCall:
    """One micrograph's call of ``candidate_picks`` inside pick, and its truth."""

    name: str
    logits: np.ndarray
    args: tuple  # geometry, binned_shape, shape, radius_px, edge, calibrate
    truth: np.ndarray


def captured_maps(run) -> list[MapCall]:
    """Pick the run's micrographs as ``cryopick pick`` does and keep every map pick scored."""
    calls, names = [], []
    shipped_candidates, shipped_write = cryopick.pick.candidate_picks, cryopick.pick.write_coordinate_star

    def spy(logits, *args, **kwargs):
        calls.append((logits.copy(), args))
        return shipped_candidates(logits, *args, **kwargs)

    def spy_write(path, *args):
        names.append(Path(path).stem)
        return shipped_write(path, *args)

    cryopick.pick.candidate_picks, cryopick.pick.write_coordinate_star = spy, spy_write
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pick_run(run, Path(tmp))
    finally:
        cryopick.pick.candidate_picks, cryopick.pick.write_coordinate_star = shipped_candidates, shipped_write
    truth = truth_by_name(run.truth)
    return [MapCall(name, logits, args, truth[next(k for k in truth if name.startswith(k))])
            for (logits, args), name in zip(calls, names)]


def peaks(call: MapCall, logits: np.ndarray | None = None, radius: float | None = None) -> Picks:
    geometry, binned_shape, shape, radius_px, edge, calibrate = call.args
    return candidate_picks(call.logits if logits is None else logits, geometry, binned_shape, shape,
                           radius_px if radius is None else radius, edge, calibrate, halve_border_peaks=True)


def smoothed(sigma: float) -> Callable[[MapCall, float], Picks]:
    def variant(call: MapCall, diameter: float) -> Picks:
        return peaks(call, ndimage.gaussian_filter(call.logits.astype(np.float64), sigma, mode="nearest"))
    return variant


def prominent(reach: float, delta: float) -> Callable[[MapCall, float], Picks]:
    def variant(call: MapCall, diameter: float) -> Picks:
        found = peaks(call)
        rows, cols = call.args[0].to_map(found.x, found.y)
        rows = np.clip(np.rint(rows), 0, call.logits.shape[0] - 1).astype(int)
        cols = np.clip(np.rint(cols), 0, call.logits.shape[1] - 1).astype(int)
        kept: list[int] = []
        for i in range(len(found)):
            if not any(_joined(call.logits, rows, cols, i, j, delta) for j in kept
                       if np.hypot(found.x[i] - found.x[j], found.y[i] - found.y[j]) <= reach * diameter):
                kept.append(i)
        return found.take(np.array(kept, dtype=int))
    return variant


def _joined(logits: np.ndarray, rows: np.ndarray, cols: np.ndarray, i: int, j: int, delta: float) -> bool:
    n = 2 * int(max(abs(rows[i] - rows[j]), abs(cols[i] - cols[j]))) + 1
    r = np.rint(np.linspace(rows[i], rows[j], n)).astype(int)
    c = np.rint(np.linspace(cols[i], cols[j], n)).astype(int)
    return bool(logits[r, c].min() >= logits[rows[i], cols[i]] - delta)


VARIANTS: dict[str, Callable[[MapCall, float], Picks]] = {
    "pick": lambda call, diameter: peaks(call),
    "NMS 0.7 D": lambda call, diameter: peaks(call, radius=0.7 * diameter),
    "smooth 0.5": smoothed(0.5),
    "smooth 1": smoothed(1.0),
    "prominence D, 0.5": prominent(1.0, 0.5),
    "prominence D, 1": prominent(1.0, 1.0),
    "prominence D, 2": prominent(1.0, 2.0),
}


def scored(calls: list[MapCall], variant, diameter: float) -> dict:
    picks, truth = {}, {}
    for call in calls:
        found = variant(call, diameter)
        picks[call.name] = pd.DataFrame({"x": found.x, "y": found.y, "score": found.score})
        truth[call.name] = pd.DataFrame({"x": call.truth[:, 0], "y": call.truth[:, 1]})
    return evaluate_coordinates(picks, truth, diameter / 2, threshold=0.5).overall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy-dir", type=Path, required=True, help="a benchmarks/accuracy.py --out directory")
    ap.add_argument("--match", default="selective_EMA", help="only runs whose experiment name ends with this")
    args = ap.parse_args()
    runs = [run for run in accuracy_runs(args.accuracy_dir) if run.name.endswith(args.match)]
    results = {}
    for run in runs:
        record = preprocess_from_checkpoint(load_checkpoint(run.checkpoint))
        diameter = record.diameter_A / record.pixel_size
        calls = captured_maps(run)
        results[run.name] = {name: scored(calls, variant, diameter) for name, variant in VARIANTS.items()}
    print("AP / F1 at 0.5 / best F1 (every pick against the full truth within D/2)\n")
    print("| variant | " + " | ".join(name.split()[0] for name in results) + " |")
    print("|---|" + "---|" * len(results))
    for variant in VARIANTS:
        cells = [f"{r[variant]['ap']:.3f} / {r[variant]['f1']:.3f} / {r[variant]['best_f1']:.3f}"
                 for r in results.values()]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
