"""The dataset format: one edge padding for extract and pick, the writer's layout, and loading it back."""

import json

import numpy as np
import pytest
import torch

from cryopick.dataset import (
    DATASET_FORMAT,
    LABELED_MICROGRAPHS,
    DatasetWriter,
    crop_patches,
    fits_edge_padding,
    is_dataset_file,
    load_dataset,
    load_labeled_micrographs,
    reflect_pad,
    to_binned_pixels,
)
from cryopick.errors import CryopickError
from cryopick.preprocessing import PreprocessRecord, micrograph_pixel_size

RECORD = PreprocessRecord(pixel_size=1.5, bin_factor=2.0, diameter_A=150.0)


def test_reflect_pad_is_numpy_reflect_for_one_image_and_a_batch():
    image = torch.arange(20.0).reshape(4, 5)
    np.testing.assert_array_equal(reflect_pad(image, 3).numpy(), np.pad(image.numpy(), 3, mode="reflect"))
    assert reflect_pad(image, 3)[0, 0] == image[3, 3]  # no edge repeat
    batch = torch.stack([image, -image])[:, None]
    padded = reflect_pad(batch, 2)
    assert padded.shape == (2, 1, 8, 9)
    np.testing.assert_array_equal(padded[1, 0].numpy(), np.pad(-image.numpy(), 2, mode="reflect"))
    for pad in (4, 9, 17):  # beyond the image: reflected again, as numpy does (pick's context for ResNet-18)
        np.testing.assert_array_equal(reflect_pad(batch, pad)[1, 0].numpy(), np.pad(-image.numpy(), pad, mode="reflect"))
    with pytest.raises(CryopickError, match="too small"):
        reflect_pad(image[:1], 2)


def test_edge_padding_needs_more_than_half_a_patch():
    assert fits_edge_padding((65, 100), 128) and not fits_edge_padding((64, 100), 128)
    assert not fits_edge_padding((1, 1, 100, 64), 128)


def test_patches_are_centred_on_binned_pixels():
    image = torch.arange(100.0).reshape(10, 10)
    padded = reflect_pad(image, 2).numpy()
    centres = to_binned_pixels(np.array([[6.0, 3.9], [0.0, 0.0]]), (2.0, 3.0))  # (sy, sx)
    assert centres.tolist() == [[2, 2], [0, 0]]
    patches = crop_patches(padded, centres, 4)
    np.testing.assert_array_equal(patches[0], image[0:4, 0:4].numpy())  # window [c-2, c+2) about pixel 2
    assert patches[1][2, 2] == image[0, 0] and patches[1][0, 0] == image[2, 2]


def test_pixel_size_given_then_star_then_header():
    assert micrograph_pixel_size(1.1, 2.2, 3.3) == 1.1
    assert micrograph_pixel_size(None, 2.2, 3.3) == 2.2
    assert micrograph_pixel_size(None, None, 3.3) == 3.3
    assert micrograph_pixel_size(0.0, -1.0, None) is None


def _write(tmp_path, chunk_size=3):
    writer = DatasetWriter(tmp_path, 4, chunk_size, ["a", "b"])
    patches = np.arange(5 * 16, dtype=np.float16).reshape(5, 4, 4)
    xy = np.arange(10, dtype=np.float32).reshape(5, 2)
    writer.add("train", "positive", patches[:2], 0, xy[:2])
    writer.add("val", "positive", patches[2:3], 1, xy[2:3])
    writer.add("train", "unlabeled", patches[3:], 0, xy[3:], np.array([1.0, 2.0], np.float32))
    writer.add("val", "unlabeled", patches[:1], 1, xy[:1])
    writer.add_labeled_micrograph("a", "train", np.ones((8, 8), np.float16), (2.0, 2.0), (16, 16), xy[:2])
    mics = [{"name": "a", "split": "train", "binned_shape": [8, 8], "error": None},
            {"name": "b", "split": "val", "binned_shape": [8, 10], "error": None}]
    writer.finish(RECORD, True, mics, {"inputs": {"micrographs": "mics/"}})
    return patches


def test_written_dataset_loads_back_by_split(tmp_path):
    patches = _write(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format_version"] == DATASET_FORMAT and manifest["inputs"] == {"micrographs": "mics/"}
    assert manifest["counts"]["train"] == {"positive": 2, "unlabeled": 2, "micrographs": 1}
    # one numbering across splits: train fills its 3-patch chunk first, the rest is flushed at the end
    assert [(c["file"], c["split"], c["n_positive"], c["n_unlabeled"]) for c in manifest["chunks"]] == [
        ("chunk_00000.pt", "train", 2, 1), ("chunk_00001.pt", "train", 0, 1), ("chunk_00002.pt", "val", 1, 1)]
    assert all(is_dataset_file(p.name) for p in tmp_path.iterdir())
    ds = load_dataset(tmp_path)
    assert torch.equal(ds.train.positive, torch.from_numpy(patches[:2]))
    assert torch.equal(ds.val.unlabeled, torch.from_numpy(patches[:1]))
    assert ds.train.unlabeled_truth_distance.tolist() == [1.0, 2.0]
    assert torch.isnan(ds.val.unlabeled_truth_distance).all()
    assert ds.train.positive_micrograph.tolist() == [0, 0] and ds.val.unlabeled_micrograph.tolist() == [1]
    assert ds.record == RECORD and ds.has_truth and ds.mean_binned_area == 72.0
    (mic,) = load_labeled_micrographs(tmp_path)
    assert mic["name"] == "a" and mic["labels"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert mic["scales"].dtype == torch.float64 and mic["shape"].tolist() == [16, 16]


def test_other_format_versions_and_missing_chunks_are_named(tmp_path):
    _write(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(CryopickError, match="format 1 is not supported.*older datasets"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "chunk_00001.pt").unlink()
    with pytest.raises(CryopickError, match="chunk_00001.pt: chunk listed in the manifest is missing"):
        load_dataset(tmp_path)
    (tmp_path / LABELED_MICROGRAPHS).unlink()
    assert load_labeled_micrographs(tmp_path) == []


def test_single_preprocessed_data_file_is_split_by_micrograph(tmp_path):
    rng = np.random.default_rng(0)
    pos_mic = torch.tensor([0, 1, 4, 4, 9])
    unl_mic = torch.arange(20) % 10
    data = {
        "patches": {"positive": torch.tensor(rng.normal(size=(5, 128, 128)), dtype=torch.float16),
                    "unlabeled": torch.tensor(rng.normal(size=(20, 128, 128)), dtype=torch.float16)},
        "metadata": {"preprocess": RECORD.to_dict(),
                     "positive": {"micrograph": pos_mic}, "unlabeled": {"micrograph": unl_mic}},
    }
    torch.save(data, tmp_path / "preprocessed_data.pt")
    ds = load_dataset(tmp_path / "preprocessed_data.pt")
    # micrographs 4 and 9 (index mod 5 == 4) are held out
    assert len(ds.val.positive) == 3 and len(ds.train.positive) == 2
    assert len(ds.val.unlabeled) == 4 and len(ds.train.unlabeled) == 16
    assert ds.record == RECORD
    assert torch.equal(ds.val.positive[0], data["patches"]["positive"][2])


def test_interrupted_extraction_is_named(tmp_path):
    (tmp_path / "chunk_00000.pt").write_bytes(b"")
    with pytest.raises(CryopickError, match="interrupted"):
        load_dataset(tmp_path)


