import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cryopick.io.mrc import write_mrc
from cryopick.io.relion import write_coordinate_star

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEV_SHELL = SHARED / "data" / "dev-shell"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def tiny_project(tmp_path):
    """Three non-square float32 micrographs (2 Å/px); labels on the first two, one 0-byte label file."""
    rng = np.random.default_rng(0)
    mics = tmp_path / "mics"
    labels = tmp_path / "labels"
    mics.mkdir()
    labels.mkdir()
    coords = {
        "mic_a": np.array([[40.0, 50.0], [150.0, 100.0], [250.0, 30.0]]),
        "mic_b": np.array([[100.0, 100.0], [10.0, 170.0]]),
    }
    for name in ("mic_a", "mic_b", "mic_c"):
        write_mrc(mics / f"{name}.mrc", rng.normal(size=(180, 300)).astype(np.float32), pixel_size=2.0)
    for name, xy in coords.items():
        write_coordinate_star(labels / f"{name}_manualpick.star", xy[:, 0], xy[:, 1], np.zeros(len(xy)))
    (labels / "mic_c_manualpick.star").write_text("")  # RELION's empty coordinate file
    return tmp_path, coords


@pytest.fixture
def single_torch_thread():
    """Small tensors run faster on one intra-op thread, and ~10× faster when other jobs load the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
