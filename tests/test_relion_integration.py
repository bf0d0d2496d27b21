"""RELION reads what cryopick pick writes: ``relion_preprocess --extract`` on our coordinate files.

Skipped unless ``relion_preprocess`` is on PATH (Debian/Ubuntu: ``apt-get install -y relion``, RELION 3.1.3).
The coordinate directory and suffix are derived from our ``coords_suffix_<suffix>.star`` exactly as
RELION 3.1's pipeline derives them from a suffix node (formats.md §1.3).
"""

from __future__ import annotations

import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import starfile
from test_pick import RECORD, blob_detector, blob_image, save_model

from cryopick.config import PickConfig
from cryopick.io.mrc import write_mrc
from cryopick.io.outputs import read_coordinate_star
from cryopick.io.relion import write_micrographs_star
from cryopick.pick import pick

pytestmark = [pytest.mark.usefixtures("single_torch_thread"),
              pytest.mark.skipif(shutil.which("relion_preprocess") is None,
                                 reason="relion_preprocess not on PATH (apt-get install relion)")]

BOX = 64
BLOBS = {
    "mic001": [(100.0, 90.0), (300.0, 200.0), (205.0, 410.0)],
    "mic002": [(60.0, 250.0), (380.0, 80.0), (470.0, 470.0)],  # the last one is 42 px from two edges
    "mic003": [],  # no picks: a 0-byte coordinate file, which RELION skips with a warning
}
NOISE = 0.1
AMPLITUDE = 6.0


def blob_centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(x, y) of the bright blob: intensity-weighted mean of pixels well above the noise."""
    weights = np.clip(image - np.median(image) - 5 * NOISE, 0, None)
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    return float((weights * cols).sum() / weights.sum()), float((weights * rows).sum() / weights.sum())


def test_relion_extracts_one_centred_particle_per_pick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RELION opens names relative to the project directory
    names = []
    for k, (stem, blobs) in enumerate(BLOBS.items()):
        name = f"MotionCorr/job002/Movies/{stem}.mrc"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_mrc(name, blob_image((512, 512), blobs, sigma=6.0, amplitude=AMPLITUDE, noise=NOISE, seed=k),
                  pixel_size=2.0)
        names.append(name)
    write_micrographs_star("micrographs.star", names, pixel_size=2.0)
    checkpoint = save_model(tmp_path / "blob.pt", blob_detector(), RECORD)

    summary = pick("micrographs.star", checkpoint, "External/job010", PickConfig(workers=0), quiet=True)
    assert summary.counts == {f"MotionCorr/job002/Movies/{s}.mrc": len(b) for s, b in BLOBS.items()}

    suffix_node = tmp_path / "External/job010/coords_suffix_cryopick.star"
    assert suffix_node.read_text().strip() == "micrographs.star"
    coord_dir = "External/job010/"
    coord_suffix = suffix_node.name[len("coords_suffix"):]  # RELION 3.1: "_cryopick.star"
    result = subprocess.run(
        ["relion_preprocess", "--i", suffix_node.read_text().strip(), "--coord_dir", coord_dir,
         "--coord_suffix", coord_suffix, "--part_star", "Extract/job011/particles.star",
         "--part_dir", "Extract/job011/", "--extract", "--extract_size", str(BOX)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    particles = starfile.read("Extract/job011/particles.star", parse_as_string=["rlnImageName", "rlnMicrographName"])
    table = particles["particles"]
    assert len(table) == summary.total_picks == 6
    for row in table.to_dict("records"):
        stem = row["rlnMicrographName"].split("/")[-1][: -len(".mrc")]
        ours = read_coordinate_star(f"External/job010/Movies/{stem}_cryopick.star")
        assert (row["rlnCoordinateX"], row["rlnCoordinateY"]) in set(zip(ours.x, ours.y))
        index, stack = row["rlnImageName"].split("@")
        with mrcfile.mmap(stack, mode="r") as mrc:
            image = np.asarray(mrc.data[int(index) - 1], dtype=np.float64)
        assert image.shape == (BOX, BOX)
        truth = np.asarray(BLOBS[stem])
        x, y = row["rlnCoordinateX"], row["rlnCoordinateY"]
        tx, ty = truth[np.argmin(np.hypot(truth[:, 0] - x, truth[:, 1] - y))]
        # the box's centre pixel BOX/2 is our pick, so the blob sits at BOX/2 + (truth − pick)
        com_x, com_y = blob_centre_of_mass(image)
        assert com_x == pytest.approx(BOX / 2 + tx - x, abs=0.5)
        assert com_y == pytest.approx(BOX / 2 + ty - y, abs=0.5)
        assert abs(tx - x) <= 8 and abs(ty - y) <= 8  # and the pick is on the blob
