"""The calibration of trained checkpoints with the mixture's count bound at several ratios (prints a table).

``cryopick.calibrate`` keeps a peak mixture only when its particle count is at most ``MAX_COUNT_RATIO`` times
the held-out labels' count bound at R = 0.8; above it the labels' step posterior decides. This re-fits each
checkpoint's calibration exactly as ``train`` fits it (the held-out labels of ``data.holdout_labels`` and
``train.seed``, dense training only; no count given) at each ratio, without writing anything, so a change of
the bound can be checked on every stored model: method, particles per micrograph and pick's default cut.

    python benchmarks/count_bound.py /tmp/acc/*/cryopick/experiments/*/checkpoints/best.pt --ratios 3,4
"""

from __future__ import annotations

import argparse

import torch

from cryopick import calibrate
from cryopick.calibrate_model import peak_scores
from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.crops import hold_out_labels
from cryopick.dataset import load_labeled_micrographs


def calibration_inputs(checkpoint: str):
    """(peaks, matched label scores, labels, micrographs, known labels) on the labels train held out."""
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    record, model = preprocess_from_checkpoint(ckpt), model_from_checkpoint(ckpt)
    mics = [m for m in load_labeled_micrographs(config["data"]["data_dir"]) if len(m["labels"])]
    _, held = hold_out_labels(mics, config["data"]["holdout_labels"], config["train"]["seed"])
    radius = record.diameter_A / 2 / record.pixel_size
    peaks, matched, n_labels = peak_scores(model, held, record.patch_size // 2, radius, torch.device("cpu"))
    return peaks, matched, n_labels, len(held), sum(len(m["exclude"]) for m in held)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="best.pt files of dense training runs")
    ap.add_argument("--ratios", default="3,4", help="comma-separated values of MAX_COUNT_RATIO to compare")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    print("| checkpoint | " + " | ".join(f"{r:g}×" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    default = calibrate.MAX_COUNT_RATIO
    for checkpoint in args.checkpoints:
        peaks, matched, n_labels, n_mics, n_known = calibration_inputs(checkpoint)
        cells = []
        for ratio in ratios:
            calibrate.MAX_COUNT_RATIO = ratio
            cal = calibrate.fit_calibration(peaks, matched, n_labels, n_mics, True, None, n_known)
            cells.append(f"{cal.method} {cal.particles_per_micrograph:.1f}/mic, cut {calibrate.default_cut(cal)[0]:.3g}")
        calibrate.MAX_COUNT_RATIO = default
        print(f"| {checkpoint} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
