"""cryoSPARC .cs particle locations: read as labels (matched to the original micrographs), written by pick."""

from __future__ import annotations

import numpy as np
import pytest
from test_pick import RECORD, blob_detector, blob_image, save_model

from cryopick.config import PickConfig
from cryopick.errors import InputFileError
from cryopick.io.coords import read_coordinates
from cryopick.io.cryosparc import read_cs_locations, write_cs
from cryopick.io.matching import match_coordinates
from cryopick.io.micrographs import find_micrographs
from cryopick.io.mrc import write_mrc
from cryopick.io.outputs import read_coordinate_star
from cryopick.pick import pick

UID = "012345678901234567"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def cs_array(rows):
    """A .cs as cryoSPARC's Manual Picker exports it: (path, (ny, nx), fx, fy) per particle."""
    width = max(len(r[0]) for r in rows)
    dtype = [("uid", "<u8"), ("location/micrograph_uid", "<u8"), ("location/exp_group_id", "<u4"),
             ("location/micrograph_path", f"S{width}"), ("location/micrograph_shape", "<u4", (2,)),
             ("location/center_x_frac", "<f4"), ("location/center_y_frac", "<f4"), ("location/min_dist_A", "<f4")]
    array = np.zeros(len(rows), dtype=dtype)
    for k, (path, shape, fx, fy) in enumerate(rows):
        array[k]["uid"] = 1000 + k
        array[k]["location/micrograph_path"] = path.encode()
        array[k]["location/micrograph_shape"] = shape
        array[k]["location/center_x_frac"] = fx
        array[k]["location/center_y_frac"] = fy
    return array


def test_cs_picks_are_labels_of_the_original_micrographs_on_non_square_images(tiny_project):
    root, _ = tiny_project  # micrographs mics/mic_{a,b,c}.mrc: 180 rows × 300 columns
    shape = (180, 300)
    rows = [
        (f"J1/imported/{UID}_mic_a.mrc", shape, 0.25, 0.5),  # x = 0.25·300, y = (1 − 0.5)·180 (lower-left origin)
        (f"J1/imported/{UID}_mic_a.mrc", shape, 0.1, 0.9),
        (f"J3/motioncorrected/{UID}_mic_b_patch_aligned_doseweighted.mrc", shape, 0.5, 0.2),
    ]
    np.save(root / "picks.npy", cs_array(rows))
    (root / "picks.npy").rename(root / "P1_J7_picked_particles.cs")
    tables = read_coordinates(root / "P1_J7_picked_particles.cs")
    micrographs = find_micrographs(str(root / "mics"))
    match = match_coordinates(micrographs, tables)
    assert match.unmatched == []
    by_name = {micrographs[i].path.stem: df for i, df in match.coords.items()}
    assert set(by_name) == {"mic_a", "mic_b"}
    np.testing.assert_allclose(by_name["mic_a"][["x", "y"]].to_numpy(), [[75.0, 90.0], [30.0, 18.0]], atol=1e-3)
    np.testing.assert_allclose(by_name["mic_b"][["x", "y"]].to_numpy(), [[150.0, 144.0]], atol=1e-3)
    ((_, unflipped), *_) = read_cs_locations(root / "P1_J7_picked_particles.cs", flip_y=False)
    np.testing.assert_allclose(unflipped["y"], [90.0, 162.0], atol=1e-3)  # Patch Motion picks on RELION micrographs
    assert by_name["mic_a"]["score"].isna().all()


