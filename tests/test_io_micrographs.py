"""find_micrographs / micrograph_stem against real files: MRC directories, globs, RELION 3.0 and 3.1+ STARs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_io import DEV_SET, needs_dev_set, write_text, write_tiny_mrc

from cryopick.errors import CryopickError, InputFileError
from cryopick.io.micrographs import find_micrographs, micrograph_stem
from cryopick.io.relion import write_micrographs_star

# CtfFind/job003/micrographs_ctf.star as RELION 4 writes it: two optics groups (MotionCorr binned by 2,
# so rlnMicrographPixelSize = 2 x original), names relative to the project directory.
CTF_STAR_31 = """# version 30001

data_optics

loop_ 
_rlnOpticsGroupName #1 
_rlnOpticsGroup #2 
_rlnMicrographOriginalPixelSize #3 
_rlnVoltage #4 
_rlnSphericalAberration #5 
_rlnAmplitudeContrast #6 
_rlnMicrographPixelSize #7 
opticsGroup1            1     0.885000   200.000000     1.400000     0.100000     1.770000 
opticsGroup2            2     0.500000   300.000000     2.700000     0.100000     1.000000 
 

# version 30001

data_micrographs

loop_ 
_rlnMicrographName #1 
_rlnOpticsGroup #2 
_rlnCtfImage #3 
_rlnDefocusU #4 
_rlnDefocusV #5 
_rlnCtfAstigmatism #6 
_rlnDefocusAngle #7 
_rlnCtfFigureOfMerit #8 
_rlnCtfMaxResolution #9 
MotionCorr/job002/Movies/mic002.mrc            2 CtfFind/job003/Movies/mic002.ctf:mrc 10863.857422 10575.688477   288.168945    77.724136     0.131859     4.809192 
MotionCorr/job002/Movies/mic001.mrc            1 CtfFind/job003/Movies/mic001.ctf:mrc 10863.857422 10575.688477   288.168945    77.724136     0.131859     4.809192 
 
