"""Particles on carbon film: how they score, what they cost in AP, and what labelling some of them changes.

The simulator draws the labels away from the carbon film, as users' first picks avoid it. For every cryopick
run of a ``benchmarks/accuracy.py`` work directory (simulated cases only: the carbon mask is the simulator's
own, ``cryopick.simulate.carbon_mask``), this prints AP, the particles whose centre lies on carbon, their median
score and AP with those particles and every pick on carbon set aside (one-to-one matching within D/2, as
``cryopick.evaluate``):

    python benchmarks/carbon.py --accuracy-dir /tmp/acc

``--label-carbon CASE`` adds every particle on the carbon of CASE's labeled micrographs to their labels, trains
and picks as ``benchmarks/accuracy.py``'s CPU profile does (selective FixMatch + EMA, seed 0; 7–8 min on two
cores) into ``--out`` and prints the same row for it:

    python benchmarks/carbon.py --accuracy-dir /tmp/acc --label-carbon ring-snr0.02 --out /tmp/carbon
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
from accuracy import PROFILES, prepare_case, run_cryopick  # benchmarks/accuracy.py (on sys.path)

from cryopick.io.coords import read_coordinates
from cryopick.metrics import average_precision, precision_recall_curve
from cryopick.pickmatch import match_picks
from cryopick.simulate import SimulationParams, carbon_mask


def case_params(case_dir: Path) -> SimulationParams:
    p = json.loads((case_dir / "case.json").read_text())["parameters"]
    return SimulationParams(**{**p, "shape": tuple(p["shape"])})


def carbon_masks(params: SimulationParams) -> dict[str, np.ndarray]:
    """Micrograph name → boolean carbon mask (empty micrographs: all False)."""
    masks = {}
    for i in range(params.n_micrographs):
        mask = carbon_mask(params, i)
        masks[f"{params.prefix}_mic{i:03d}"] = (np.zeros(params.shape, bool) if mask is None else mask > 0.5)
    return masks


def on_carbon(mask: np.ndarray, xy: np.ndarray) -> np.ndarray:
    ix = np.clip(np.round(xy).astype(int), 0, np.array(mask.shape[::-1]) - 1)
    return mask[ix[:, 1], ix[:, 0]]


def by_micrograph(spec: Path) -> dict[str, pd.DataFrame]:
    return {Path(t.micrograph or t.source.stem).stem: t.coords for t in read_coordinates(spec)}


def pooled_ap(scores: list[np.ndarray], hits: list[np.ndarray], n_truth: int) -> float:
    """AP of the picks of every micrograph pooled, as ``cryopick.evaluate`` computes it."""
    return average_precision(*precision_recall_curve(np.concatenate(scores), np.concatenate(hits), n_truth)[:2])


def carbon_row(picks: Path, truth: dict[str, np.ndarray], masks: dict[str, np.ndarray], radius: float) -> str:
    """'AP | particles on carbon | their median score | AP without carbon' of one run's picks."""
    scores, hits, kept_scores, kept_hits, carbon_scores = [], [], [], [], []
    n_carbon = 0
    for stem, coords in by_micrograph(picks).items():
        name = next(k for k in truth if stem.startswith(k))
        xy, s, ref, mask = coords[["x", "y"]].to_numpy(), coords["score"].to_numpy(), truth[name], masks[name]
        scores.append(s)
        hits.append(match_picks(xy, s, ref, radius))
        ref_on, pick_on = on_carbon(mask, ref), on_carbon(mask, xy)
        n_carbon += int(ref_on.sum())
        kept_scores.append(s[~pick_on])
        kept_hits.append(match_picks(xy[~pick_on], s[~pick_on], ref[~ref_on], radius))
        carbon_scores.append(s[pick_on][match_picks(xy[pick_on], s[pick_on], ref[ref_on], radius)])
    n = sum(len(v) for v in truth.values())
    median = np.median(np.concatenate(carbon_scores)) if n_carbon else float("nan")
    return (f"{pooled_ap(scores, hits, n):.3f} | {n_carbon} of {n} | {median:.3f} | "
            f"{pooled_ap(kept_scores, kept_hits, n - n_carbon):.3f}")


def label_carbon(case_name: str, work: Path, out: Path) -> Path:
    """Train on ``case_name`` with its labeled micrographs' particles on carbon labeled too; the picks folder."""
    profile = PROFILES["cpu"]
    case = prepare_case(case_name, profile, work)
    labels = out / "data" / case_name / "labels"
    shutil.rmtree(labels, ignore_errors=True)
    shutil.copytree(case.labels, labels)
    masks = carbon_masks(case_params(Path(case.truth).parent))
    truth = {k: v[["x", "y"]].to_numpy() for k, v in by_micrograph(case.truth).items()}
    for star in sorted(labels.glob("*.star")):
        table = starfile.read(star)
        ref = truth[star.stem]
        extra = ref[on_carbon(masks[star.stem], ref)]
        added = pd.DataFrame({c: table[c].iloc[0] for c in table.columns}, index=range(len(extra)))
        added["rlnCoordinateX"], added["rlnCoordinateY"] = extra[:, 0], extra[:, 1]
        starfile.write(pd.concat([table, added], ignore_index=True), star, overwrite=True)
        print(f"{star.stem}: {len(table)} labels + {len(extra)} on carbon")
    method = "carbon labels selective+EMA"
    run_cryopick(replace(case, labels=labels), profile, out, method, "selective", True)
    return out / case_name / "cryopick" / f"picks_{re.sub(r'[^A-Za-z0-9]+', '_', method).strip('_')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy-dir", type=Path, required=True, help="a benchmarks/accuracy.py --out directory")
    ap.add_argument("--label-carbon", default=None, help="a simulated case to retrain with its carbon particles labeled")
    ap.add_argument("--out", type=Path, default=None, help="work directory of --label-carbon")
    args = ap.parse_args()
    runs = []
    for case_dir in sorted(p.parent for p in (args.accuracy_dir / "data").glob("*/case.json")):
        if "parameters" not in json.loads((case_dir / "case.json").read_text()):
            continue  # not from cryopick.simulate: no carbon mask
        runs += [(case_dir, picks) for picks in sorted((args.accuracy_dir / case_dir.name / "cryopick").glob("picks_*"))]
    if args.label_carbon:
        if args.out is None:
            ap.error("--label-carbon needs --out")
        runs.append((args.accuracy_dir / "data" / args.label_carbon, label_carbon(args.label_carbon, args.accuracy_dir, args.out)))
    print("| case | run | AP | particles on carbon | their median score | AP without carbon |")
    print("|---|---|---|---|---|---|")
    for case_dir, picks in runs:
        params = case_params(case_dir)
        truth = {k: v[["x", "y"]].to_numpy() for k, v in by_micrograph(case_dir / "truth").items()}
        row = carbon_row(picks, truth, carbon_masks(params), params.diameter_px / 2)
        print(f"| {case_dir.name} | {picks.name.removeprefix('picks_')} | {row} |", flush=True)


if __name__ == "__main__":
    main()
