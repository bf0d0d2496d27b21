"""Simulator: layout and files, determinism, truth/labels geometry, SNR, CTF physics and particle shapes."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryopick.errors import CryopickError
from cryopick.io.mrc import read_header, read_micrograph
from cryopick.simulate import (
    INT16_OFFSET,
    INT16_SCALE,
    PARTICLE_SHAPES,
    CTFParams,
    SimulationParams,
    build_particle_model,
    carbon_mask,
    choose_labeled_micrographs,
    ctf_filter,
    electron_wavelength,
    make_labels,
    project_particle,
    random_rotations,
    simulate,
    simulate_micrograph,
)

# 32 px particles on small non-square micrographs: every test stays well under a second per simulation.
TINY = SimulationParams(n_micrographs=2, shape=(256, 320), pixel_size=2.0, diameter=64.0, seed=3)
SIDE_VIEW = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # rotates the z axis onto y


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return out, simulate(out, TINY)


def _truth_xy(path: Path) -> np.ndarray:
    table = starfile.read(path)
    if isinstance(table, dict):  # 0-byte file: no particles
        return np.zeros((0, 2))
    return table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)


def _second_moment_ratio(image: np.ndarray) -> float:
    """Largest over smallest eigenvalue of the image's intensity-weighted covariance (1 = round)."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    w = image / image.sum()
    cy, cx = (w * yy).sum(), (w * xx).sum()
    cov = np.array([[(w * (yy - cy) ** 2).sum(), (w * (yy - cy) * (xx - cx)).sum()],
                    [(w * (yy - cy) * (xx - cx)).sum(), (w * (xx - cx) ** 2).sum()]])
    low, high = np.linalg.eigvalsh(cov)
    return float(high / low)


