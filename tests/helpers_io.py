"""Small helpers for the io tests: files written exactly as the tools write them, tiny MRC micrographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryopick.io.mrc import write_mrc

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEV_SET = SHARED / "data" / "dev-shell"
needs_dev_set = pytest.mark.skipif(not (DEV_SET / "micrographs_ctf.star").is_file(),
                                   reason="shared dev set (../shared/data/dev-shell) not present")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` byte for byte (no newline translation), creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        handle.write(text)
    return path


def write_tiny_mrc(path: Path, pixel_size: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mrc(path, np.zeros((8, 8), dtype=np.float32), pixel_size)
    return path
