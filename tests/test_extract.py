import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEV_SHELL

from cryopick.config import ExtractConfig
from cryopick.dataset import reflect_pad
from cryopick.errors import CryopickError
from cryopick.extract import extract, outside_lines, split_micrographs
from cryopick.io.mrc import read_micrograph, write_mrc
from cryopick.io.relion import write_coordinate_star
from cryopick.preprocessing import preprocess


def _config(**kw):
    base = dict(diameter=128.0, bin=2, unlabeled_per_micrograph=20, val_fraction=0.0, chunk_size=16, seed=3)
    base.update(kw)
    return ExtractConfig(**base)


def _load_all(out):
    manifest = json.loads((out / "manifest.json").read_text())
    chunks = [torch.load(out / c["file"], weights_only=True) for c in manifest["chunks"]]
    return manifest, chunks


def test_extract_writes_chunks_manifest_and_exact_patches(tiny_project):
    root, coords = tiny_project
    out = root / "ds"
    summary = extract(str(root / "mics"), str(root / "labels"), out, _config(), quiet=True)
    manifest, chunks = _load_all(out)
    assert summary.n_positive["train"] == 5 and summary.n_unlabeled["train"] == 60
    assert manifest["counts"]["train"] == {"positive": 5, "unlabeled": 60, "micrographs": 3}
    assert manifest["preprocess"]["bin_factor"] == 2.0 and manifest["patch_size"] == 128
    assert sum(c["n_positive"] + c["n_unlabeled"] for c in manifest["chunks"]) == 65
    assert all(c["n_positive"] + c["n_unlabeled"] <= 16 for c in manifest["chunks"])
    assert (out / "extract_config.yaml").exists()

    # every positive patch equals the preprocessed micrograph crop around its label (float16 precision)
    names = manifest["micrographs"]
    checked = 0
    for chunk in chunks:
        meta = chunk["metadata"]["positive"]
        for k, patch in enumerate(chunk["patches"]["positive"]):
            mic = names[int(meta["micrograph"][k])]
            image, (sy, sx) = preprocess(read_micrograph(mic["path"]), 2.0)
            padded = reflect_pad(image, 64).numpy()
            x, y = float(meta["x"][k]), float(meta["y"][k])
            cx, cy = int(round(x / sx)), int(round(y / sy))
            expected = padded[cy:cy + 128, cx:cx + 128]
            np.testing.assert_allclose(patch.float().numpy(), expected, atol=2e-3 * np.abs(expected).max())
            assert patch.dtype == torch.float16
            checked += 1
    assert checked == 5
    xs = sorted(float(v) for c in chunks for v in c["metadata"]["positive"]["x"])
    assert xs == sorted([40.0, 150.0, 250.0, 100.0, 10.0])
    assert summary.n_padded > 0  # label at x=10 reaches past the edge


def test_unlabeled_centres_cover_the_micrograph_uniformly(tiny_project):
    root, _ = tiny_project
    out = root / "ds"
    extract(str(root / "mics"), str(root / "labels"), out, _config(unlabeled_per_micrograph=400), quiet=True)
    _, chunks = _load_all(out)
    x = np.concatenate([c["metadata"]["unlabeled"]["x"].numpy() for c in chunks])
    y = np.concatenate([c["metadata"]["unlabeled"]["y"].numpy() for c in chunks])
    assert len(x) == 1200
    assert 0 <= x.min() < 30 and 270 < x.max() < 300 and 0 <= y.min() < 20 and 160 < y.max() < 180
    assert abs(np.mean(x < 150) - 0.5) < 0.05


def test_split_is_by_micrograph_deterministic_and_stratified():
    labeled = np.array([True, True, True, False, False, False, False, False, False, False])
    a = split_micrographs(10, labeled, 0.2, seed=1)
    assert list(a) == list(split_micrographs(10, labeled, 0.2, seed=1))
    assert (a[labeled] == "val").sum() == 1 and (a[~labeled] == "val").sum() == 1
    assert (split_micrographs(10, labeled, 0.0, 1) == "train").all()


def test_val_split_keeps_every_patch_of_a_micrograph_together(tiny_project):
    root, _ = tiny_project
    out = root / "ds"
    extract(str(root / "mics"), str(root / "labels"), out, _config(val_fraction=0.5), quiet=True)
    manifest, chunks = _load_all(out)
    split_of = {i: m["split"] for i, m in enumerate(manifest["micrographs"])}
    assert set(split_of.values()) == {"train", "val"}
    for entry, chunk in zip(manifest["chunks"], chunks):
        for kind in ("positive", "unlabeled"):
            mics = chunk["metadata"][kind]["micrograph"].tolist()
            assert all(split_of[m] == entry["split"] for m in mics)


