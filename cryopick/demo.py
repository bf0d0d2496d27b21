"""`cryopick demo`: the whole chain on simulated data, on a laptop CPU, with nothing downloaded.

simulate → extract → train (small backbone) → pick → evaluate, with the same library functions the
commands use. Prints precision, recall and average precision of the picks against the full truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryopick.config import ExtractConfig, PickConfig, TrainConfig, resolve
from cryopick.errors import CryopickError
from cryopick.evaluate import EvaluationReport, evaluate, write_report_json
from cryopick.extract import extract
from cryopick.fsutil import write_json_atomic
from cryopick.pick import pick
from cryopick.progress import info
from cryopick.simulate import SimulationParams, simulate
from cryopick.train import train


@dataclass
class DemoSettings:
    micrographs: int = 6
    size: int = 1024  # px, square
    snr: float = 0.05
    particle: str = "shell"
    epochs: int = 12
    steps_per_epoch: int = 36  # 432 steps: ~3.5 min end to end on 2 free CPU cores
    backbone: str = "resnet8"
    balanced_prior: float | None = None  # imbalanced nnPU weighting (loss.balanced_prior); None: the default
    give_count: bool = False  # pass the true particle count (--expected-particles); the default estimates it
    seed: int = 0
    device: str = "auto"


def run_demo(out_dir: str | Path, settings: DemoSettings | None = None, quiet: bool = False,
             overwrite: bool = False) -> tuple[EvaluationReport, dict]:
    """Run the chain in ``out_dir``; returns the evaluation report and wall times per stage (s)."""
    s = settings or DemoSettings()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CryopickError(f"{out} is not empty; choose a new directory or pass --overwrite")
    times: dict[str, float] = {}
    params = SimulationParams(n_micrographs=s.micrographs, shape=(s.size, s.size), snr=s.snr, particle=s.particle,
                              seed=s.seed)

    t = time.perf_counter()
    info("[bold]1/5 simulate[/bold]", quiet)
    case = simulate(out / "sim", params, quiet=quiet, overwrite=overwrite)
    times["simulate"] = time.perf_counter() - t

    t = time.perf_counter()
    info("[bold]2/5 extract[/bold]", quiet)
    extract(str(out / "sim" / "micrographs.star"), str(out / "sim" / "labels"), out / "dataset",
            ExtractConfig(diameter=params.diameter, val_fraction=0.34, seed=s.seed, overwrite=overwrite),
            truth=str(out / "sim" / "truth"), quiet=quiet)
    times["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    info("[bold]3/5 train[/bold]", quiet)
    # by default nothing but the diameter: train estimates the particle count from the held-out labels
    expected = case["counts"]["n_particles"] / max(1, case["n_micrographs"]) if s.give_count else None
    cfg = resolve(TrainConfig, None, {
        "data.data_dir": str(out / "dataset"), "train.output_root": str(out / "experiments"),
        "train.exp_name": "demo", "model.backbone": s.backbone, "train.epochs": s.epochs,
        "train.steps_per_epoch": s.steps_per_epoch, "loss.expected_particles": expected,
        "loss.balanced_prior": s.balanced_prior,
        "loss.cons_ramp_epochs": [0.0, s.epochs / 3], "loss.ent_ramp_epochs": [s.epochs / 3, 2 * s.epochs / 3],
        "train.seed": s.seed, "train.device": s.device,
    })
    result = train(cfg, overwrite=overwrite, quiet=quiet)
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    info("[bold]4/5 pick[/bold]", quiet)
    model = result.exp_dir / "checkpoints" / "best.pt"
    pick(str(out / "sim" / "micrographs.star"), model, out / "picks",
         PickConfig(device=s.device, overwrite=overwrite, preview=1), quiet=quiet)
    times["pick"] = time.perf_counter() - t

    t = time.perf_counter()
    info("[bold]5/5 evaluate[/bold]", quiet)
    radius = params.diameter / 2 / params.pixel_size
    report = evaluate(out / "picks", out / "sim" / "truth", radius)
    write_report_json(report, out / "evaluation.json")
    times["evaluate"] = time.perf_counter() - t
    write_json_atomic(out / "demo_times.json", times)
    return report, times