"""

MOVIES = ("mic001", "mic002")


def _relion_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    for stem in MOVIES:
        write_tiny_mrc(project / "MotionCorr" / "job002" / "Movies" / f"{stem}.mrc")
    write_text(project / "CtfFind" / "job003" / "micrographs_ctf.star", CTF_STAR_31)
    return project


@pytest.mark.parametrize("name, stem", [
    ("MotionCorr/job002/Movies/mic001.mrc", "mic001"),
    ("/abs/Movies/mic001.mrcs", "mic001"),
    ("mic001.mrc.gz", "mic001"),
    ("Movies\\mic001.tif", "mic001"),
    ("picks/mic001_autopick.star", "mic001_autopick"),
    ("mic.001.box", "mic.001"),
    ("mic001.cbox", "mic001"),
    ("mic001.txt", "mic001"),
    ("mic001.MRC", "mic001"),
    ("mic001", "mic001"),
    ("mic001.ctf", "mic001.ctf"),  # unknown extensions are part of the name
])
def test_micrograph_stem(name, stem):
    assert micrograph_stem(name) == stem


def test_directory_lists_mrc_and_mrcs_sorted_by_name(tmp_path):
    for name in ("mic_10.mrc", "mic_2.mrc", "stack.mrcs"):
        write_tiny_mrc(tmp_path / name)
    write_text(tmp_path / "notes.txt", "not a micrograph\n")
    entries = find_micrographs(tmp_path)
    assert [e.name for e in entries] == [str(tmp_path / n) for n in ("mic_10.mrc", "mic_2.mrc", "stack.mrcs")]
    assert all(e.path.is_file() and e.pixel_size is None for e in entries)


def test_glob_pattern_and_single_file(tmp_path):
    for name in ("a_1.mrc", "a_2.mrc", "b_1.mrc"):
        write_tiny_mrc(tmp_path / name)
    entries = find_micrographs(str(tmp_path / "a_*.mrc"))
    assert [e.path.name for e in entries] == ["a_1.mrc", "a_2.mrc"]
    single = find_micrographs(tmp_path / "b_1.mrc")
    assert [(e.name, e.path) for e in single] == [(str(tmp_path / "b_1.mrc"), tmp_path / "b_1.mrc")]


def test_relion31_star_pixel_size_from_optics_names_relative_to_project(tmp_path, monkeypatch):
    project = _relion_project(tmp_path)
    monkeypatch.chdir(tmp_path)  # the names do not resolve against the cwd
    star = project / "CtfFind" / "job003" / "micrographs_ctf.star"
    entries = find_micrographs(star, project_dir=project)
    assert [e.name for e in entries] == ["MotionCorr/job002/Movies/mic001.mrc", "MotionCorr/job002/Movies/mic002.mrc"]
    assert [e.pixel_size for e in entries] == [1.77, 1.0]  # group 1 and group 2 rlnMicrographPixelSize
    assert [e.path for e in entries] == [project / e.name for e in entries]


def test_relion31_star_found_from_job_directory_without_project_dir(tmp_path, monkeypatch):
    project = _relion_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    entries = find_micrographs("project/CtfFind/job003/micrographs_ctf.star")  # grandparent of the STAR
    assert [e.path.resolve() for e in entries] == [
        (project / "MotionCorr" / "job002" / "Movies" / f"{s}.mrc").resolve() for s in MOVIES
    ]


def test_cwd_is_tried_first_as_relion_does(tmp_path, monkeypatch):
    project = _relion_project(tmp_path)
    monkeypatch.chdir(project)
    entries = find_micrographs("CtfFind/job003/micrographs_ctf.star")
    assert [str(e.path) for e in entries] == [f"MotionCorr/job002/Movies/{s}.mrc" for s in MOVIES]


def test_original_pixel_size_is_the_fallback(tmp_path):
    write_tiny_mrc(tmp_path / "Micrographs" / "m1.mrc")
    write_text(tmp_path / "micrographs.star", """# version 30001

data_optics

loop_ 
_rlnOpticsGroupName #1 
_rlnOpticsGroup #2 
_rlnMicrographOriginalPixelSize #3 
_rlnVoltage #4 
_rlnSphericalAberration #5 
opticsGroup1            1     1.234000   300.000000     2.700000 
 

# version 30001

data_micrographs

loop_ 
_rlnMicrographName #1 
_rlnOpticsGroup #2 
Micrographs/m1.mrc            1 
 
""")
    (entry,) = find_micrographs(tmp_path / "micrographs.star")
    assert entry.pixel_size == 1.234


def test_relion30_single_block_star(tmp_path):
    for stem in ("m1", "m2"):
        write_tiny_mrc(tmp_path / "Micrographs" / f"{stem}.mrc")
    # RELION 3.0: no optics; pixel size = 1e4 * rlnDetectorPixelSize (um) / rlnMagnification
    write_text(tmp_path / "micrographs_ctf.star", """
data_

