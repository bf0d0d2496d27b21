"""Re-fit the pick calibration of trained checkpoints with this release's code, as ``train`` fits it (prints a table).

``train`` stores the calibration in ``best.pt`` as its last act, so a change to ``cryopick.calibrate`` reaches
checkpoints trained before it only through this script: it takes the same held-out labels ``train`` took
(``data.holdout_labels`` and ``train.seed`` of the checkpoint's config; dense training only) and the same
count (``loss.expected_particles``), re-fits, **writes the new calibration into the checkpoint**, picks every
micrograph with ``cryopick pick`` at threshold 0 and scores the picks against the full truth within D/2. It also
prints the two particle counts the calibration weighs on its peaks: the mixture's (none when the peaks form
no separate population) and the held-out labels' estimate.
Runs come from ``benchmarks/accuracy.py --out DIR`` work directories and ``cryopick demo`` directories:

    python benchmarks/recalibrate.py --accuracy-dir /tmp/acc [--demo-dir /tmp/demo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from calibration import accuracy_runs, demo_run, scored_run  # benchmarks/calibration.py (on sys.path)

from cryopick.calibrate import Calibration, mixture_posterior, tightest_particle_count
from cryopick.calibrate_model import (
    calibrate_checkpoint,
    calibration_micrographs,
    checkpoint_default_threshold,
    peak_scores,
)
from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.config import DEFAULT_THRESHOLD
from cryopick.crops import hold_out_labels
from cryopick.dataset import load_labeled_micrographs


def held_out_like_train(run, config: dict) -> list[dict] | None:
    """The labeled micrographs with the labels ``train`` held out (None for patch training: extract's split)."""
    if config.get("data", {}).get("mode", "dense") != "dense":
        return None
    mics = [m for m in load_labeled_micrographs(run.dataset) if len(m["labels"])]
    return hold_out_labels(mics, config["data"]["holdout_labels"], config["train"]["seed"])[1]


def counts(ckpt: dict, mics: list[dict], radius: float) -> str:
    """'mixture count : labels' count' on the calibration peaks (the labels that trained the model left out)."""
    record = preprocess_from_checkpoint(ckpt)
    peaks, labels, n_labels = peak_scores(model_from_checkpoint(ckpt), mics, record.patch_size // 2, radius,
                                          torch.device("cpu"))
    mixture = mixture_posterior(peaks, labels)
    by_labels = tightest_particle_count(peaks, labels, n_labels)
    return f"{'–' if mixture is None else f'{mixture[2]:.1f}'} : {by_labels:.1f}"


def describe(calibration: dict | None) -> str:
    if not calibration:
        return "none"
    cal = Calibration.from_dict(calibration)
    return f"{cal.method} {cal.particles_per_micrograph:.1f}/mic"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy-dir", type=Path, action="append", default=[], help="a benchmarks/accuracy.py --out directory")
    ap.add_argument("--demo-dir", type=Path, action="append", default=[], help="a cryopick demo output directory")
    ap.add_argument("--match", default="", help="only runs whose name contains this")
    ap.add_argument("--threshold", type=float, default=None,
                    help="the cut at which F1 is scored (default: pick's for each calibration, "
                    f"{DEFAULT_THRESHOLD:g} or half a mixture's estimated best F1 where lower)")
    args = ap.parse_args()
    runs = [run for work in args.accuracy_dir for run in accuracy_runs(work)] + [demo_run(d) for d in args.demo_dir]
    cut = "default" if args.threshold is None else f"{args.threshold:g}"
    print(f"| run | counts: mixture : labels | calibration before → after | F1 at {cut} before → after (cut) "
          f"| P / R at {cut} after (picks) | AP | best F1 |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        if args.match not in run.name:
            continue
        ckpt = load_checkpoint(run.checkpoint)
        record, config = preprocess_from_checkpoint(ckpt), ckpt.get("config", {})
        radius = record.diameter_A / 2 / record.pixel_size
        t_before = args.threshold if args.threshold is not None else checkpoint_default_threshold(run.checkpoint)
        before, old = scored_run(run, radius, t_before), ckpt.get("calibration")
        held_out = held_out_like_train(run, config)
        split_held_out = config.get("data", {}).get("mode") != "dense"  # as train calibrates
        estimates = counts(ckpt, held_out or calibration_micrographs(run.dataset, split_held_out)[0], radius)
        calibrate_checkpoint(run.checkpoint, run.dataset, config.get("loss", {}).get("expected_particles"),
                             torch.device("cpu"), held_out, split_held_out)
        t_after = args.threshold if args.threshold is not None else checkpoint_default_threshold(run.checkpoint)
        after, new = scored_run(run, radius, t_after), load_checkpoint(run.checkpoint).get("calibration")
        print(f"| {run.name} | {estimates} | {describe(old)} → {describe(new)} | {before['f1']:.3f} → {after['f1']:.3f} "
              f"({t_before:.3g} → {t_after:.3g}) "
              f"| {after['precision']:.3f} / {after['recall']:.3f} ({after['n_picks']}) | {after['ap']:.3f} "
              f"| {after['best_f1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