def _ring_means(image: np.ndarray, width: int = 4) -> np.ndarray:
    """Mean intensity in concentric rings of ``width`` px around the box centre."""
    box = image.shape[0]
    yy, xx = np.mgrid[:box, :box]
    r = np.hypot(yy - box // 2, xx - box // 2)
    return np.array([image[(r >= a) & (r < a + width)].mean() for a in range(0, box // 2 - width, width)])


# ---------------------------------------------------------------------------------------------- files

def test_layout_files_parse_and_agree_with_case_json(tiny_case):
    out, case = tiny_case
    assert json.loads((out / "case.json").read_text()) == case
    assert case["complete"] is True and case["seed"] == 3
    assert case["particle"]["diameter_A"] == 64.0 and case["particle"]["diameter_px"] == 32.0
    names = [m["name"] for m in case["micrographs"]]
    assert names == ["sim_mic000", "sim_mic001"]
    for record in case["micrographs"]:
        mrc = out / "micrographs" / f"{record['name']}.mrc"
        image = read_micrograph(mrc)
        assert image.shape == (256, 320)  # rows, columns: non-square kept
        assert read_header(mrc).pixel_size == pytest.approx(2.0)
        assert read_header(mrc).mode == 2  # float32
        assert abs(float(image.mean())) < 1e-3 and float(image.std()) == pytest.approx(1.0, rel=1e-3)
        truth = _truth_xy(out / "truth" / f"{record['name']}.star")
        assert len(truth) == record["n_particles"] > 5
        fom = starfile.read(out / "truth" / f"{record['name']}.star")["rlnAutopickFigureOfMerit"]
        assert (fom == 1.0).all()
    assert case["n_particles"] == sum(m["n_particles"] for m in case["micrographs"])


def test_micrographs_star_names_relative_paths_and_ctf(tiny_case):
    out, case = tiny_case
    blocks = starfile.read(out / "micrographs.star", parse_as_string=["rlnMicrographName"])
    optics, mics = blocks["optics"], blocks["micrographs"]
    assert optics["rlnMicrographPixelSize"].iloc[0] == pytest.approx(2.0)
    assert optics["rlnVoltage"].iloc[0] == pytest.approx(300.0)
    assert 0.07 <= optics["rlnAmplitudeContrast"].iloc[0] <= 0.10
    assert list(mics["rlnMicrographName"]) == ["micrographs/sim_mic000.mrc", "micrographs/sim_mic001.mrc"]
    assert all((out / name).is_file() for name in mics["rlnMicrographName"])
    for (_, row), record in zip(mics.iterrows(), case["micrographs"]):
        assert row["rlnDefocusU"] == pytest.approx(record["defocus_u_A"], abs=0.1)
        assert 8000 <= row["rlnDefocusV"] <= row["rlnDefocusU"] <= 30000


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path, tiny_case):
    out, case = tiny_case
    again = simulate(tmp_path / "again", TINY)
    other = simulate(tmp_path / "other", replace(TINY, seed=4))
    assert again == case
    for name in ("sim_mic000", "sim_mic001"):
        first = read_micrograph(out / "micrographs" / f"{name}.mrc")
        assert np.array_equal(first, read_micrograph(tmp_path / "again" / "micrographs" / f"{name}.mrc"))
        assert (out / "truth" / f"{name}.star").read_text() == \
            (tmp_path / "again" / "truth" / f"{name}.star").read_text()
        assert not np.allclose(first, read_micrograph(tmp_path / "other" / "micrographs" / f"{name}.mrc"))
    assert other["n_particles"] != case["n_particles"] or other["micrographs"][0]["defocus_u_A"] != \
        case["micrographs"][0]["defocus_u_A"]


def test_file_holds_exactly_the_simulated_components(tiny_case):
    out, _ = tiny_case
    mic = simulate_micrograph(TINY, 1)
    assert np.array_equal(read_micrograph(out / "micrographs" / "sim_mic001.mrc"), mic.image)
    parts = mic.particle_signal + mic.distractors + mic.noise + mic.background
    assert np.allclose(mic.image, parts, atol=1e-5)


@pytest.mark.parametrize("dtype, mode", [("float16", 12), ("int16", 1)])
def test_output_dtypes(tmp_path, dtype, mode):
    params = replace(TINY, n_micrographs=1, dtype=dtype)
    simulate(tmp_path, params)
    path = tmp_path / "micrographs" / "sim_mic000.mrc"
    assert read_header(path).mode == mode
    image = read_micrograph(path)
    reference = simulate_micrograph(params, 0).image
    if dtype == "int16":
        assert image.mean() == pytest.approx(INT16_OFFSET, abs=0.5)
        assert image.std() == pytest.approx(INT16_SCALE, rel=0.02)
        assert np.array_equal(image, np.round(INT16_OFFSET + INT16_SCALE * reference))
    else:
        assert np.allclose(image, reference, atol=1e-2)


def test_refuses_existing_simulation_unless_overwrite_and_removes_stale_files(tmp_path):
    simulate(tmp_path, replace(TINY, n_micrographs=3, labeled_micrograph_fraction=1.0))
    with pytest.raises(CryopickError, match="already holds a simulation"):
        simulate(tmp_path, TINY)
    case = simulate(tmp_path, replace(TINY, n_micrographs=1), overwrite=True)
    assert case["n_micrographs"] == 1
    assert sorted(p.name for p in (tmp_path / "micrographs").iterdir()) == ["sim_mic000.mrc"]
    assert sorted(p.name for p in (tmp_path / "truth").iterdir()) == ["sim_mic000.star"]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["sim_mic000.star"]


def test_refuses_directory_with_foreign_files_even_with_overwrite(tmp_path):
    (tmp_path / "micrographs").mkdir()
    (tmp_path / "micrographs" / "mine.mrc").write_bytes(b"user data")
    with pytest.raises(CryopickError, match="not a cryopick simulation"):
        simulate(tmp_path, TINY, overwrite=True)
    assert (tmp_path / "micrographs" / "mine.mrc").read_bytes() == b"user data"


def test_unrelated_files_in_out_dir_are_allowed(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    simulate(tmp_path, replace(TINY, n_micrographs=1))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("change, message", [
    ({"particle": "cube"}, "unknown particle shape"),
    ({"dtype": "uint8"}, "dtype"),
    ({"snr": 0.0}, "snr"),
    ({"prefix": "../x"}, "prefix"),
    ({"diameter": 1000.0}, "diameter"),
    ({"label_fraction": 1.5}, "label_fraction"),
    ({"shape": (64,)}, "shape"),
])
def test_invalid_parameters_are_refused_before_writing(tmp_path, change, message):
    with pytest.raises(CryopickError, match=message):
        simulate(tmp_path / "out", replace(TINY, **change))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- geometry

def test_truth_centres_inside_and_min_distance_respected(tiny_case):
    out, case = tiny_case
    min_distance = case["min_distance_px"]
    assert 0.8 * 32 <= min_distance <= 32
    for record in case["micrographs"]:
        xy = _truth_xy(out / "truth" / f"{record['name']}.star")
        assert (xy[:, 0] >= 0).all() and (xy[:, 0] <= 319).all()
        assert (xy[:, 1] >= 0).all() and (xy[:, 1] <= 255).all()
        gaps = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(gaps, np.inf)
        assert gaps.min() >= min_distance - 1e-4


def test_some_particles_cut_by_the_edge_and_outside_ones_not_in_truth():
    mics = [simulate_micrograph(TINY, i) for i in range(2)]
    assert sum((~m.inside).sum() for m in mics) > 0  # centres just outside are rendered but not listed
    for m in mics:
        outside = m.centres[~m.inside]
        assert ((outside[:, 0] < 0) | (outside[:, 0] > 319) | (outside[:, 1] < 0) | (outside[:, 1] > 255)).all()
        assert (outside[:, 0] > -0.35 * 32 - 1e-9).all() and (outside[:, 1] < 255 + 0.35 * 32 + 1e-9).all()


def test_junk_is_not_truth_and_keeps_off_particles():
    params = replace(TINY, junk_per_micrograph=8.0)
    mic = simulate_micrograph(params, 0)
    assert len(mic.junk) > 0
    for x, y, radius in mic.junk:
        gaps = np.hypot(mic.centres[:, 0] - x, mic.centres[:, 1] - y)
        assert gaps.min() >= 0.8 * (16 + radius) - 1e-9


def test_particles_count_parameter_is_honoured():
    mic = simulate_micrograph(replace(TINY, particles_per_micrograph=12, contamination=False,
                                      carbon_probability=0.0), 0)
    assert mic.facts["n_particles"] == pytest.approx(12, abs=4)  # the target density, counted inside


# ---------------------------------------------------------------------------------------------- labels

def test_labels_are_near_truth_and_only_on_labeled_micrographs(tiny_case):
    out, case = tiny_case
    labeled = case["labelled_micrographs"]  # case.json keys keep the spelling of existing data sets
    assert len(labeled) == 1  # round(0.5 * 2)
    assert sorted(p.stem for p in (out / "labels").iterdir()) == labeled
    assert case["n_labels"] == round(0.15 * case["n_particles"])
    total = 0
    for stem in labeled:
        labels = _truth_xy(out / "labels" / f"{stem}.star")
        truth = _truth_xy(out / "truth" / f"{stem}.star")
        gaps = np.hypot(labels[:, None, 0] - truth[None, :, 0], labels[:, None, 1] - truth[None, :, 1])
        assert (gaps.min(axis=1) <= 3.0).all()
        assert len(set(gaps.argmin(axis=1))) == len(labels)  # no particle labeled twice
        total += len(labels)
    assert total == case["n_labels"]
    assert [m["labelled"] for m in case["micrographs"]] == [m["name"] in labeled for m in case["micrographs"]]


def test_at_least_one_labeled_micrograph():
    assert len(choose_labeled_micrographs(replace(TINY, n_micrographs=5, labeled_micrograph_fraction=0.0))) == 1
    assert len(choose_labeled_micrographs(replace(TINY, n_micrographs=10, labeled_micrograph_fraction=0.5))) == 5


def test_labels_prefer_isolated_particles():
    # Six particles on one micrograph; only those at x = 100 and 300 are isolated, away from junk and edges.
    params = replace(TINY, n_micrographs=1, label_fraction=2 / 6, diameter=40.0)  # 20 px, 2 labels
    truth = np.array([[100.0, 100.0], [300.0, 100.0], [200.0, 100.0], [210.0, 110.0], [5.0, 50.0], [150.0, 200.0]])
    distances = {
        "neighbour": np.array([90.0, 90.0, 14.0, 14.0, 60.0, 60.0]),
        "junk": np.array([np.inf, np.inf, np.inf, np.inf, np.inf, 2.0]),
        "obstacle": np.full(6, 1e9),
        "edge": np.array([100.0, 99.0, 100.0, 100.0, 5.0, 55.0]),
    }
    labels = make_labels(params, {0: (truth, distances)})[0]
    gaps = np.hypot(labels[:, None, 0] - truth[None, :, 0], labels[:, None, 1] - truth[None, :, 1])
    assert sorted(gaps.argmin(axis=1)) == [0, 1]
    assert gaps.min(axis=1).max() <= 2.5 * 0.02 * 20 + 1e-9  # error truncated at 2.5 sigma


# ---------------------------------------------------------------------------------------------- signal

def test_recorded_snr_matches_request(tiny_case):
    _, case = tiny_case
    for record in case["micrographs"]:
        assert record["snr_measured"] == pytest.approx(0.05, rel=0.3)


@pytest.mark.parametrize("snr", [0.05, 0.5])
def test_snr_measured_independently_over_particle_discs(snr):
    params = replace(TINY, snr=snr)
    for index in range(2):
        mic = simulate_micrograph(params, index)
        yy, xx = np.mgrid[:256, :320]
        discs = np.zeros((256, 320), bool)
        for x, y in mic.centres:
            discs |= (xx - x) ** 2 + (yy - y) ** 2 <= 16.0 ** 2
        measured = mic.particle_signal[discs].var() / mic.noise.var()
        assert measured == pytest.approx(snr, rel=0.3)
        assert abs(mic.noise.mean()) < 0.05


def test_particles_are_dark_and_distractors_absent_when_disabled():
    params = replace(TINY, contamination=False, junk_per_micrograph=0.0, carbon_probability=0.0)
    mic = simulate_micrograph(params, 0)
    assert not mic.distractors.any()
    yy, xx = np.mgrid[:256, :320]
    nearest = np.full((256, 320), np.inf)
    for x, y in mic.centres:
        nearest = np.minimum(nearest, np.hypot(xx - x, yy - y))
    inside_discs = mic.particle_signal[nearest <= 16].mean()
    far_away = mic.particle_signal[nearest > 40].mean()
    assert inside_discs < far_away - 0.05  # dense protein is dark at underfocus


def test_carbon_and_contamination_are_drawn_when_asked():
    params = replace(TINY, shape=(512, 512), carbon_probability=1.0, junk_per_micrograph=0.0)
    mic = simulate_micrograph(params, 0)
    assert mic.facts["carbon"] and 0.05 < mic.facts["carbon_area_fraction"] < 0.45
    mask = carbon_mask(params, 0)  # the same film, without rendering the micrograph
    assert mask.shape == (512, 512) and mask.mean() == pytest.approx(mic.facts["carbon_area_fraction"], abs=1e-4)
    assert carbon_mask(replace(params, carbon_probability=0.0), 0) is None
    assert mic.distractors.std() > 0.1
    assert mic.distractors.min() < -3 * mic.noise.std() * 0.4  # darker than the noise: amplitude loss


# ---------------------------------------------------------------------------------------------- optics

def test_electron_wavelength_at_300_kv():
    # lambda = h / sqrt(2 m e V (1 + e V / 2 m c^2)) = 0.019687 Å at 300 kV
    assert electron_wavelength(300.0) == pytest.approx(0.019687, abs=2e-6)


def test_ctf_is_minus_amplitude_contrast_at_origin_and_first_zero_where_expected():
    ctf = CTFParams(defocus_u=20000.0, defocus_v=20000.0, defocus_angle=0.0, amplitude_contrast=0.0,
                    b_factor=0.0, cs=0.0)
    h = ctf_filter((8, 4096), 1.0, ctf)[0]  # ky = 0 row, kx = i / 4096 Å^-1
    # Without Cs and amplitude contrast the first zero is at chi = pi: k = 1 / sqrt(lambda df) = 0.05040
    k_zero = 1 / math.sqrt(electron_wavelength(300.0) * 20000.0)
    first_sign_change = int(np.argmax(h[1:] >= 0)) + 1
    assert (first_sign_change - 1) / 4096 < k_zero <= first_sign_change / 4096
    with_a = replace(ctf, amplitude_contrast=0.1)
    assert ctf_filter((8, 8), 2.0, with_a)[0, 0] == pytest.approx(-0.1, abs=1e-6)


def test_astigmatism_gives_different_zeros_along_u_and_v():
    ctf = CTFParams(defocus_u=24000.0, defocus_v=16000.0, defocus_angle=0.0, amplitude_contrast=0.0,
                    b_factor=0.0, cs=0.0)
    h = ctf_filter((2048, 2048), 1.0, ctf)
    along_x = h[0, :]  # angle 0: defocus U
    along_y = h[:1024, 0]  # angle 90: defocus V
    first_x = int(np.argmax(along_x[1:] >= 0)) + 1
    first_y = int(np.argmax(along_y[1:] >= 0)) + 1
    lam = electron_wavelength(300.0)
    assert first_x / 2048 == pytest.approx(1 / math.sqrt(lam * 24000.0), abs=1 / 2048)  # 0.0460 Å^-1
    assert first_y / 2048 == pytest.approx(1 / math.sqrt(lam * 16000.0), abs=1 / 2048)  # 0.0563 Å^-1


# ---------------------------------------------------------------------------------------------- shapes

def test_random_rotations_are_proper_and_uniform():
    rotations = random_rotations(4000, np.random.default_rng(0))
    eye = np.einsum("nij,nkj->nik", rotations, rotations)
    assert np.allclose(eye, np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(rotations), 1.0)
    assert np.abs(rotations.mean(axis=0)).max() < 0.05  # Haar measure: every entry averages zero


@pytest.mark.parametrize("shape", PARTICLE_SHAPES)
def test_every_shape_is_a_3d_model_within_the_diameter(shape):
    model = build_particle_model(shape, 160.0, np.random.default_rng(0))
    radii = np.linalg.norm(model.atoms, axis=1)
    assert radii.max() == pytest.approx(80.0)
    assert np.ptp(model.atoms[:, 2]) > 40.0  # genuinely 3-D, not a flat disc
    image = project_particle(model, np.eye(3), 2.0, 96)
    assert image.sum() == pytest.approx(len(model.atoms), rel=1e-3)  # every atom lands in the box
    assert image.std() > 0


def test_rod_projection_depends_on_orientation():
    model = build_particle_model("rod", 160.0, np.random.default_rng(0))
    end_on = project_particle(model, np.eye(3), 2.0, 96)
    side_on = project_particle(model, SIDE_VIEW, 2.0, 96)
    assert np.corrcoef(end_on.ravel(), side_on.ravel())[0, 1] < 0.8
    assert _second_moment_ratio(end_on) < 1.3
    assert _second_moment_ratio(side_on) > 5.0  # 3:1 aspect: variance ratio ~9


def test_ring_face_on_has_a_hole_and_side_on_is_a_bar():
    model = build_particle_model("ring", 160.0, np.random.default_rng(0))
    face_on = _ring_means(project_particle(model, np.eye(3), 2.0, 96))
    assert face_on[0] < 0.1 * face_on.max()
    assert _second_moment_ratio(project_particle(model, SIDE_VIEW, 2.0, 96)) > 5.0


def test_shell_is_hollow_and_round():
    model = build_particle_model("shell", 160.0, np.random.default_rng(0))
    image = project_particle(model, random_rotations(1, np.random.default_rng(1))[0], 2.0, 96)
    rings = _ring_means(image)
    assert rings[0] < 0.65 * rings.max() and rings.argmax() >= 6  # hollow: brightest near the 40 px rim
    assert _second_moment_ratio(image) < 1.1


def test_blob_is_irregular():
    model = build_particle_model("blob", 160.0, np.random.default_rng(0))
    views = [project_particle(model, r, 2.0, 96) for r in random_rotations(4, np.random.default_rng(2))]
    assert max(_second_moment_ratio(v) for v in views) > 1.1
    assert np.corrcoef(views[0].ravel(), views[1].ravel())[0, 1] < 0.99


def test_shapes_differ_from_each_other():
    views = {s: project_particle(build_particle_model(s, 160.0, np.random.default_rng(0)), SIDE_VIEW, 2.0, 96)
             for s in PARTICLE_SHAPES}
    for a in PARTICLE_SHAPES:
        for b in PARTICLE_SHAPES:
            if a < b:
                assert np.corrcoef(views[a].ravel(), views[b].ravel())[0, 1] < 0.9, (a, b)