loop_ 
_rlnMicrographName #1 
_rlnVoltage #2 
_rlnDetectorPixelSize #3 
_rlnMagnification #4 
Micrographs/m2.mrc   300.000000    14.000000 100000.000000 
Micrographs/m1.mrc   300.000000     5.000000 50000.000000 
Micrographs/m1.mrc   300.000000     5.000000 50000.000000 
""")
    entries = find_micrographs(tmp_path / "micrographs_ctf.star")
    assert [e.name for e in entries] == ["Micrographs/m1.mrc", "Micrographs/m2.mrc"]  # sorted, deduplicated
    assert [e.pixel_size for e in entries] == [pytest.approx(1.0), pytest.approx(1.4)]


def test_star_written_by_cryopick_writer_reads_back(tmp_path):
    names = [f"Micrographs/x_{i}.mrc" for i in (3, 1, 2)]
    for name in names:
        write_tiny_mrc(tmp_path / name)
    write_micrographs_star(tmp_path / "mics.star", names, pixel_size=0.83)
    entries = find_micrographs(tmp_path / "mics.star", project_dir=tmp_path)
    assert [(e.name, e.pixel_size) for e in entries] == [(n, 0.83) for n in sorted(names)]


def test_a_star_whose_micrographs_all_fail_to_resolve_names_them(tmp_path):
    write_tiny_mrc(tmp_path / "elsewhere" / "Micrographs" / "here.mrc")  # a wrong project directory
    star = tmp_path / "mics.star"
    write_micrographs_star(star, ["Micrographs/here.mrc", "Micrographs/gone1.mrc", "Micrographs/gone2.mrc"], 1.0)
    with pytest.raises(InputFileError) as excinfo:
        find_micrographs(star, project_dir=tmp_path)
    message = str(excinfo.value)
    assert str(star) in message and "3 of 3" in message
    assert "Micrographs/gone1.mrc" in message and "Micrographs/gone2.mrc" in message


def test_a_few_missing_micrographs_are_kept_for_the_reader_to_skip_and_list(tmp_path):
    from cryopick.io.mrc import read_header

    write_tiny_mrc(tmp_path / "Micrographs" / "here.mrc")
    star = tmp_path / "mics.star"
    write_micrographs_star(star, ["Micrographs/here.mrc", "Micrographs/gone1.mrc"], 1.0)
    gone, here = find_micrographs(star, project_dir=tmp_path)  # sorted by name
    assert (here.path, gone.path) == (tmp_path / "Micrographs/here.mrc", tmp_path / "Micrographs/gone1.mrc")
    with pytest.raises(InputFileError, match=r"gone1\.mrc: file not found"):
        read_header(gone.path)


def test_star_without_micrograph_names_is_rejected(tmp_path):
    star = write_text(tmp_path / "picks.star", "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 2\n")
    with pytest.raises(InputFileError, match="rlnMicrographName") as excinfo:
        find_micrographs(star)
    assert str(star) in str(excinfo.value) and "rlnCoordinateX" in str(excinfo.value)


@pytest.mark.parametrize("make_spec", [
    lambda tmp: tmp / "does_not_exist",
    lambda tmp: tmp,  # empty directory
    lambda tmp: str(tmp / "*.mrc"),  # glob matching nothing
])
def test_nothing_found_names_the_spec(tmp_path, make_spec):
    spec = make_spec(tmp_path)
    with pytest.raises(CryopickError, match="no micrographs found") as excinfo:
        find_micrographs(spec)
    assert str(spec) in str(excinfo.value)


def test_unreadable_star_is_an_input_error(tmp_path):
    star = tmp_path / "broken.star"
    star.write_bytes(b"data_\n\nloop_\n_rlnMicrographName #1\n\xff\xfe\x00garbage\n")
    with pytest.raises(InputFileError, match="broken.star"):
        find_micrographs(star)


@needs_dev_set
def test_dev_set_micrographs_star():
    entries = find_micrographs(DEV_SET / "micrographs_ctf.star")
    assert [e.name for e in entries] == [f"micrographs/shell_mic00{i}.mrc" for i in range(4)]
    assert all(e.pixel_size == pytest.approx(1.7) and e.path.is_file() for e in entries)


def test_a_file_without_the_map_identifier_is_not_an_mrc(tmp_path):
    from cryopick.io.mrc import read_header

    path = write_tiny_mrc(tmp_path / "mic.mrc")
    assert read_header(path).shape[0] > 0
    data = bytearray(path.read_bytes())
    data[208:212] = b"XXXX"  # permissive header reading took any 1024 bytes for one ("holds 1763734377 sections")
    path.write_bytes(bytes(data))
    with pytest.raises(InputFileError, match=r"mic\.mrc: not an MRC file \(no 'MAP ' identifier"):
        read_header(path)
    path.write_text("this is a text file, not a micrograph\n" * 40)
    with pytest.raises(InputFileError, match="not an MRC file"):
        read_header(path)