def test_write_then_read_round_trip_in_original_pixels(tmp_path):
    shape = (3710, 5760)  # K3-like: far from square
    x, y = np.array([0.0, 17.0, 5759.0, 2880.0]), np.array([3709.0, 5.0, 0.0, 1855.0])
    score = np.array([0.9, 0.8, 0.7, 0.6])
    for flip in (False, True):
        path = tmp_path / f"roundtrip-{flip}.cs"
        write_cs(path, [("MotionCorr/job002/Movies/mic001.mrc", shape, x, y, score)], flip_y=flip)
        ((name, coords),) = read_cs_locations(path, flip_y=flip)
        assert name == "MotionCorr/job002/Movies/mic001.mrc"
        np.testing.assert_allclose(coords["x"], x, atol=2e-3)
        np.testing.assert_allclose(coords["y"], y, atol=2e-3)
        np.testing.assert_allclose(coords["score"], score, atol=1e-6)
    array = np.load(tmp_path / "roundtrip-True.cs")  # the default: cryoSPARC's lower-left origin
    assert array["location/micrograph_shape"].tolist()[0] == [3710, 5760]
    assert array["location/center_x_frac"][2] == pytest.approx(5759 / 5760)
    assert array["location/center_y_frac"][0] == pytest.approx(1 - 3709 / 3710, abs=1e-6)
    assert array["location/center_y_frac"][2] == pytest.approx(1.0)


def test_cs_without_locations_is_one_clear_error(tmp_path):
    np.save(tmp_path / "blobs.npy", np.zeros(3, dtype=[("uid", "<u8"), ("blob/path", "S8")]))
    (tmp_path / "blobs.npy").rename(tmp_path / "blobs.cs")
    with pytest.raises(InputFileError, match="missing location/micrograph_path"):
        read_coordinates(tmp_path / "blobs.cs")


def test_empty_text_and_archive_cs_files_are_one_clear_error(tmp_path):
    path = tmp_path / "empty.cs"
    write_cs(path, [("mic_a.mrc", (100, 100), np.zeros(0), np.zeros(0), np.zeros(0))])
    with pytest.raises(InputFileError, match=r"empty\.cs: holds no particles"):
        read_coordinates(path)
    (tmp_path / "text.cs").write_text("uid x y\n1 2 3\n")  # used to be reported as pickled objects
    np.savez(tmp_path / "archive.npz", a=np.zeros(3))
    (tmp_path / "archive.npz").rename(tmp_path / "archive.cs")  # used to fail with an AttributeError
    for name in ("text.cs", "archive.cs"):
        with pytest.raises(InputFileError, match=name + r": not a numpy \.cs file \(no \.npy header\)"):
            read_coordinates(tmp_path / name)


def test_pick_writes_a_cs_that_reads_back_as_its_picks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blobs = {"mic001": [(100.0, 90.0), (300.0, 200.0)], "mic002": [(60.0, 250.0)]}
    for k, (stem, centres) in enumerate(blobs.items()):
        write_mrc(f"mics/{stem}.mrc", blob_image((320, 400), centres, sigma=6.0, noise=0.1, seed=k), pixel_size=2.0)
    model = save_model(tmp_path / "blob.pt", blob_detector(), RECORD)
    pick("mics", model, "out", PickConfig(workers=0, write_cryosparc=True, write_particles=True), quiet=True)
    locations = dict(read_cs_locations("out/particles_cryopick.cs"))
    assert set(locations) == {"mics/mic001.mrc", "mics/mic002.mrc"}
    for stem in blobs:
        ours = read_coordinate_star(f"out/mics/{stem}_cryopick.star")
        got = locations[f"mics/{stem}.mrc"]
        np.testing.assert_allclose(got["x"], ours.x, atol=2e-3)
        np.testing.assert_allclose(got["y"], ours.y, atol=2e-3)
        assert len(got) == len(blobs[stem])
    assert "rlnMicrographName" in (tmp_path / "out/particles_cryopick.star").read_text()


def test_no_cs_flip_y_reaches_the_reader_from_extract_options(tiny_project):
    root, _ = tiny_project
    rows = [(f"J1/imported/{UID}_mic_a.mrc", (180, 300), 0.25, 0.1)]
    np.save(root / "picks.npy", cs_array(rows))
    (root / "picks.npy").rename(root / "picks.cs")
    from cryopick.config import ExtractConfig

    for flip, y in ((ExtractConfig().cs_flip_y, 162.0), (False, 18.0)):
        (table,) = read_coordinates(root / "picks.cs", cs_flip_y=flip)
        np.testing.assert_allclose(table.coords["y"], [y], atol=1e-3)
