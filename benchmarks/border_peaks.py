"""Peaks on the border's reflection axis: AP and F1 at 0.5 with and without halving them (prints a table).

``pick`` halves the calibrated probability of a peak within half a map sample of a micrograph border
(``cryopick.nms.inside_probability``): with reflection padding, a half-visible particle centred just outside
looks like one centred just inside. This re-picks trained checkpoints both ways (the same maps; "off"
replaces the factor by 1) and scores every pick against the full truth within D/2 (``cryopick.evaluate``).
Runs come from ``benchmarks/accuracy.py --out DIR`` work directories:

    python benchmarks/border_peaks.py --accuracy-dir /tmp/acc [--match selective_EMA]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from calibration import accuracy_runs, scored_run  # benchmarks/calibration.py (this directory is on sys.path)

import cryopick.nms
from cryopick.checkpoint import load_checkpoint, preprocess_from_checkpoint


def _no_factor(x, y, shape, band):
    return np.ones(len(x))


def scored(run, radius: float, halve: bool) -> dict:
    """AP, best F1 and F1 at 0.5 of the run's picks, with the border factor or without it."""
    shipped = cryopick.nms.inside_probability
    cryopick.nms.inside_probability = shipped if halve else _no_factor
    try:
        return scored_run(run, radius)
    finally:
        cryopick.nms.inside_probability = shipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy-dir", type=Path, required=True, help="a benchmarks/accuracy.py --out directory")
    ap.add_argument("--match", default="selective_EMA", help="only runs whose experiment name ends with this")
    args = ap.parse_args()
    print("| run | AP off → on | best F1 off → on | F1 at 0.5 off → on | picks at 0.5 off → on |")
    print("|---|---|---|---|---|")
    for run in accuracy_runs(args.accuracy_dir):
        if not run.name.endswith(args.match):
            continue
        record = preprocess_from_checkpoint(load_checkpoint(run.checkpoint))
        radius = record.diameter_A / 2 / record.pixel_size
        off, on = scored(run, radius, halve=False), scored(run, radius, halve=True)
        print(f"| {run.name} | {off['ap']:.3f} → {on['ap']:.3f} | {off['best_f1']:.3f} → {on['best_f1']:.3f} "
              f"| {off['f1']:.3f} → {on['f1']:.3f} | {off['n_picks']} → {on['n_picks']} |", flush=True)


if __name__ == "__main__":
    main()
