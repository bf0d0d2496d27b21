"""Matching coordinate tables to micrographs by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_io import DEV_SET, needs_dev_set, write_text, write_tiny_mrc

from cryopick.io.coords import CoordinateTable, read_coordinate_file, read_coordinates
from cryopick.io.matching import MatchResult, coordinate_key, match_coordinates, match_name
from cryopick.io.micrographs import MicrographEntry, find_micrographs

MICS = [
    "MotionCorr/job002/Movies/mic_1.mrc",
    "MotionCorr/job002/Movies/mic_10.mrc",
    "MotionCorr/job002/Movies/mic_2_DW.mrc",
    "MotionCorr/job002/Movies/FoilHole_1_Data_2.mrc",
]


def _entries(names):
    return [MicrographEntry(path=Path(n), name=n, pixel_size=None) for n in names]


def _table(source, xs, micrograph=None, scores=None):
    coords = pd.DataFrame({"x": np.asarray(xs, dtype=np.float64), "y": np.zeros(len(xs)),
                           "score": np.asarray(scores if scores is not None else [np.nan] * len(xs), dtype=np.float64)})
    return CoordinateTable(source=Path(source), micrograph=micrograph, coords=coords)


@pytest.mark.parametrize("name, key", [
    ("AutoPick/job006/Movies/mic_1_autopick.star", "mic_1_autopick"),
    ("/data/Movies/mic_1.mrc", "mic_1"),
    ("mic_1", "mic_1"),
    ("C:\\picks\\mic_1.box", "mic_1"),
])
def test_coordinate_key(name, key):
    assert coordinate_key(name) == key


@pytest.mark.parametrize("name, expected", [
    ("AutoPick/job006/Movies/mic_1_autopick.star", 0),
    ("ManualPick/job004/Movies/mic_1_manualpick.star", 0),
    ("Import/job001/Movies/mic_1_pick.star", 0),
    ("External/job010/Movies/mic_1_cryopick.star", 0),
    ("topaz/Movies/mic_1_topazpicks.star", 0),
    ("EMAN/mic_1.box", 0),
    ("CBOX/mic_1.cbox", 0),
    ("mic_1", 0),  # Topaz image_name, no extension
    ("mic_10_autopick.star", 1),  # mic_10, never mic_1
    ("mic_10.box", 1),
    ("/elsewhere/mic_2_DW_autopick.star", 2),
    ("FoilHole_1_Data_2_autopick.star", 3),
    ("MotionCorr/job002/Movies/mic_10.mrc", 1),  # the very same name
    ("./MotionCorr/job002/Movies/mic_10.mrc", 1),
    ("MIC_1.box", 0),  # case differs only: matched when nothing else does
    ("mic_2.box", None),  # mic_2 is not mic_2_DW
    ("mic_100_autopick.star", None),
    ("mic.box", None),
    ("FoilHole_1_autopick.star", None),
])
def test_match_name(name, expected):
    assert match_name(name, MICS) == expected


def test_shared_stem_decided_by_directories():
    mics = ["MotionCorr/job002/GridA/Movies/mic001.mrc", "MotionCorr/job002/GridB/Movies/mic001.mrc"]
    assert match_name("AutoPick/job006/GridB/Movies/mic001_autopick.star", mics) == 1
    assert match_name("/tmp/picks/GridA/Movies/mic001.box", mics) == 0
    assert match_name("picks/mic001.box", mics) is None  # nothing tells them apart


def test_exact_stem_beats_suffix_rule():
    mics = ["a/mic_1.mrc", "a/mic_1_autopick.mrc"]
    assert match_name("b/mic_1_autopick.star", mics) == 1
    assert match_name("b/mic_1_manualpick.star", mics) == 0


def test_match_coordinates_by_file_name_and_by_micrograph_name():
    micrographs = _entries(MICS)
    tables = [
        _table("AutoPick/job006/Movies/mic_10_autopick.star", [1.0, 2.0], scores=[0.5, 0.25]),
        _table("run_data.star", [3.0], micrograph="MotionCorr/job002/Movies/mic_10.mrc", scores=[0.75]),
        _table("picks/mic_1.box", [4.0]),
        _table("picks/mic_1_empty.star", []),
        _table("picks/unrelated.box", [5.0]),
        _table("run_data.star", [6.0], micrograph="Other/job001/other.mrc"),
    ]
    result = match_coordinates(micrographs, tables)
    assert isinstance(result, MatchResult)
    assert sorted(result.coords) == [0, 1]
    assert result.coords[1]["x"].tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(result.coords[1]["score"], [0.5, 0.25, 0.75])
    assert result.coords[0]["x"].tolist() == [4.0]
    assert list(result.coords[0].columns) == ["x", "y", "score"]
    assert result.unmatched == ["picks/unrelated.box", "run_data.star (micrograph Other/job001/other.mrc)"]


def test_micrograph_whose_only_table_is_empty_is_present_and_empty():
    result = match_coordinates(_entries(MICS), [_table("mic_2_DW_autopick.star", [])])
    assert list(result.coords) == [2] and len(result.coords[2]) == 0
    assert list(result.coords[2].columns) == ["x", "y", "score"]


def test_ambiguous_table_is_reported():
    micrographs = _entries(["GridA/mic001.mrc", "GridB/mic001.mrc"])
    result = match_coordinates(micrographs, [_table("picks/mic001.box", [1.0])])
    assert result.coords == {}
    assert result.unmatched == ["picks/mic001.box (ambiguous: matches GridA/mic001.mrc, GridB/mic001.mrc)"]


def test_files_on_disk_match_micrographs_from_a_directory(tmp_path):
    for stem in ("mic_1", "mic_10"):
        write_tiny_mrc(tmp_path / "mics" / f"{stem}.mrc")
    write_text(tmp_path / "picks" / "mic_10.box", "0 0 10 10\n")
    write_text(tmp_path / "picks" / "mic_1.box", "10 10 20 20\n20 20 20 20\n")
    micrographs = find_micrographs(tmp_path / "mics")
    result = match_coordinates(micrographs, read_coordinates(tmp_path / "picks"))
    assert [m.path.name for m in micrographs] == ["mic_1.mrc", "mic_10.mrc"]
    assert result.coords[0][["x", "y"]].to_numpy().tolist() == [[20.0, 20.0], [30.0, 30.0]]
    assert result.coords[1][["x", "y"]].to_numpy().tolist() == [[5.0, 5.0]]
    assert result.unmatched == []


def test_topaz_table_matches_by_image_name(tmp_path):
    text = "image_name\tx_coord\ty_coord\tscore\nmic_1\t1\t2\t0.5\nmic_9\t3\t4\t0.1\n"
    path = write_text(tmp_path / "topaz.txt", text)
    result = match_coordinates(_entries(MICS), read_coordinate_file(path))
    assert result.coords[0]["x"].tolist() == [1.0]
    assert result.unmatched == [f"{path} (micrograph mic_9)"]


@needs_dev_set
def test_dev_set_labels_and_truth_match_the_micrographs_star():
    micrographs = find_micrographs(DEV_SET / "micrographs_ctf.star")
    labels = match_coordinates(micrographs, read_coordinates(DEV_SET / "labels"))
    assert labels.unmatched == []
    assert {micrographs[i].name: len(df) for i, df in labels.coords.items()} == {
        "micrographs/shell_mic000.mrc": 41, "micrographs/shell_mic001.mrc": 41}
    truth = match_coordinates(micrographs, read_coordinates(DEV_SET / "truth"))
    assert truth.unmatched == [] and sorted(truth.coords) == [0, 1, 2, 3]
    assert sum(len(df) for df in truth.coords.values()) == 681
    topaz = match_coordinates(micrographs, read_coordinates(DEV_SET / "labels_topaz.txt"))
    assert sorted(topaz.coords) == [0, 1] and sum(len(df) for df in topaz.coords.values()) == 82
