"""Accuracy with the defaults: extract --diameter → train (resnet8, CPU step budget) → pick → evaluate.

Not a test. For each case directory (micrographs_ctf.star, labels/, truth/, case.json with the diameter)
it runs the chain with nothing but the diameter and a step budget, picks every peak (threshold 0), and
scores with ``cryopick.evaluate`` (radius D/2): AP, best F1, F1 / picks at pick's default threshold,
wall and CPU seconds end to end. Optionally the same run given the true count (``--with-count``).

    python benchmarks/defaults.py CASE_DIR [CASE_DIR ...] --out /tmp/defaults [--epochs 8 --steps 40]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from cryopick.calibrate_model import checkpoint_default_threshold
from cryopick.config import ExtractConfig, PickConfig, TrainConfig, resolve
from cryopick.evaluate import evaluate
from cryopick.extract import extract
from cryopick.pick import pick
from cryopick.train import train


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_case(case_dir: Path, out: Path, epochs: int, steps: int, seed: int, expected: float | None,
             extract_overrides: dict | None = None, train_overrides: dict | None = None) -> dict:
    case = json.loads((case_dir / "case.json").read_text())
    diameter = float(case["particle"]["diameter_A"])
    radius_px = case["particle"]["diameter_px"] / 2
    t0, c0 = time.perf_counter(), _cpu()
    data = out / "dataset"
    extract(str(case_dir / "micrographs_ctf.star"), str(case_dir / "labels"), data,
            ExtractConfig(diameter=diameter, overwrite=True, **(extract_overrides or {})), project_dir=case_dir, quiet=True)
    overrides = {"data.data_dir": str(data), "train.output_root": str(out / "experiments"), "train.exp_name": "run",
                 "model.backbone": "resnet8", "train.device": "cpu", "train.epochs": epochs,
                 "train.steps_per_epoch": steps, "train.seed": seed, "loss.expected_particles": expected, **(train_overrides or {})}
    result = train(resolve(TrainConfig, None, overrides), overwrite=True, quiet=True)
    picks = out / "picks"
    pick(str(case_dir / "micrographs_ctf.star"), result.exp_dir / "checkpoints" / "best.pt", picks,
         PickConfig(threshold=0.0, device="cpu", overwrite=True), quiet=True, project_dir=case_dir)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    threshold = checkpoint_default_threshold(result.exp_dir / "checkpoints" / "best.pt")
    o = evaluate(picks, case_dir / "truth", radius_px, threshold=threshold).overall
    return {"case": case_dir.name, "ap": o["ap"], "best_f1": o["best_f1"], "best_threshold": o["best_threshold"],
            "f1_default": o["f1"], "precision": o["precision"], "recall": o["recall"],
            "picks_default": o["n_picks"], "threshold": threshold,
            "n_truth": o["n_truth"], "wall_s": wall, "cpu_s": cpu, "best_epoch": result.best_epoch,
            "epochs": result.epochs_run, "overall": {k: v for k, v in o.items() if isinstance(v, (int, float))}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-count", action="store_true", help="give train the true particle count")
    ap.add_argument("--expected-particles", "--expected", dest="expected", type=float,
                    help="give train this particle count per micrograph")
    ap.add_argument("--bin", type=int, help="extract bin factor (default: extract's choice)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="train config override, e.g. model.output_stride=4 (YAML value)")
    args = ap.parse_args(argv)
    from accuracy import parse_overrides  # noqa: PLC0415  (benchmarks/, on sys.path when run as a script)
    train_overrides = parse_overrides(args.set)
    extract_overrides = {"bin": args.bin} if args.bin else {}
    rows = []
    for case_dir in args.cases:
        expected = args.expected
        if args.with_count:
            c = json.loads((case_dir / "case.json").read_text())
            expected = c["counts"]["n_truth_total"] / c["n_micrographs"]
        row = run_case(case_dir, args.out / case_dir.name, args.epochs, args.steps, args.seed, expected,
                       extract_overrides, train_overrides)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "overall"}), flush=True)
    (args.out / "defaults.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| case | AP | best F1 (at p) | F1 at default (p) | P / R at default | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ap']:.3f} | {r['best_f1']:.3f} ({r['best_threshold']:.3g}) | {r['f1_default']:.3f} "
              f"({r['threshold']:.3g}) | {r['precision']:.3f} / {r['recall']:.3f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