def test_workers_give_identical_datasets(tiny_project):
    root, _ = tiny_project
    extract(str(root / "mics"), str(root / "labels"), root / "one", _config(workers=1), quiet=True)
    extract(str(root / "mics"), str(root / "labels"), root / "two", _config(workers=2), quiet=True)
    (_, a), (_, b) = _load_all(root / "one"), _load_all(root / "two")
    for ca, cb in zip(a, b):
        assert torch.equal(ca["patches"]["unlabeled"], cb["patches"]["unlabeled"])
        assert torch.equal(ca["patches"]["positive"], cb["patches"]["positive"])


@pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")  # mrcfile, writing the bad file
def test_corrupt_micrograph_is_skipped_and_listed(tiny_project):
    root, _ = tiny_project
    (root / "mics" / "mic_d.mrc").write_bytes(b"\0" * 2000)
    image = np.ones((180, 300), np.float32)
    image[5, 5] = np.nan
    write_mrc(root / "mics" / "mic_e.mrc", image, 2.0)
    summary = extract(str(root / "mics"), str(root / "labels"), root / "ds", _config(), quiet=True)
    skipped = dict(summary.skipped)
    assert any("mic_d.mrc" in p for p in skipped) and any("NaN" in r for r in skipped.values())
    manifest = json.loads((root / "ds" / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 2
    with pytest.raises(CryopickError, match="mic_"):
        extract(str(root / "mics"), str(root / "labels"), root / "ds2", _config(strict=True), quiet=True)


def test_a_micrograph_missing_from_the_star_is_skipped_and_listed(tiny_project):
    from cryopick.io.relion import write_micrographs_star

    root, _ = tiny_project
    names = ["mics/mic_a.mrc", "mics/mic_b.mrc", "mics/mic_c.mrc", "mics/deleted.mrc"]
    write_micrographs_star(root / "mics.star", names, 2.0)
    (root / "labels" / "deleted_manualpick.star").write_text((root / "labels" / "mic_b_manualpick.star").read_text())
    summary = extract(str(root / "mics.star"), str(root / "labels"), root / "ds", _config(), quiet=True)
    assert [(Path(p).name, r) for p, r in summary.skipped] == [("deleted.mrc", "file not found")]
    assert summary.unmatched == []  # its labels belong to the skipped micrograph, not to none
    manifest = json.loads((root / "ds" / "manifest.json").read_text())
    assert sorted(Path(m["path"]).name for m in manifest["micrographs"]) == ["mic_a.mrc", "mic_b.mrc", "mic_c.mrc"]


def test_coordinates_outside_are_counted_not_fatal(tiny_project):
    root, _ = tiny_project
    write_coordinate_star(root / "labels" / "mic_c_manualpick.star", [50.0, 900.0], [50.0, 50.0], [0, 0])
    summary = extract(str(root / "mics"), str(root / "labels"), root / "ds", _config(), quiet=True)
    assert summary.n_outside == 1 and summary.n_positive["train"] == 6
    assert [(Path(p).name, n_out, n) for p, n_out, n, _ in summary.outside] == [("mic_c.mrc", 1, 2)]
    assert outside_lines(summary.outside) == [f"{root / 'mics' / 'mic_c.mrc'}: 1 of 2 labels lie beyond its "
                                              "300×180 px"]
    manifest = json.loads((root / "ds" / "manifest.json").read_text())
    assert manifest["outside"] == [{"path": str(root / "mics" / "mic_c.mrc"), "n_outside": 1, "n_labels": 2}]


def test_outside_lines_suggest_the_scale_when_most_labels_fall_off_and_cap_the_list():
    many = [(f"m{i}.mrc", 3, 4, (100, 200)) for i in range(12)]
    lines = outside_lines(many, shown=2)
    assert lines == ["m0.mrc: 3 of 4 labels lie beyond its 200×100 px (coordinates in other pixels? see "
                     "--coord-scale)", "m1.mrc: 3 of 4 labels lie beyond its 200×100 px (coordinates in other "
                     "pixels? see --coord-scale)", "… and 10 more micrographs (30 labels)"]


def test_unmatched_coordinate_files_are_reported(tiny_project):
    root, _ = tiny_project
    write_coordinate_star(root / "labels" / "other_mic_manualpick.star", [50.0], [50.0], [0])
    summary = extract(str(root / "mics"), str(root / "labels"), root / "ds", _config(), quiet=True)
    assert any("other_mic" in u for u in summary.unmatched)


@pytest.mark.parametrize("problem", ["no_mics", "no_columns", "no_labels", "pixel_sizes", "existing"])
def test_fatal_inputs_fail_clearly_and_leave_nothing(tiny_project, problem):
    root, _ = tiny_project
    out = root / "ds"
    mics, labels, match = str(root / "mics"), str(root / "labels"), None
    if problem == "no_mics":
        mics, match = str(root / "nothing_here"), "nothing_here"
    elif problem == "no_columns":
        (root / "labels" / "mic_a_manualpick.star").write_text("data_\n\nloop_\n_rlnFoo #1\n1.0\n")
        labels, match = str(root / "labels" / "mic_a_manualpick.star"), "mic_a_manualpick.star"
    elif problem == "no_labels":
        shutil.rmtree(root / "labels")
        (root / "labels").mkdir()
        (root / "labels" / "mic_a.star").write_text("")
        match = r"the coordinate files hold no coordinates \(1 empty table"  # not "matched no micrograph"
    elif problem == "pixel_sizes":
        write_mrc(root / "mics" / "mic_c.mrc", np.zeros((180, 300), np.float32), pixel_size=1.0)
        match = "different pixel sizes"
    elif problem == "existing":
        extract(mics, labels, out, _config(), quiet=True)
        match = "--overwrite"
    before = sorted(p.name for p in out.glob("*")) if out.exists() else []
    with pytest.raises(CryopickError, match=match):
        extract(mics, labels, out, _config(), quiet=True)
    after = sorted(p.name for p in out.glob("*")) if out.exists() else []
    assert after == before  # nothing new, nothing half-written
    assert not list(out.glob(".*.tmp")) if out.exists() else True


def test_pixel_size_override_allows_mixed_headers(tiny_project):
    root, _ = tiny_project
    write_mrc(root / "mics" / "mic_c.mrc", np.zeros((180, 300), np.float32), pixel_size=1.0)
    s = extract(str(root / "mics"), str(root / "labels"), root / "ds", _config(pixel_size=2.0), quiet=True)
    assert s.record.pixel_size == 2.0


def test_extract_with_truth_records_distances(tiny_project):
    root, coords = tiny_project
    extract(str(root / "mics"), str(root / "labels"), root / "ds", _config(unlabeled_per_micrograph=50),
            truth=str(root / "labels"), quiet=True)
    manifest, chunks = _load_all(root / "ds")
    assert manifest["has_truth"]
    names = [m["name"] for m in manifest["micrographs"]]
    n_checked = 0
    for chunk in chunks:
        meta = chunk["metadata"]["unlabeled"]
        for mic, x, y, d in zip(meta["micrograph"], meta["x"], meta["y"], meta["truth_distance"]):
            stem = names[int(mic)].rsplit("/", 1)[-1].removesuffix(".mrc")
            if stem not in coords:
                assert torch.isinf(d)  # mic_c has no particles at all
                continue
            expected = np.hypot(coords[stem][:, 0] - float(x), coords[stem][:, 1] - float(y)).min()
            assert float(d) == pytest.approx(expected, rel=1e-5)
            n_checked += 1
    assert n_checked == 100


@pytest.mark.skipif(not DEV_SHELL.exists(), reason="../shared/data/dev-shell not present")
def test_extract_on_the_independent_dev_set(tmp_path):
    cfg = ExtractConfig(diameter=120.0, unlabeled_per_micrograph=30, val_fraction=0.5, seed=0)
    summary = extract(str(DEV_SHELL / "micrographs_ctf.star"), str(DEV_SHELL / "labels"), tmp_path / "ds", cfg,
                      truth=str(DEV_SHELL / "truth"), quiet=True)
    assert summary.record.pixel_size == pytest.approx(1.7) and summary.record.bin_factor == 1.0
    assert summary.n_positive["train"] + summary.n_positive["val"] == 82  # case.json n_labels
    assert summary.n_positive["train"] > 0 and summary.n_positive["val"] > 0
    assert summary.n_unlabeled["train"] + summary.n_unlabeled["val"] == 120
    assert not summary.skipped and not summary.unmatched


def test_labeled_only_extracts_just_the_labeled_micrographs(tiny_project):
    root, coords = tiny_project  # mic_c has an empty label file
    summary = extract(str(root / "mics"), str(root / "labels"), root / "ds", _config(labeled_only=True), quiet=True)
    manifest = json.loads((root / "ds" / "manifest.json").read_text())
    assert sorted(Path(m["path"]).name for m in manifest["micrographs"]) == ["mic_a.mrc", "mic_b.mrc"]
    assert summary.n_used == 2 and summary.n_micrographs == 3
    assert summary.n_positive["train"] + summary.n_positive["val"] == sum(len(v) for v in coords.values())
