"""Picking accuracy: cryopick vs Topaz (topaz-em 0.3.20) on data with known truth, plus cryopick's ablation.

Not a test: runs the full chains and writes a table. For each case (simulated at several SNRs and particle
shapes, plus the development set dev-shell when present) both pickers train on the same sparse labels:

- cryopick: extract → train (nnPU + Selective FixMatch, EMA teacher) → pick (every peak, threshold 0).
- Topaz, its documented workflow (docs/topaz.md): preprocess -s DS → convert -s DS → train -n N →
  extract -r R -x DS, once with its stock prior and once with the corrected prior of docs/topaz.md (the better
  is Topaz's figure), and its shipped pretrained resnet16 (no training).

Everything is scored by cryopick.evaluate with one radius, half the particle diameter in original pixels,
on every micrograph (labeled ones included, as both pickers train on them as unlabeled data too) and
separately on the micrographs without labels. The ablation (selective vs all vs none, with/without the
EMA teacher) runs with the same data and budget on the shell case, or on the cases of --ablation-cases.

    python benchmarks/accuracy.py                       # CPU profile, < 1 h on 2 cores, writes RESULTS.md
    python benchmarks/accuracy.py --quick --out /tmp/acc-quick     # tiny, checks the script (under a minute once Topaz is installed)
    python benchmarks/accuracy.py --gpu                 # design defaults (resnet18, 50 epochs; Topaz defaults)
    python benchmarks/accuracy.py --cases shell-snr0.05,dev-shell --skip-topaz
    python benchmarks/accuracy.py --cases dev-sparse --ablation-cases dev-sparse --seeds 3 --skip-topaz

Topaz is installed by benchmarks/topaz_env.sh into its own virtual environment (reused when present).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from cryopick.calibrate_model import checkpoint_default_threshold
from cryopick.config import DEFAULT_THRESHOLD, ExtractConfig, PickConfig, TrainConfig, resolve
from cryopick.evaluate import evaluate
from cryopick.extract import extract
from cryopick.fsutil import write_json_atomic, write_text_atomic
from cryopick.io.coords import read_coordinates
from cryopick.io.mrc import read_header
from cryopick.pick import pick
from cryopick.simulate import SimulationParams, simulate
from cryopick.train import train

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# CRYOPICK_DEV_DATA: where dev-shell/dev-sparse lie when ../shared is not beside the checkout (the GPU machine)
SHARED_DATA = Path(os.environ.get("CRYOPICK_DEV_DATA") or REPO.parent / "shared" / "data")
RESULTS_MD = BENCH_DIR / "RESULTS.md"
SECTION = "## Accuracy"
TOPAZ_LABEL_RADIUS = 3  # topaz train -r default (downsampled px)
TOPAZ_EXTRACT_THRESHOLD = -20.0  # logit; low so the ranked list, not the cut-off, decides AP
TOPAZ_TARGET_DIAMETER_PX = 20.0  # downsample so the particle spans ~20 px, well inside the 71-px receptive field


# ---------------------------------------------------------------------------------------------
# profiles (budgets) and cases


@dataclass(frozen=True)
class Profile:
    name: str
    backbone: str
    epochs: int
    steps_per_epoch: int | None  # None: cryopick's default (one pass over the data)
    device: str  # cryopick device
    topaz_device: int  # -1 = CPU
    topaz_epochs: int
    topaz_epoch_size: int
    topaz_minibatch: int
    topaz_threads: int
    sim_micrographs: int
    sim_size: int
    design_ramps: bool  # True: the config's loss ramps (made for 50 epochs); False: scaled to the budget

    def cryopick_budget(self) -> str:
        steps = self.steps_per_epoch if self.steps_per_epoch else "auto"
        return f"{self.backbone} {self.epochs}×{steps} steps×32"

    def topaz_budget(self) -> str:
        return f"resnet8 {self.topaz_epochs}×{self.topaz_epoch_size} upd×{self.topaz_minibatch}"


PROFILES = {
    # 4-7 min of training each on 2 free cores (12 × 100 steps: 8 × 100 cost as much before consistency ran on a
    # quarter of the crops); Topaz's budget is sized to a similar training wall time
    "cpu": Profile("cpu", "resnet8", 12, 100, "cpu", -1, 5, 60, 128, 2, 6, 1024, False),
    "quick": Profile("quick", "resnet8", 2, 3, "cpu", -1, 1, 3, 32, 2, 2, 512, False),
    "gpu": Profile("gpu", "resnet18", 50, None, "cuda", 0, 10, 1000, 256, 8, 8, 2048, True),
}


@dataclass(frozen=True)
class SimCase:
    name: str
    particle: str
    snr: float
    seed: int
    note: str


SIM_CASES = {c.name: c for c in (
    SimCase("shell-snr0.05", "shell", 0.05, 11, "hollow shell, medium SNR (ablation case)"),
    SimCase("rod-snr0.03", "rod", 0.03, 12, "elongated rod, low SNR"),
    SimCase("blob-snr0.1", "blob", 0.10, 13, "compact blob, high SNR"),
    SimCase("ring-snr0.02", "ring", 0.02, 14, "ring, very low SNR"),
)}
DEV_CASE = "dev-shell"
DEV_CASES = ("dev-shell", "dev-sparse")  # ../shared/data/<name>, used when present
DEFAULT_CASES = ["shell-snr0.05", "rod-snr0.03", "blob-snr0.1", "ring-snr0.02", *DEV_CASES]
ALL_CASES = DEFAULT_CASES
ABLATION_CASE = "shell-snr0.05"
ABLATION = [  # (method label, loss.consistency, model.use_ema)
    ("cryopick selective+EMA", "selective", True),
    ("cryopick all (FixMatch)+EMA", "all", True),
    ("cryopick none (PU only)+EMA", "none", True),
    ("cryopick selective, no EMA", "selective", False),
]


def variant_key(variant: tuple[str, str, bool]) -> str:
    """The --variants name of an ABLATION entry, e.g. selective-ema, none-ema, selective-noema."""
    return f"{variant[1]}-{'ema' if variant[2] else 'noema'}"


VARIANT_KEYS = [variant_key(v) for v in ABLATION]


@dataclass
class PreparedCase:
    """A case on disk, in the form both pickers read."""

    name: str
    note: str
    micrographs: str  # STAR or glob cryopick reads
    mrc_paths: list[Path]
    labels: Path  # directory of STAR files (cryopick)
    labels_topaz: Path  # Topaz table, original px
    truth: Path
    truth_unlabeled: Path  # truth of the micrographs without labels only
    diameter_A: float
    pixel_size: float
    n_micrographs: int
    n_truth: int
    n_labels: int

    @property
    def diameter_px(self) -> float:
        return self.diameter_A / self.pixel_size

    @property
    def radius_px(self) -> float:
        return self.diameter_px / 2

    @property
    def expected_per_micrograph(self) -> float:
        return self.n_truth / self.n_micrographs

    def describe(self) -> str:
        return (f"{self.n_micrographs} mics, {self.n_truth} particles, {self.n_labels} labels, "
                f"D={self.diameter_A:.0f} Å @ {self.pixel_size:g} Å/px ({self.diameter_px:.1f} px)")


def _labels_by_micrograph(labels: Path) -> dict[str, np.ndarray]:
    out = {}
    for table in read_coordinates(labels):
        name = table.micrograph or table.source.stem
        out[Path(name).stem] = table.coords[["x", "y"]].to_numpy()
    return out


def write_topaz_labels(labels: Path, path: Path) -> int:
    """Topaz label table ``image_name x_coord y_coord`` (original px) from our label STAR files."""
    rows = ["image_name\tx_coord\ty_coord"]
    for name, xy in sorted(_labels_by_micrograph(labels).items()):
        rows += [f"{name}\t{int(round(x))}\t{int(round(y))}" for x, y in xy]
    write_text_atomic(path, "\n".join(rows) + "\n")
    return len(rows) - 1


def write_unlabeled_truth(truth: Path, labeled: set[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for star in sorted(truth.glob("*.star")):
        if star.stem not in labeled:
            shutil.copyfile(star, out / star.name)
    return out


def prepare_simulated(case: SimCase, profile: Profile, root: Path) -> PreparedCase:
    out = root / "data" / case.name
    params = SimulationParams(n_micrographs=profile.sim_micrographs, shape=(profile.sim_size, profile.sim_size),
                              particle=case.particle, snr=case.snr, seed=case.seed)
    marker = out / "case.json"
    info = json.loads(marker.read_text()) if marker.exists() else {}
    if not info.get("complete") or info.get("params", {}).get("n_micrographs") != params.n_micrographs:
        info = simulate(out, params, quiet=True, overwrite=True)
    n_labels = write_topaz_labels(out / "labels", out / "labels_topaz.txt")
    labeled = set(_labels_by_micrograph(out / "labels"))
    return PreparedCase(
        name=case.name, note=case.note, micrographs=str(out / "micrographs.star"),
        mrc_paths=sorted((out / "micrographs").glob("*.mrc")), labels=out / "labels",
        labels_topaz=out / "labels_topaz.txt", truth=out / "truth",
        truth_unlabeled=write_unlabeled_truth(out / "truth", labeled, out / "truth_unlabeled"),
        diameter_A=params.diameter, pixel_size=params.pixel_size, n_micrographs=params.n_micrographs,
        n_truth=int(info["counts"]["n_particles"]), n_labels=n_labels)


def prepare_dev(name: str, root: Path) -> PreparedCase:
    dev = SHARED_DATA / name
    info = json.loads((dev / "case.json").read_text())
    labeled = set(info["labels"]["labelled_micrographs"])
    return PreparedCase(
        name=name, note=info.get("note", "independent dev set"),
        micrographs=str(dev / "micrographs_ctf.star"),
        mrc_paths=sorted((dev / "micrographs").glob("*.mrc")), labels=dev / "labels",
        labels_topaz=dev / "labels_topaz.txt", truth=dev / "truth",
        truth_unlabeled=write_unlabeled_truth(dev / "truth", labeled, root / "data" / name / "truth_unlabeled"),
        diameter_A=float(info["particle"]["diameter_A"]), pixel_size=float(info["pixel_size_A"]),
        n_micrographs=int(info["n_micrographs"]), n_truth=int(info["counts"]["n_truth_total"]),
        n_labels=int(info["counts"]["n_labels_total"]))


def prepare_case(name: str, profile: Profile, root: Path) -> PreparedCase:
    if name in DEV_CASES:
        return prepare_dev(name, root)
    return prepare_simulated(SIM_CASES[name], profile, root)


# ---------------------------------------------------------------------------------------------
# timing and scoring


@dataclass
class Clock:
    """Wall and CPU seconds (this process's threads plus finished child processes)."""

    wall: float = 0.0
    cpu: float = 0.0

    @staticmethod
    def _cpu_now() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def run(self, fn: Callable, *args, **kwargs):
        w0, c0 = time.perf_counter(), self._cpu_now()
        try:
            return fn(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - w0
            self.cpu += self._cpu_now() - c0

    def plus(self, other: "Clock") -> "Clock":
        return Clock(self.wall + other.wall, self.cpu + other.cpu)


@dataclass
class Result:
    case: str
    method: str
    ap: float = math.nan
    ap_unlabeled: float = math.nan
    best_f1: float = math.nan
    best_threshold: float = math.nan
    precision: float = math.nan  # at the method's default threshold
    f1: float = math.nan
    recall: float = math.nan
    n_picks: int = 0  # at the default threshold
    default_threshold: str = ""
    wall_s: float = math.nan
    cpu_s: float = math.nan
    budget: str = ""
    note: str = ""
    error: str = ""


def score(result: Result, case: PreparedCase, picks: Path, threshold: float) -> Result:
    """AP / best F1 over all picks, P/R at ``threshold`` (score units of the method), all micrographs."""
    report = evaluate(picks, case.truth, case.radius_px, threshold=threshold)
    o = report.overall
    result.ap, result.best_f1, result.best_threshold = o["ap"], o["best_f1"], o["best_threshold"]
    result.precision, result.recall, result.n_picks = o["precision"], o["recall"], o["n_picks"]
    result.f1 = o["f1"]
    if any(case.truth_unlabeled.glob("*.star")):
        result.ap_unlabeled = evaluate(picks, case.truth_unlabeled, case.radius_px).overall["ap"]
    return result


# ---------------------------------------------------------------------------------------------
# cryopick


def cryopick_train_config(case_dir: Path, data_dir: Path, exp_name: str, case: PreparedCase, profile: Profile,
                          consistency: str, use_ema: bool, balanced_prior: float | None = None,
                          seed: int = 0, with_count: bool = False, extra: dict | None = None) -> TrainConfig:
    overrides = {
        "data.data_dir": str(data_dir), "train.output_root": str(case_dir / "experiments"),
        "train.exp_name": exp_name, "model.backbone": profile.backbone, "train.epochs": profile.epochs,
        "train.steps_per_epoch": profile.steps_per_epoch, "train.device": profile.device,
        "loss.expected_particles": case.expected_per_micrograph if with_count else None,
        "loss.consistency": consistency, "model.use_ema": use_ema, "train.seed": seed,
    }
    if balanced_prior is not None:  # None keeps cryopick's own default
        overrides["loss.balanced_prior"] = balanced_prior
    if not profile.design_ramps:  # as cryopick.demo: the ramps are in epochs, made for the 50-epoch default
        e = profile.epochs
        overrides["loss.cons_ramp_epochs"] = [0.0, e / 3]
        overrides["loss.ent_ramp_epochs"] = [e / 3, 2 * e / 3]
    overrides.update(extra or {})
    return resolve(TrainConfig, None, overrides)


def cryopick_extract(case: PreparedCase, data_dir: Path, clock: Clock) -> None:
    clock.run(extract, case.micrographs, str(case.labels), data_dir,
              ExtractConfig(diameter=case.diameter_A, seed=0, overwrite=True), quiet=True)


def run_cryopick(case: PreparedCase, profile: Profile, work: Path, method: str, consistency: str, use_ema: bool,
                 extract_clock: Clock | None = None, balanced_prior: float | None = None, seed: int = 0,
                 with_count: bool = False, threshold: float | None = None,
                 extra: dict | None = None) -> tuple[Result, Clock]:
    """Extract (unless given its clock: the dataset is shared), train, pick at threshold 0, score at
    ``threshold`` (pick's default for the trained model unless given)."""
    result = Result(case.name, method, budget=profile.cryopick_budget())
    case_dir = work / case.name / "cryopick"
    data_dir = case_dir / "dataset"
    if extract_clock is None:
        extract_clock = Clock()
        cryopick_extract(case, data_dir, extract_clock)
    clock = Clock()
    exp_name = re.sub(r"[^A-Za-z0-9]+", "_", method).strip("_")
    cfg = cryopick_train_config(case_dir, data_dir, exp_name, case, profile, consistency, use_ema, balanced_prior,
                                seed, with_count, extra)
    trained = clock.run(train, cfg, overwrite=True, quiet=True)
    if trained.interrupted:  # cryopick.train turns Ctrl-C / SIGTERM into a saved, resumable stop
        raise KeyboardInterrupt
    picks_dir = case_dir / f"picks_{exp_name}"
    shutil.rmtree(picks_dir, ignore_errors=True)
    best = trained.exp_dir / "checkpoints" / "best.pt"
    clock.run(pick, case.micrographs, best, picks_dir,
              PickConfig(threshold=0.0, device=profile.device, overwrite=True), quiet=True)
    if threshold is None:
        threshold = checkpoint_default_threshold(best)
    result.default_threshold = f"p={threshold:.3g}"
    total = clock.plus(extract_clock)
    result.wall_s, result.cpu_s = total.wall, total.cpu
    counts = json.loads((data_dir / "manifest.json").read_text())["counts"]
    result.note = (f"best epoch {trained.best_epoch + 1}/{trained.epochs_run}; seed {seed}; "
                   f"{'given the true count' if with_count else 'no count'}; labels {counts['train']['positive']} "
                   f"+ {counts['val']['positive']} (extract's train + val)")
    return score(result, case, picks_dir, threshold), extract_clock


# ---------------------------------------------------------------------------------------------
# Topaz


def install_topaz(log: Path) -> Path:
    """Path of a working `topaz` from benchmarks/topaz_env.sh (installs on first use, ~1.5 min)."""
    with log.open("a") as fh:
        proc = subprocess.run(["bash", str(BENCH_DIR / "topaz_env.sh")], stdout=subprocess.PIPE, stderr=fh,
                              text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"topaz_env.sh failed (exit {proc.returncode}); see {log}")
    return Path(proc.stdout.strip().splitlines()[-1])


def topaz_sees_cuda(exe: Path) -> bool:
    """Whether the torch in Topaz's venv has a usable GPU (topaz -d 0 silently falls back to the CPU otherwise)."""
    probe = subprocess.run([str(exe.parent / "python"), "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"


def topaz_downsampling(case: PreparedCase) -> int:
    return max(1, int(round(case.diameter_px / TOPAZ_TARGET_DIAMETER_PX)))


def disk_pixels_2d(radius: int) -> int:
    """Pixels of Topaz's label disk as it should count them (the 2-D version of stats.pixels_given_radius)."""
    grid = np.linspace(-radius, radius, 2 * radius + 1)
    xx, yy = np.meshgrid(grid, grid)
    return int((xx**2 + yy**2 <= radius**2).sum())


def corrected_pi(case: PreparedCase, preprocessed: list[Path], n_labels: int, radius: int) -> float:
    """``--pi`` that makes Topaz's GE target π − p_observed equal the true unlabeled-positive fraction.

    Topaz 0.3.20 counts (2r+1)·disk pixels per label (a 3-D grid for a 2-D disk), so its observed positive
    fraction is (2r+1)·p_obs; passing π_true + 2r·p_obs cancels that (docs/topaz.md).
    """
    total = sum(int(np.prod(read_header(p).shape)) for p in preprocessed)
    area = disk_pixels_2d(radius)
    pi_true = area * case.expected_per_micrograph * len(preprocessed) / total
    p_obs = area * n_labels / total
    return pi_true + 2 * radius * p_obs


class Topaz:
    """Topaz's command-line workflow in one case's work directory; every call's time goes on a clock."""

    def __init__(self, exe: Path, case: PreparedCase, profile: Profile, work: Path, log: Path):
        self.exe, self.case, self.profile, self.log = exe, case, profile, log
        self.dir = work / case.name / "topaz"
        self.ds = topaz_downsampling(case)
        self.pre = self.dir / "preprocessed"
        self.labels = self.dir / "labels_ds.txt"

    def call(self, clock: Clock, *args: str) -> None:
        cmd = [str(self.exe), *args]
        with self.log.open("a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            proc = clock.run(subprocess.run, cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=self.dir)
        if proc.returncode != 0:
            raise RuntimeError(f"topaz {args[0]} failed (exit {proc.returncode}); see {self.log}")

    def preprocess(self) -> Clock:
        """Downsample + GMM-normalise every micrograph and convert the labels (shared by the variants)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.pre.mkdir(parents=True)
        clock = Clock()
        self.call(clock, "preprocess", "-d", str(self.profile.topaz_device), "-j", str(self.profile.topaz_threads),
                  "-s", str(self.ds), "-o", str(self.pre), *map(str, self.case.mrc_paths))
        self.call(clock, "convert", "-s", str(self.ds), str(self.case.labels_topaz), "-o", str(self.labels))
        return clock

    def preprocessed(self) -> list[Path]:
        return sorted(self.pre.glob("*.mrc"))

    def n_labels(self) -> int:
        return sum(1 for line in self.labels.read_text().splitlines()[1:] if line.strip())

    def train(self, name: str, prior_args: list[str], clock: Clock) -> Path:
        p = self.profile
        model_dir = self.dir / name
        model_dir.mkdir(parents=True, exist_ok=True)
        self.call(clock, "train", "-d", str(p.topaz_device), "-j", str(p.topaz_threads),
                  "--train-images", str(self.pre), "--train-targets", str(self.labels), *prior_args,
                  "-r", str(TOPAZ_LABEL_RADIUS), "--num-epochs", str(p.topaz_epochs),
                  "--epoch-size", str(p.topaz_epoch_size), "--minibatch-size", str(p.topaz_minibatch),
                  "--save-prefix", str(model_dir / "model"), "-o", str(model_dir / "train_curve.txt"))
        models = sorted(model_dir.glob("model_epoch*.sav"), key=lambda q: int(re.findall(r"\d+", q.stem)[-1]))
        if not models:
            raise RuntimeError(f"topaz train wrote no model in {model_dir}; see {self.log}")
        return models[-1]  # the documented workflow without a test split: the last epoch

    def extract(self, model: str, out: Path, clock: Clock) -> Path:
        radius = max(1, int(round(self.case.radius_px / self.ds)))
        self.call(clock, "extract", "-d", str(self.profile.topaz_device), "-j", str(self.profile.topaz_threads),
                  "-m", model, "-r", str(radius), "-x", str(self.ds), "-t", str(TOPAZ_EXTRACT_THRESHOLD),
                  "-o", str(out), *map(str, self.preprocessed()))
        return out


def topaz_result(case: PreparedCase, method: str, budget: str, picks: Path, clock: Clock, note: str) -> Result:
    # Topaz's score is a logit: its natural default is 0 (p = 0.5)
    result = Result(case.name, method, budget=budget, default_threshold="logit 0", note=note,
                    wall_s=clock.wall, cpu_s=clock.cpu)
    return score(result, case, picks, 0.0)


TOPAZ_METHODS = ("Topaz stock prior", "Topaz corrected prior", "Topaz pretrained resnet16")


def run_topaz(case: PreparedCase, profile: Profile, work: Path, exe: Path, log: Path,
              record: Callable[[Result], None], done: set[str] = frozenset(), stock: bool = False) -> None:
    """Topaz's rows for ``case``, except the methods in ``done`` (rows kept from an earlier run); its stock
    prior only with ``stock`` (the corrected prior is the comparison that counts, docs/topaz.md)."""
    done = set(done) | (set() if stock else {TOPAZ_METHODS[0]})
    if all(m in done for m in TOPAZ_METHODS):
        return
    topaz = Topaz(exe, case, profile, work, log)
    pre_clock = topaz.preprocess()
    n_labels = topaz.n_labels()
    pi = corrected_pi(case, topaz.preprocessed(), n_labels, TOPAZ_LABEL_RADIUS)
    variants = [
        (TOPAZ_METHODS[0], ["-n", f"{case.expected_per_micrograph:.2f}"], f"-n {case.expected_per_micrograph:.1f}"),
        (TOPAZ_METHODS[1], ["--pi", f"{pi:.6g}"], f"--pi {pi:.4g}"),
    ]
    for method, prior_args, note in variants:
        if method in done:
            continue
        clock = Clock()
        try:
            model = topaz.train(method.split()[1], prior_args, clock)
            picks = topaz.extract(str(model), topaz.dir / f"picks_{method.split()[1]}.txt", clock)
            record(topaz_result(case, method, profile.topaz_budget(), picks, clock.plus(pre_clock),
                                f"DS {topaz.ds}, {note}"))
        except RuntimeError as exc:
            record(Result(case.name, method, budget=profile.topaz_budget(), error=str(exc)))
    if TOPAZ_METHODS[2] in done:
        return
    clock = Clock()
    try:
        picks = topaz.extract("resnet16", topaz.dir / "picks_pretrained.txt", clock)
        record(topaz_result(case, TOPAZ_METHODS[2], "no training", picks, clock.plus(pre_clock), f"DS {topaz.ds}"))
    except RuntimeError as exc:
        record(Result(case.name, TOPAZ_METHODS[2], error=str(exc)))


# ---------------------------------------------------------------------------------------------
# report


def _f(value: float, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


TABLE_HEAD = ("| case | method | AP | AP unlab. mics | best F1 (at score) | F1 at default | P / R at default (thr) "
              "| picks | wall s | CPU s | budget | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: Result) -> str:
    if r.error:
        return f"| {r.case} | {r.method} | failed | | | | | | | | {r.budget} | {r.error} |"
    return (f"| {r.case} | {r.method} | {_f(r.ap)} | {_f(r.ap_unlabeled)} | {_f(r.best_f1)} ({_f(r.best_threshold, '.2f')}) "
            f"| {_f(r.f1)} | {_f(r.precision)} / {_f(r.recall)} ({r.default_threshold}) | {r.n_picks} | {_f(r.wall_s, '.0f')} "
            f"| {_f(r.cpu_s, '.0f')} | {r.budget} | {r.note} |")


def best_topaz(results: list[Result], case: str) -> Result | None:
    trained = [r for r in results if r.case == case and r.method.startswith("Topaz") and "pretrained" not in r.method
               and not r.error]
    return max(trained, key=lambda r: r.ap) if trained else None


def seed_suffix(seed: int) -> str:
    """Method-label suffix of a training seed other than 0 (the head-to-head rows use seed 0)."""
    return f" (seed {seed})" if seed else ""


def overrides_suffix(overrides: dict) -> str:
    """Method-label suffix for --set training overrides, e.g. ' [optim.lr=0.003]'."""
    return " [" + ", ".join(f"{k}={v}" for k, v in overrides.items()) + "]" if overrides else ""


def parse_overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs into a config-override dict; values are parsed as YAML scalars (0.003, true, [0, 4])."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            sys.exit(f"--set {pair!r}: expected KEY=VALUE, e.g. optim.lr=0.003")
        out[key.strip()] = yaml.safe_load(value)
    return out


def prior_suffix(balanced_prior: float | None) -> str:
    """Method-label suffix for a non-default nnPU weighting (cryopick's loss.balanced_prior π')."""
    return "" if balanced_prior is None else f", π'={balanced_prior:g}"


def _suffixes(results: list[Result]) -> list[str]:
    base = ABLATION[0][0]
    return list(dict.fromkeys(r.method[len(base):] for r in results if r.method.startswith(base)))


def ablated_cases(results: list[Result]) -> list[str]:
    """The cases that have ablation rows (a variant other than the head-to-head one)."""
    others = tuple(label for label, _, _ in ABLATION[1:])
    return list(dict.fromkeys(r.case for r in results if r.method.startswith(others)))


def verdicts(results: list[Result], cases: list[str]) -> list[str]:
    """The goal checks (issue 8): cryopick vs the better trained Topaz per case (AP ≥ Topaz + 0.03), F1 at the
    default threshold against the best F1, and the ablation over seeds (mean ± sd)."""
    lines = []
    ok = [r for r in results if not r.error]
    for suffix in _suffixes([r for r in ok if "(seed" not in r.method]):
        for case in cases:
            ours = next((r for r in ok if r.case == case and r.method == ABLATION[0][0] + suffix), None)
            if ours is None:
                continue
            ratio = ours.f1 / ours.best_f1 if ours.best_f1 else math.nan
            calib = (f"F1 at {ours.default_threshold} {ours.f1:.3f} = {ratio:.2f} × best F1 {ours.best_f1:.3f} "
                     f"({'met' if ratio >= 0.95 else '**missed**'}: goal ≥ 0.95)")
            theirs = best_topaz(results, case)
            if theirs is None:
                lines.append(f"- {case}: {ours.method} AP {ours.ap:.3f}; {calib}.")
                continue
            gap = ours.ap - theirs.ap
            won = "met" if gap >= 0.03 else ("cryopick ahead by < 0.03 (goal missed)" if gap >= 0
                                             else "**cryopick loses**")
            speed = "faster" if ours.wall_s < theirs.wall_s else "**slower**"
            lines.append(f"- {case}: {ours.method} AP {ours.ap:.3f} vs {theirs.method} {theirs.ap:.3f}: "
                         f"ΔAP {gap:+.3f} ({won}: goal ≥ +0.03); {calib}; end to end {ours.wall_s:.0f} s vs "
                         f"{theirs.wall_s:.0f} s ({speed}).")
        for case in ablated_cases(ok):
            lines += ablation_lines(ok, suffix, case)
    return lines


def ablation_lines(ok: list[Result], suffix: str, case: str = ABLATION_CASE) -> list[str]:
    """Mean ± sd of AP and F1 at the default threshold per ablation variant over its seeds (seed 0 is the head-to-head row)."""
    rows = []
    for label, _, _ in ABLATION:
        runs = [r for r in ok if r.case == case and re.fullmatch(re.escape(label + suffix) +
                                                                  r"( \(seed \d+\))?", r.method)]
        if runs:
            ap, f1 = np.array([r.ap for r in runs]), np.array([r.f1 for r in runs])
            rows.append(f"{label}: AP {ap.mean():.3f} ± {ap.std(ddof=1) if len(ap) > 1 else 0:.3f}, "
                        f"F1 at default ({', '.join(sorted({r.default_threshold for r in runs}))}) {f1.mean():.3f} ± "
                        f"{f1.std(ddof=1) if len(f1) > 1 else 0:.3f} "
                        f"({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    return [f"- ablation ({case}{suffix}): " + "; ".join(rows) + "."] if len(rows) > 1 else []


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def render_section(results: list[Result], cases: list[PreparedCase], profile: Profile, command: str,
                   started: str, finished: bool, elapsed: float) -> str:
    lines = [SECTION, ""]
    status = "complete" if finished else "**partial: the run was still going or stopped; rows below are what finished**"
    lines += [f"Run {started} ({status}, {elapsed / 60:.1f} min), profile `{profile.name}`, on {machine_line()}.",
              "", f"Command: `{command}`", ""]
    lines += [f"- {c.name}: {c.note}; {c.describe()}" for c in cases]
    lines += ["", TABLE_HEAD] + [table_row(r) for r in results] + [""]
    lines += verdicts(results, [c.name for c in cases]) + [""]
    lines += [
        "How to read it: AP and best F1 rank every pick of every micrograph (labeled ones included) against the "
        "full truth with one-to-one matching within half the particle diameter (cryopick.evaluate); "
        "\"AP unlab. mics\" is the same on the micrographs that had no labels. P/R at default: cryopick at "
        "its default threshold (or --threshold), Topaz at logit 0 (its p = 0.5); best F1's threshold is in each method's own score units "
        "(probability / logit). Wall and CPU seconds are end to end: cryopick extract + train + pick; Topaz "
        "preprocess + convert + train + extract (the preprocessing is counted in every Topaz row). Budgets: "
        "cryopick epochs × steps × batch (P:U 1:4); Topaz epochs × updates × minibatch, from its shipped "
        "pretrained weights, model of the last epoch. Topaz DS makes the particle ~20 px; extract -t "
        f"{TOPAZ_EXTRACT_THRESHOLD:g}. Topaz's figure for the goal is the better of its two priors. The CPU was "
        "shared with other work, so wall times are noisy; CPU seconds are the steadier cost. One seed per row.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace our section in ``path`` (from SECTION to the next level-2 heading), keeping everything else."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    write_text_atomic(path, text.rstrip() + "\n")


# ---------------------------------------------------------------------------------------------
# main


def resume_state(work: Path, profile: Profile, started: str, command: str) -> tuple[list[Result], str, float, str]:
    """Finished rows, start time, elapsed seconds and command of the earlier run in ``work`` (failed rows rerun)."""
    try:
        meta = json.loads((work / "run.json").read_text())
        rows = json.loads((work / "results.json").read_text())
    except (OSError, ValueError):
        return [], started, 0.0, command
    if meta.get("profile") != profile.name:
        sys.exit(f"--resume: {work} holds a '{meta.get('profile')}' run, not '{profile.name}'")
    renamed = {"ap_unlabelled": "ap_unlabeled"}  # results.json of runs before the spelling change
    kept = [Result(**{renamed.get(k, k): v for k, v in r.items()}) for r in rows if not r.get("error")]
    return kept, meta["started"], float(meta["elapsed_s"]), f"{meta['command']}; then {command}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated, from {', '.join(ALL_CASES)} (default: {', '.join(DEFAULT_CASES)}; "
                         "dev-shell only when present)")
    ap.add_argument("--quick", action="store_true", help="tiny data and budgets, to check the script")
    ap.add_argument("--gpu", action="store_true", help="design defaults on a GPU (resnet18, 50 epochs; Topaz defaults)")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary folder)")
    ap.add_argument("--skip-topaz", action="store_true", help="cryopick only")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--balanced-prior", type=float, default=None,
                    help="cryopick loss.balanced_prior π' for every cryopick row (default: cryopick's own default); "
                         "the rows are labeled with it")
    ap.add_argument("--epochs", type=int, default=None,
                    help="cryopick training epochs (default: the profile's; cpu 12)")
    ap.add_argument("--steps-per-epoch", type=int, default=None,
                    help="cryopick steps of 32 patches per epoch (default: the profile's; cpu 100)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="cryopick training-config override for every cryopick row (repeatable; e.g. optim.lr=0.003); "
                         "the rows are labeled with it")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds of each ablation row (mean ± sd reported)")
    ap.add_argument("--ablation-cases", default=None,
                    help=f"comma-separated cases that also run the ablation (default: {ABLATION_CASE}; "
                         "each must be among --cases)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated ablation variants to run, from " + ", ".join(VARIANT_KEYS)
                         + " (default: all; e.g. selective-ema alone gives the default's spread over seeds; on an "
                         "ablation case the head-to-head row is selective-ema, left out when the list lacks it)")
    ap.add_argument("--with-count", action="store_true",
                    help="give cryopick the true particle count (--expected-particles); default: nothing but the diameter")
    ap.add_argument("--topaz-stock", action="store_true", help="also run Topaz with its stock (inflated) prior")
    ap.add_argument("--threshold", type=float, default=None,
                    help="cryopick's cut for P/R/F1 at default (default: pick's for each trained model, "
                    f"{DEFAULT_THRESHOLD:g} or half a mixture calibration's estimated best F1 where lower); AP and "
                    "best F1 do not depend on it")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished rows of OUT/results.json (same profile) and run only the missing ones")
    ap.add_argument("--results", default=None,
                    help=f"markdown file for the '{SECTION}' section (default: {RESULTS_MD}; --quick: OUT/RESULTS.md)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick and args.gpu:
        sys.exit("--quick and --gpu exclude each other")
    profile = PROFILES["quick" if args.quick else "gpu" if args.gpu else "cpu"]
    profile = dataclasses.replace(profile, epochs=args.epochs or profile.epochs,
                                  steps_per_epoch=args.steps_per_epoch or profile.steps_per_epoch)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cryopick-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    results_md = Path(args.results) if args.results else (work / "RESULTS.md" if args.quick else RESULTS_MD)
    defaults = [ABLATION_CASE] if args.quick else [c for c in DEFAULT_CASES
                                                   if c not in DEV_CASES or (SHARED_DATA / c).is_dir()]
    names = args.cases.split(",") if args.cases else defaults
    unknown = [n for n in names if n not in SIM_CASES and not (n in DEV_CASES and (SHARED_DATA / n).is_dir())]
    if unknown:
        sys.exit(f"unknown or missing case(s): {', '.join(unknown)}")
    ablation_cases = tuple(args.ablation_cases.split(",")) if args.ablation_cases else (ABLATION_CASE,)
    variants = args.variants.split(",") if args.variants else VARIANT_KEYS
    if set(variants) - set(VARIANT_KEYS):
        sys.exit(f"unknown variant(s): {', '.join(sorted(set(variants) - set(VARIANT_KEYS)))}")
    if args.ablation_cases and set(ablation_cases) - set(names):
        sys.exit(f"--ablation-cases not among the cases: {', '.join(sorted(set(ablation_cases) - set(names)))}")
    overrides = parse_overrides(args.overrides)
    command = ("python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    started, t0, earlier_s = dt.datetime.now().strftime("%Y-%m-%d %H:%M"), time.perf_counter(), 0.0
    log = work / "topaz.log"
    results: list[Result] = []
    prepared: list[PreparedCase] = []
    if args.resume:
        results, started, earlier_s, command = resume_state(work, profile, started, command)
    done = {(r.case, r.method) for r in results}

    def publish(finished: bool = False) -> None:
        elapsed = earlier_s + time.perf_counter() - t0
        write_json_atomic(work / "results.json", [dataclasses.asdict(r) for r in results])
        write_json_atomic(work / "run.json", {"profile": profile.name, "started": started, "command": command,
                                               "elapsed_s": elapsed})
        write_section(results_md, render_section(results, prepared, profile, command, started, finished, elapsed))

    def record(result: Result) -> None:
        results.append(result)
        print(table_row(result), flush=True)
        publish()

    exe = None
    if not args.skip_topaz:
        exe = install_topaz(log)
        if profile.topaz_device >= 0 and not topaz_sees_cuda(exe):
            sys.exit(f"--gpu: the torch in Topaz's venv ({exe.parent.parent}) has no CUDA; install a CUDA build "
                     "there (TOPAZ_TORCH=... bash benchmarks/topaz_env.sh DIR, TOPAZ_VENV=DIR) or pass --skip-topaz")
    print(f"work dir {work}; profile {profile.name}; cases {', '.join(names)}", flush=True)
    print(TABLE_HEAD, flush=True)
    for r in results:
        print(table_row(r), flush=True)
    extract_clocks: dict[str, Clock] = {}

    def cryopick_row(case: PreparedCase, method: str, consistency: str, use_ema: bool, seed: int = 0) -> None:
        method += prior_suffix(args.balanced_prior) + overrides_suffix(overrides) + seed_suffix(seed)
        if (case.name, method) in done:
            return
        try:
            result, extract_clocks[case.name] = run_cryopick(case, profile, work, method, consistency, use_ema,
                                                            extract_clocks.get(case.name), args.balanced_prior,
                                                            seed, args.with_count, args.threshold, overrides)
        except Exception as exc:  # a failed run is a row of the table, not the end of the benchmark
            result = Result(case.name, method, budget=profile.cryopick_budget(), error=f"{type(exc).__name__}: {exc}")
        record(result)

    def head_to_head(case: PreparedCase) -> None:
        if case.name not in ablation_cases or variant_key(ABLATION[0]) in variants:  # --variants may leave it out
            cryopick_row(case, *ABLATION[0])
        if exe is not None:
            try:
                run_topaz(case, profile, work, exe, log, record, {m for c, m in done if c == case.name},
                          args.topaz_stock)
            except RuntimeError as exc:  # preprocessing failed: no Topaz row can follow
                record(Result(case.name, "Topaz (all variants)", error=str(exc)))

    # order of importance, so a run cut short still has the main results: the ablation case's head-to-head,
    # the ablation, the independent dev set, then the other simulated cases
    order = sorted(names, key=lambda n: (n not in ablation_cases, n not in DEV_CASES))
    for name in dict.fromkeys(r.case for r in results if r.case not in names):  # kept rows of other cases
        prepared.append(prepare_case(name, profile, work))
    for name in order:
        case = prepare_case(name, profile, work)
        prepared.append(case)
        head_to_head(case)
        if name in ablation_cases and not args.skip_ablation:
            for seed in range(args.seeds):
                for variant in ABLATION[0 if seed else 1:]:
                    if variant_key(variant) in variants:
                        cryopick_row(case, *variant, seed=seed)
    publish(finished=True)
    print("\n".join(verdicts(results, names)))
    print(f"wrote {results_md} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
