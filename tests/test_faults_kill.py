"""Fault injection: kill extract, train and pick (SIGKILL or SIGTERM) after a random, seeded delay.

Whatever the moment, the output must be the old one byte for byte, or complete, or (for a first run)
resumable by re-running; never half-written. CRYOPICK_FAULT_SEED picks another set of moments.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cryopick.checkpoint import load_checkpoint
from cryopick.config import ExtractConfig, PickConfig, TrainConfig, resolve
from cryopick.dataset import load_dataset
from cryopick.extract import extract
from cryopick.fsutil import recover_replaced_dir
from cryopick.pick import pick
from cryopick.simulate import SimulationParams, simulate
from cryopick.train import train

REPO = Path(__file__).resolve().parents[1]
RNG = random.Random(int(os.environ.get("CRYOPICK_FAULT_SEED", "0")))


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_and_kill(args: list[str], cwd: Path) -> int:
    """Run ``cryopick ARGS``; after a random delay send SIGKILL or SIGTERM. Returns the exit status."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "cryopick", *args, "-q"], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    delay, sig = RNG.uniform(0.8, 4.5), RNG.choice([signal.SIGKILL, signal.SIGTERM])
    try:
        _, err = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    text = err.decode(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text
    return proc.returncode


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """Simulated micrographs, and a dataset, an experiment and picks made before the runs that get killed."""
    root = tmp_path_factory.mktemp("kill")
    torch.set_num_threads(1)
    simulate(root / "sim", SimulationParams(n_micrographs=4, shape=(320, 320), seed=4, label_fraction=0.5), quiet=True)
    extract(str(root / "sim/micrographs"), str(root / "sim/labels"), root / "ds",
            ExtractConfig(diameter=160.0, unlabeled_per_micrograph=30, val_fraction=0.25), quiet=True)
    train(resolve(TrainConfig, None, TRAIN | {"data.data_dir": str(root / "ds"), "train.output_root": str(root / "exp")}),
          quiet=True)
    here = os.getcwd()
    os.chdir(root)  # micrograph names as the killed commands (run in root) see them
    try:
        pick("sim/micrographs", MODEL, "picks", PickConfig(workers=0, threshold=0.3), quiet=True)
    finally:
        os.chdir(here)
    return root


TRAIN = {"train.exp_name": "run", "model.backbone": "resnet8", "train.epochs": 2, "train.steps_per_epoch": 3,
         "train.device": "cpu", "optim.warmup_epochs": 0.0}
TRAIN_ARGS = ["--backbone", "resnet8", "--epochs", "2", "--steps-per-epoch", "3", "--device", "cpu"]
MODEL = "exp/run/checkpoints/best.pt"


def test_killed_extract_overwrite_keeps_or_completes(old):
    before = digest(old / "ds")
    run_and_kill(["extract", "sim/micrographs", "-c", "sim/labels", "-d", "160", "-o", "ds", "--overwrite",
                       "--seed", "7", "--unlabeled-per-micrograph", "30", "--val-fraction", "0.25"], old)
    recover_replaced_dir(old / "ds")  # what the next run does first
    assert not [p for p in old.iterdir() if p.name.startswith(".ds")]
    if digest(old / "ds") != before:
        assert "seed: 7" in (old / "ds/extract_config.yaml").read_text()  # swapped in whole (kill after the swap)
    load_dataset(old / "ds")  # old or new, always a whole dataset


def test_killed_train_overwrite_keeps_or_completes_and_a_first_run_resumes(old):
    before = digest(old / "exp/run")
    run_and_kill(["train", "--data-dir", "ds", "--output-root", "exp", "--exp-name", "run", "--overwrite",
                       "--seed", "5", *TRAIN_ARGS], old)
    recover_replaced_dir(old / "exp/run")
    if digest(old / "exp/run") != before:
        for name in ("best.pt", "last.pt"):
            assert load_checkpoint(old / "exp/run/checkpoints" / name)["config"]["train"]["seed"] == 5
    rc = run_and_kill(["train", "--data-dir", "ds", "--output-root", "exp", "--exp-name", "fresh", *TRAIN_ARGS], old)
    last = old / "exp/fresh/checkpoints/last.pt"
    if rc == 0:
        assert (old / "exp/fresh/checkpoints/best.pt").is_file()
    elif last.is_file() and load_checkpoint(last)["training_state"]["loop"]["epoch"] < 2:
        # interrupted after a step: --resume finishes it
        cfg = resolve(TrainConfig, None, TRAIN | {"data.data_dir": str(old / "ds"), "train.exp_name": "fresh",
                                                 "train.output_root": str(old / "exp")})
        result = train(cfg, resume=True, quiet=True)
        assert result.epochs_run == 2 and (old / "exp/fresh/checkpoints/best.pt").is_file()


def test_killed_pick_overwrite_keeps_or_completes_and_a_killed_run_resumes(old, monkeypatch):
    monkeypatch.chdir(old)
    before = digest(old / "picks")
    stars = sorted(p for p in before if p.endswith("_cryopick.star") and "/" in p)
    assert len(stars) == 4
    run_and_kill(["pick", "sim/micrographs", "-m", MODEL, "-o", "picks", "--overwrite", "--threshold", "0.6",
                       "--workers", "0"], old)
    now = digest(old / "picks")
    if now != before:
        marker = json.loads((old / "picks/.cryopick_pick.json").read_text())
        if marker["produced_by"] is None:  # killed while moving the new files in: --overwrite finishes it
            pick("sim/micrographs", MODEL, "picks", PickConfig(workers=0, threshold=0.6, overwrite=True), quiet=True)
            marker = json.loads((old / "picks/.cryopick_pick.json").read_text())
        assert marker["produced_by"]["settings"]["threshold"] == 0.6
        assert all((old / "picks" / s).is_file() for s in stars)

    rc = run_and_kill(["pick", "sim/micrographs", "-m", MODEL, "-o", "fresh", "--threshold", "0.3",
                       "--workers", "0"], old)
    summary = pick("sim/micrographs", MODEL, "fresh", PickConfig(workers=0, threshold=0.3), quiet=True)  # resumes
    if rc == 0:
        assert summary.counts == {}
    fresh = digest(old / "fresh")
    for star in stars:
        assert fresh[star] == before[star], star  # resumed picks equal an uninterrupted run's
