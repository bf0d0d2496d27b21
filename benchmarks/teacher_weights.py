"""What the EMA teacher does for a run: pick with its weights or with the student's.

A checkpoint trained with ``model.use_ema`` holds both weight sets; ``pick`` uses the teacher's. For every such
cryopick run of a case in a ``benchmarks/accuracy.py`` work directory, this picks the case's micrographs once
with each weight set (threshold 0) and prints AP and best F1 against the full truth (one-to-one within D/2, as
``cryopick.evaluate``). If the student's weights pick as well as the teacher's, the EMA's gain over a run
trained without it comes from the teacher's pseudo-labels during training, not from averaging the weights
that pick (about 10 s per pick on two cores for the dev sets):

    python benchmarks/teacher_weights.py --accuracy-dir /tmp/acc --case dev-sparse
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from accuracy import PROFILES, prepare_case  # benchmarks/accuracy.py (on sys.path)

from cryopick.checkpoint import load_checkpoint
from cryopick.config import PickConfig
from cryopick.evaluate import evaluate
from cryopick.pick import pick


def student_checkpoint(ckpt: dict, out: Path) -> Path:
    """``ckpt`` saved to ``out`` with the student's weights in the teacher's slot (what pick then uses)."""
    torch.save({**ckpt, "ema_state": ckpt["model_state"]}, out)
    return out


def ap_and_best_f1(micrographs: str, checkpoint: Path, picks: Path, truth: Path, radius: float) -> tuple[float, float]:
    """Pick with ``checkpoint`` at threshold 0 into ``picks`` and score every pick."""
    pick(micrographs, checkpoint, picks, PickConfig(threshold=0.0, device="cpu", overwrite=True), quiet=True)
    overall = evaluate(picks, truth, radius).overall
    return overall["ap"], overall["best_f1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy-dir", type=Path, required=True, help="an accuracy.py --out directory")
    ap.add_argument("--case", required=True, help="one of its cases, e.g. dev-sparse")
    args = ap.parse_args()
    case = prepare_case(args.case, PROFILES["cpu"], args.accuracy_dir)
    case_dir = args.accuracy_dir / args.case / "cryopick"
    print("| run | AP, teacher (pick's) | AP, student | best F1, teacher | best F1, student |")
    print("|---|---|---|---|---|")
    n_runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for exp in sorted((case_dir / "experiments").iterdir()):
            best = exp / "checkpoints" / "best.pt"
            ckpt = load_checkpoint(best) if best.is_file() else {}
            if not ckpt.get("ema_state"):  # trained without the teacher: nothing to compare
                continue
            n_runs += 1
            student = student_checkpoint(ckpt, work / f"{exp.name}_student.pt")
            t_ap, t_f1 = ap_and_best_f1(case.micrographs, best, work / "teacher", case.truth, case.radius_px)
            s_ap, s_f1 = ap_and_best_f1(case.micrographs, student, work / "student", case.truth, case.radius_px)
            print(f"| {exp.name} | {t_ap:.3f} | {s_ap:.3f} | {t_f1:.3f} | {s_f1:.3f} |", flush=True)
    if not n_runs:
        raise SystemExit(f"{case_dir}: no cryopick run trained with an EMA teacher")


if __name__ == "__main__":
    main()
