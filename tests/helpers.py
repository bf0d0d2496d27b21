"""Helpers shared by tests: a small extracted dataset, console text without styling."""

from __future__ import annotations

import re
from pathlib import Path

from cryopick.config import ExtractConfig
from cryopick.extract import extract
from cryopick.simulate import SimulationParams, simulate


def small_dataset(root: Path, truth: bool = False) -> Path:
    """Simulate 3 micrographs of 384² (2 labeled) under ``root/sim`` and extract them to ``root/ds``."""
    simulate(root / "sim", SimulationParams(n_micrographs=3, shape=(384, 384), seed=5, label_fraction=0.5,
                                            labeled_micrograph_fraction=0.67), quiet=True)
    extract(str(root / "sim" / "micrographs.star"), str(root / "sim" / "labels"), root / "ds",
            ExtractConfig(diameter=160.0, unlabeled_per_micrograph=60, val_fraction=0.5, seed=0),
            truth=str(root / "sim" / "truth") if truth else None, quiet=True)
    return root / "ds"


def unstyled(text: str) -> str:
    """``text`` without ANSI colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def plain(text: str) -> str:
    """``text`` without ANSI colour codes and with every run of whitespace (rich's wrapping) as one space."""
    return re.sub(r"\s+", " ", unstyled(text))
