"""Coordinate readers against files written exactly as RELION, crYOLO and Topaz write them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers_io import DEV_SET, needs_dev_set, write_text

from cryopick.errors import CryopickError, InputFileError
from cryopick.io.coords import (
    MissingCoordinatesError,
    find_coordinate_files,
    read_coordinate_file,
    read_coordinates,
)
from cryopick.io.relion import write_box, write_coordinate_files_list, write_coordinate_star, write_topaz_table

NAN = math.nan

# RELION 5 AutoPick (template) per-micrograph file, layout exact (formats.md section 1.2).
AUTOPICK_50 = """# version 50001

data_

loop_ 
_rlnCoordinateX #1 
_rlnCoordinateY #2 
_rlnClassNumber #3 
_rlnAutopickFigureOfMerit #4 
_rlnAnglePsi #5 
 1215.000000  1837.000000            1     2.184453    45.000000 
 1479.000000   212.000000            1     1.927316   135.000000 
 
"""

# RELION 3.1 ManualPick: -999 placeholders for class, psi and figure of merit.
MANUALPICK_31 = """
data_

loop_ 
_rlnCoordinateX #1 
_rlnCoordinateY #2 
_rlnClassNumber #3 
_rlnAnglePsi #4 
_rlnAutopickFigureOfMerit #5 
  512.000000   640.000000         -999  -999.00000  -999.00000 
  100.500000    77.250000         -999  -999.00000  -999.00000 
 
"""

# RELION 5 ManualPick.
MANUALPICK_50 = """
# version 50001

data_

loop_ 
_rlnCoordinateX #1 
_rlnCoordinateY #2 
_rlnParticleSelectionType #3 
_rlnAnglePsi #4 
_rlnAutopickFigureOfMerit #5 
  300.000000   400.000000            2  -999.00000     0.000000 
 
"""

# crYOLO >= 1.8 CBOX (pyStarDB resources/TcdA1-0155_frames_sum.cbox, first rows): corners, <NA> for missing.
CBOX_18 = """
data_global

_cbox_format_version 1.0

data_cryolo

loop_
_CoordinateX #1
_CoordinateY #2
_CoordinateZ #3
_Width #4
_Height #5
_Depth #6
_EstWidth #7
_EstHeight #8
_Confidence #9
_NumBoxes #10
_Angle #11
166.0 3895.0 <NA> 220.0 220.0 1.0 <NA> <NA> 1.0 1.0 <NA>
-23.0 3856.0 <NA> 220.0 220.0 1.0 <NA> <NA> 0.25 1.0 <NA>
938.5 3790.0 <NA> 220.0 221.0 1.0 <NA> <NA> 0.875 1.0 <NA>

data_cryolo_include

loop_
_slice_index #1
"""

# RELION 4 particles STAR (Extract output: optics without rlnMicrographPixelSize) after refinement.
PARTICLES_31 = """# version 30001

data_optics

loop_ 
_rlnOpticsGroupName #1 
_rlnOpticsGroup #2 
_rlnMicrographOriginalPixelSize #3 
_rlnVoltage #4 
_rlnSphericalAberration #5 
_rlnAmplitudeContrast #6 
_rlnImagePixelSize #7 
_rlnImageSize #8 
_rlnImageDimensionality #9 
_rlnCtfDataAreCtfPremultiplied #10 
opticsGroup1            1     2.000000   200.000000     1.400000     0.100000     3.540000           64            2            0 
 

# version 30001

data_particles

loop_ 
_rlnCoordinateX #1 
_rlnCoordinateY #2 
_rlnAutopickFigureOfMerit #3 
_rlnImageName #4 
_rlnMicrographName #5 
_rlnOpticsGroup #6 
_rlnOriginXAngst #7 
_rlnOriginYAngst #8 
 1215.000000  1837.000000     2.184453 000001@Extract/job007/Movies/mic001.mrcs MotionCorr/job002/Movies/mic001.mrc            1     5.000000    -5.000000 
  300.000000   400.000000     1.500000 000002@Extract/job007/Movies/mic001.mrcs MotionCorr/job002/Movies/mic001.mrc            1     1.900000     0.000000 
  700.000000   800.000000    -0.250000 000001@Extract/job007/Movies/mic002.mrcs MotionCorr/job002/Movies/mic002.mrc            1    -3.100000     2.900000 
 
"""


def _xy(table):
    return table.coords[["x", "y"]].to_numpy().tolist()


def _scores(table):
    return table.coords["score"].to_numpy()


def test_relion5_autopick_star(tmp_path):
    path = write_text(tmp_path / "Movies" / "mic001_autopick.star", AUTOPICK_50)
    (table,) = read_coordinate_file(path)
    assert table.source == path and table.micrograph is None
    assert _xy(table) == [[1215.0, 1837.0], [1479.0, 212.0]]
    np.testing.assert_array_equal(_scores(table), [2.184453, 1.927316])
    assert list(table.coords.columns) == ["x", "y", "score"]
    assert all(str(t) == "float64" for t in table.coords.dtypes)


def test_relion31_manualpick_placeholder_fom_is_no_score(tmp_path):
    (table,) = read_coordinate_file(write_text(tmp_path / "mic_manualpick.star", MANUALPICK_31))
    assert _xy(table) == [[512.0, 640.0], [100.5, 77.25]]
    assert np.isnan(_scores(table)).all()


def test_relion5_manualpick(tmp_path):
    (table,) = read_coordinate_file(write_text(tmp_path / "mic_manualpick.star", MANUALPICK_50))
    assert _xy(table) == [[300.0, 400.0]]
    np.testing.assert_array_equal(_scores(table), [0.0])


def test_star_without_figure_of_merit_has_nan_scores(tmp_path):
    # crYOLO STAR output: centres, no confidence
    path = write_text(tmp_path / "STAR" / "mic.star",
                      "\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n3483.5\t3985.5\n500.0\t-10.0\n")
    (table,) = read_coordinate_file(path)
    assert _xy(table) == [[3483.5, 3985.5], [500.0, -10.0]]
    assert np.isnan(_scores(table)).all()


def test_coordinate_star_writer_round_trip(tmp_path):
    x, y, fom = [10.25, 2048.0, 0.0], [7.5, 1.0, 3000.125], [0.5, -1.25, 0.0005]
    path = tmp_path / "mic_cryopick.star"
    write_coordinate_star(path, x, y, fom)
    (table,) = read_coordinate_file(path)
    assert _xy(table) == [list(p) for p in zip(x, y)]
    np.testing.assert_allclose(_scores(table), fom, rtol=1e-6)


def test_zero_byte_star_is_an_empty_table(tmp_path):
    path = tmp_path / "mic_autopick.star"
    path.write_bytes(b"")
    (table,) = read_coordinate_file(path)
    assert table.source == path and len(table.coords) == 0
    assert list(table.coords.columns) == ["x", "y", "score"]


def test_header_only_loop_is_an_empty_table(tmp_path):
    path = write_text(tmp_path / "m.star", "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n")
    (table,) = read_coordinate_file(path)
    assert len(table.coords) == 0


def test_non_utf8_byte_past_the_sniffed_head_is_refused_not_read_as_empty(tmp_path):
    # starfile reads a STAR with one bad byte as an empty table: 3000 labels would vanish without a word
    rows = "".join(f"{i}.0 {i}.0\n" for i in range(3000))  # ~60 kB, so the bad line lies past 64 KiB
    path = tmp_path / "mic.star"
    path.write_bytes(f"data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n{rows}{rows}".encode()
                     + b"100.0 \xe9100.0\n")
    with pytest.raises(InputFileError, match=r"mic\.star: line 6006 is not UTF-8"):
        read_coordinate_file(path)


def test_star_and_box_files_starting_with_a_utf8_bom_are_read(tmp_path):
    path = tmp_path / "m.star"  # Windows editors add one; it hid "data_" from the format sniffing
    path.write_bytes(b"\xef\xbb\xbfdata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n10 20\n30 40\n")
    (table,) = read_coordinate_file(path)
    assert table.coords[["x", "y"]].to_numpy().tolist() == [[10.0, 20.0], [30.0, 40.0]]
    box = tmp_path / "m.box"
    box.write_bytes(b"\xef\xbb\xbf10 20 80 80\n")
    (table,) = read_coordinate_file(box)
    assert table.coords[["x", "y"]].to_numpy().tolist() == [[50.0, 60.0]]


def test_a_column_named_twice_is_refused(tmp_path):
    path = write_text(tmp_path / "m.star", "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateX #2\n"
                                          "_rlnCoordinateY #3\n10 20 30\n")
    with pytest.raises(InputFileError, match=r"m\.star: .*rlnCoordinateX more than once"):
        read_coordinate_file(path)


LOOP = "loop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"


def test_concatenated_star_files_are_refused_not_read_as_the_last(tmp_path):
    # `cat a.star b.star`: two blocks named data_; starfile keeps only the last, the first table vanished
    path = write_text(tmp_path / "m.star", f"data_\n\n{LOOP}1 2\n3 4\n\ndata_\n\n{LOOP}5 6\n")
    with pytest.raises(InputFileError, match=r"m\.star: data block data_ appears more than once"):
        read_coordinate_file(path)


def test_a_star_file_that_is_not_star_is_refused_not_read_as_a_header(tmp_path):
    path = write_text(tmp_path / "mic_manualpick.star", "junk junk\n")  # was read as a header: 0 labels, no word
    with pytest.raises(InputFileError, match=r"mic_manualpick\.star: not a STAR file \(it starts 'junk junk'"):
        read_coordinate_file(path)
    assert len(read_coordinate_file(write_text(tmp_path / "m.txt", "x y\n1 2\n"))[0].coords) == 1  # plain tables


def test_a_second_coordinate_table_is_named_in_a_warning(tmp_path):
    path = write_text(tmp_path / "m.star", f"data_a\n\n{LOOP}1 2\n3 4\n\ndata_b\n\n{LOOP}5 6\n")
    tables = read_coordinate_file(path)
    assert [_xy(t) for t in tables] == [[[1.0, 2.0], [3.0, 4.0]]]
    assert tables.warnings == [f"{path}: 2 coordinate tables (data_a, data_b); only data_a is read (one table "
                               "per file)"]


def test_rows_with_nan_coordinates_are_dropped(tmp_path):
    path = write_text(tmp_path / "m.star",
                      "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1.0 2.0\nnan 3.0\n4.0 <NA>\n5.0 6.0\n")
    (table,) = read_coordinate_file(path)
    assert _xy(table) == [[1.0, 2.0], [5.0, 6.0]]
    assert list(table.coords.index) == [0, 1]


def test_coord_scale_multiplies_x_and_y_only(tmp_path):
    (table,) = read_coordinate_file(write_text(tmp_path / "m.star", AUTOPICK_50), coord_scale=2.0)
    assert _xy(table) == [[2430.0, 3674.0], [2958.0, 424.0]]
    np.testing.assert_array_equal(_scores(table), [2.184453, 1.927316])


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan])
def test_bad_coord_scale(tmp_path, scale):
    with pytest.raises(CryopickError, match="positive"):
        read_coordinate_file(write_text(tmp_path / "m.star", AUTOPICK_50), coord_scale=scale)


def test_eman_box_corner_to_centre_with_comments_and_eman1_column(tmp_path):
    path = write_text(tmp_path / "mic.box", "# picked by hand\n100\t200\t64\t64\t-3\n\n  7 9 65 65\n")
    (table,) = read_coordinate_file(path)
    assert _xy(table) == [[132.0, 232.0], [39.5, 41.5]]  # corner + size / 2, in float
    assert np.isnan(_scores(table)).all()


def test_cryolo_box_with_float_corners(tmp_path):
    path = write_text(tmp_path / "EMAN" / "mic.box", "3373.5\t3875.5\t220\t220\n390.0\t3844.5\t220\t220\n")
    (table,) = read_coordinate_file(path)
    assert _xy(table) == [[3483.5, 3985.5], [500.0, 3954.5]]


def test_box_writer_round_trip(tmp_path):
    path = tmp_path / "mic.box"
    write_box(path, [100, 37], [250, 64], box_size=128)
    (table,) = read_coordinate_file(path)
    assert _xy(table) == [[100.0, 250.0], [37.0, 64.0]]


def test_box_line_with_too_few_columns_names_file_and_line(tmp_path):
    path = write_text(tmp_path / "bad.box", "1 2 3 4\n12 34\n")
    with pytest.raises(InputFileError, match="line 2") as excinfo:
        read_coordinate_file(path)
    assert str(path) in str(excinfo.value)


def test_cbox_18_star_corners_and_confidence(tmp_path):
    (table,) = read_coordinate_file(write_text(tmp_path / "CBOX" / "mic.cbox", CBOX_18))
    assert _xy(table) == [[276.0, 4005.0], [87.0, 3966.0], [1048.5, 3900.5]]
    np.testing.assert_array_equal(_scores(table), [1.0, 0.25, 0.875])


def test_cbox_before_18_plain_text(tmp_path):
    text = "3373.5\t3875.5\t220\t220\t0.86305755\t227\t217\n390.0\t3844.5\t220\t220\t0.4183382\t224\t223\n"
    (table,) = read_coordinate_file(write_text(tmp_path / "mic.cbox", text))
    assert _xy(table) == [[3483.5, 3985.5], [500.0, 3954.5]]
    np.testing.assert_array_equal(_scores(table), [0.86305755, 0.4183382])


def test_topaz_table_grouped_by_image_name(tmp_path):
    text = ("image_name\tx_coord\ty_coord\tscore\n"
            "0001\t512\t640\t3.25\n"
            "mic_2\t10\t20\t-1.5\n"
            "0001\t100\t50\t0.125\n")
    tables = read_coordinate_file(write_text(tmp_path / "predicted.txt", text))
    assert [t.micrograph for t in tables] == ["0001", "mic_2"]  # numeric-looking names stay text
    assert _xy(tables[0]) == [[512.0, 640.0], [100.0, 50.0]]
    np.testing.assert_array_equal(_scores(tables[0]), [3.25, 0.125])
    assert _xy(tables[1]) == [[10.0, 20.0]]
    np.testing.assert_array_equal(_scores(tables[1]), [-1.5])


def test_topaz_table_without_score_and_scaled(tmp_path):
    text = "image_name\tx_coord\ty_coord\nmic_a\t100\t51\n"
    (table,) = read_coordinate_file(write_text(tmp_path / "labels.tsv", text), coord_scale=4)
    assert table.micrograph == "mic_a"
    assert _xy(table) == [[400.0, 204.0]]
    assert np.isnan(_scores(table)).all()


def test_topaz_rows_longer_than_the_header_are_refused_not_shifted(tmp_path):
    # pandas took the surplus leading fields for an index: micrograph "20", x = 30, y = 40
    path = write_text(tmp_path / "picks.txt", "image_name\tx_coord\ty_coord\nmic_a 10 20 30 40\nmic_a 1 2 3 4\n")
    with pytest.raises(InputFileError, match=r"picks\.txt: rows have more fields than the header's 3"):
        read_coordinate_file(path)


def test_topaz_header_without_y_coord_names_the_missing_column(tmp_path):
    path = write_text(tmp_path / "picks.txt", "image_name\tx_coord\tscore\nmic_a\t10\t0.5\n")
    with pytest.raises(InputFileError, match=r"picks\.txt: a Topaz table needs x_coord and y_coord"):
        read_coordinate_file(path)


def test_topaz_writer_round_trip(tmp_path):
    path = tmp_path / "picks.txt"
    write_topaz_table(path, [("Movies/m1.mrc", 10.4, 20.6, 0.5), ("Movies/m2.mrc", 3.0, 4.0, -2.0)])
    tables = read_coordinate_file(path)
    assert [(t.micrograph, _xy(t)) for t in tables] == [("m1", [[10.0, 21.0]]), ("m2", [[3.0, 4.0]])]


def test_topaz_star_output(tmp_path):
    # topaz extract --format star: data_images, no blank line after it, tab-separated, no trailing newline
    text = ("data_images\n\nloop_\n_rlnAutopickFigureOfMerit #1\n_rlnMicrographName #2\n"
            "_rlnCoordinateX #3\n_rlnCoordinateY #4\n"
            "-1.5\tmic_1.mrc\t10\t20\n2.5\tmic_2.mrc\t30\t40\n0.5\tmic_1.mrc\t11\t21")
    tables = read_coordinate_file(write_text(tmp_path / "topaz.star", text))
    assert [(t.micrograph, _xy(t)) for t in tables] == [
        ("mic_1.mrc", [[10.0, 20.0], [11.0, 21.0]]), ("mic_2.mrc", [[30.0, 40.0]])]
    np.testing.assert_array_equal(_scores(tables[0]), [-1.5, 0.5])


def test_particles_star_31_recentred_by_origin_angst(tmp_path):
    tables = read_coordinate_file(write_text(tmp_path / "run_data.star", PARTICLES_31))
    assert [t.micrograph for t in tables] == ["MotionCorr/job002/Movies/mic001.mrc",
                                              "MotionCorr/job002/Movies/mic002.mrc"]
    # pixel size 2.0 (rlnMicrographOriginalPixelSize); x - ROUND(origin / 2) with halves away from zero:
    # 5.0/2 = 2.5 -> 3, -5.0/2 -> -3, 1.9/2 = 0.95 -> 1, -3.1/2 = -1.55 -> -2, 2.9/2 = 1.45 -> 1
    assert _xy(tables[0]) == [[1212.0, 1840.0], [299.0, 400.0]]
    assert _xy(tables[1]) == [[702.0, 799.0]]
    np.testing.assert_array_equal(_scores(tables[1]), [-0.25])


def test_particles_star_explicit_micrograph_pixel_size_wins(tmp_path):
    tables = read_coordinate_file(write_text(tmp_path / "run_data.star", PARTICLES_31), micrograph_pixel_size=1.0)
    assert _xy(tables[0]) == [[1210.0, 1842.0], [298.0, 400.0]]


def test_particles_star_30_single_block_origins_in_pixels(tmp_path):
    text = """
data_

loop_ 
_rlnMicrographName #1 
_rlnCoordinateX #2 
_rlnCoordinateY #3 
_rlnImageName #4 
_rlnOriginX #5 
_rlnOriginY #6 
_rlnDetectorPixelSize #7 
_rlnMagnification #8 
Micrographs/0001.mrc   100.000000   200.000000 000001@Particles/Micrographs/0001.mrcs     2.500000    -0.400000    14.000000 100000.000000 
Micrographs/0002.mrc   300.000000   400.000000 000001@Particles/Micrographs/0002.mrcs     0.000000     0.000000    14.000000 100000.000000 
"""
    tables = read_coordinate_file(write_text(tmp_path / "particles.star", text))
    assert [(t.micrograph, _xy(t)) for t in tables] == [
        ("Micrographs/0001.mrc", [[97.0, 200.0]]), ("Micrographs/0002.mrc", [[300.0, 400.0]])]


def _autopick_job(tmp_path):
    """A RELION 5 project with AutoPick/job006 holding per-micrograph files, its list and job bookkeeping."""
    project = tmp_path / "project"
    job = project / "AutoPick" / "job006"
    write_text(job / "Movies" / "mic001_autopick.star", AUTOPICK_50)
    (job / "Movies" / "mic002_autopick.star").write_bytes(b"")
    write_coordinate_files_list(job / "autopick.star", [
        ("MotionCorr/job002/Movies/mic001.mrc", "AutoPick/job006/Movies/mic001_autopick.star"),
        ("MotionCorr/job002/Movies/mic002.mrc", "AutoPick/job006/Movies/mic002_autopick.star"),
    ])
    write_text(job / "job.star", "\ndata_job\n\n_rlnJobTypeLabel             relion.autopick.log\n"
                                 "_rlnJobIsContinue                       0\n")
    write_text(job / "note.txt", " ++++ with the following command(s): \nrelion_autopick --i x.star\n")
    return project, job


def test_coordinate_files_list_resolves_names_against_project(tmp_path, monkeypatch):
    project, job = _autopick_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    tables = read_coordinate_file(job / "autopick.star")
    assert [t.micrograph for t in tables] == ["MotionCorr/job002/Movies/mic001.mrc",
                                              "MotionCorr/job002/Movies/mic002.mrc"]
    assert [t.source.resolve() for t in tables] == [
        (job / "Movies" / f"{s}_autopick.star").resolve() for s in ("mic001", "mic002")]
    assert _xy(tables[0]) == [[1215.0, 1837.0], [1479.0, 212.0]]
    assert len(tables[1].coords) == 0


def test_coordinate_files_list_scaled_once(tmp_path):
    _, job = _autopick_job(tmp_path)
    tables = read_coordinate_file(job / "autopick.star", coord_scale=0.5)
    assert _xy(tables[0]) == [[607.5, 918.5], [739.5, 106.0]]


def test_coordinate_files_list_with_missing_file(tmp_path):
    list_path = tmp_path / "manualpick.star"
    write_coordinate_files_list(list_path, [("Movies/a.mrc", "ManualPick/job004/Movies/a_manualpick.star")])
    with pytest.raises(InputFileError, match="a_manualpick.star") as excinfo:
        read_coordinate_file(list_path)
    assert str(list_path) in str(excinfo.value)


def test_job_directory_reads_each_file_once_skipping_bookkeeping(tmp_path, capsys):
    project, job = _autopick_job(tmp_path)
    write_text(job / "micrographs_selected.star",
               "data_micrographs\n\nloop_\n_rlnMicrographName #1\nMotionCorr/job002/Movies/mic001.mrc\n")
    files = find_coordinate_files(job)
    assert [p.relative_to(job).as_posix() for p in files] == [
        "Movies/mic001_autopick.star", "Movies/mic002_autopick.star", "autopick.star", "micrographs_selected.star"]
    tables = read_coordinates(job)
    assert [(t.micrograph, len(t.coords)) for t in tables] == [
        ("MotionCorr/job002/Movies/mic001.mrc", 2), ("MotionCorr/job002/Movies/mic002.mrc", 0)]
    assert [w for w in tables.warnings if "micrographs_selected.star" in w]  # skipped, and returned to report
    assert capsys.readouterr().err == ""  # reading prints nothing: the command reports the warnings


def test_relion31_suffix_node(tmp_path):
    job = tmp_path / "AutoPick" / "job006"
    write_text(job / "coords_suffix_autopick.star", "CtfFind/job003/micrographs_ctf.star\n")
    write_text(job / "Movies" / "mic001_autopick.star", AUTOPICK_50)
    write_text(job / "Movies" / "mic002_autopick.star", MANUALPICK_50)
    tables = read_coordinate_file(job / "coords_suffix_autopick.star")
    assert [(t.source.name, t.micrograph, len(t.coords)) for t in tables] == [
        ("mic001_autopick.star", None, 2), ("mic002_autopick.star", None, 1)]


def test_plain_text_centres_with_header(tmp_path):
    (table,) = read_coordinate_file(write_text(tmp_path / "mic.txt", "x y\n10 20\n30.5 40\n"))
    assert _xy(table) == [[10.0, 20.0], [30.5, 40.0]]


def test_star_without_coordinate_columns(tmp_path):
    path = write_text(tmp_path / "mic.star", "data_\n\nloop_\n_rlnDefocusU #1\n_rlnDefocusV #2\n1 2\n")
    with pytest.raises(InputFileError) as excinfo:
        read_coordinate_file(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "no rlnCoordinateX/rlnCoordinateY columns" in message and "rlnDefocusU" in message


def test_single_file_without_coordinates_raises_through_read_coordinates(tmp_path):
    path = write_text(tmp_path / "mic.star", "data_\n\nloop_\n_rlnDefocusU #1\n1\n")
    with pytest.raises(MissingCoordinatesError, match="mic.star"):
        read_coordinates(path)


def test_directory_with_no_coordinates_at_all(tmp_path):
    write_text(tmp_path / "mics.star", "data_\n\nloop_\n_rlnMicrographName #1\na.mrc\n")
    write_text(tmp_path / "other.star", "data_\n\nloop_\n_rlnDefocusU #1\n1\n")
    with pytest.raises(CryopickError, match="no coordinate tables"):
        read_coordinates(tmp_path)


def test_non_numeric_coordinate(tmp_path):
    path = write_text(tmp_path / "m.star", "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 2\nabc 3\n")
    with pytest.raises(InputFileError, match="rlnCoordinateX.*abc"):
        read_coordinate_file(path)


def test_binary_file_is_an_input_error(tmp_path):
    path = tmp_path / "mic.star"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputFileError, match="mic.star"):
        read_coordinate_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        read_coordinate_file(tmp_path / "nope.star")


def test_find_coordinate_files(tmp_path):
    for name in ("a/m1.star", "a/b/m2.box", "m3.cbox", "m4.txt", "m5.tsv", "ignored.mrc", ".hidden.star"):
        write_text(tmp_path / name, "")
    assert [p.relative_to(tmp_path).as_posix() for p in find_coordinate_files(tmp_path)] == [
        "a/b/m2.box", "a/m1.star", "m3.cbox", "m4.txt", "m5.tsv"]
    assert find_coordinate_files(str(tmp_path / "a" / "*.star")) == [tmp_path / "a" / "m1.star"]
    assert find_coordinate_files(tmp_path / "m3.cbox") == [tmp_path / "m3.cbox"]
    with pytest.raises(CryopickError, match="does not exist"):
        find_coordinate_files(tmp_path / "missing")
    with pytest.raises(CryopickError, match="no coordinate files"):
        find_coordinate_files(str(tmp_path / "*.box"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CryopickError, match="no coordinate files"):
        find_coordinate_files(tmp_path / "empty")


@needs_dev_set
def test_dev_set_labels_truth_and_topaz():
    labels = read_coordinates(DEV_SET / "labels")
    assert sorted(t.source.name for t in labels) == ["shell_mic000.star", "shell_mic001.star"]
    assert sum(len(t.coords) for t in labels) == 82
    truth = read_coordinates(DEV_SET / "truth")
    assert sum(len(t.coords) for t in truth) == 681
    topaz = read_coordinates(DEV_SET / "labels_topaz.txt")
    assert {t.micrograph: len(t.coords) for t in topaz} == {"shell_mic000": 41, "shell_mic001": 41}
    first = labels[0].coords.iloc[0]
    assert (first.x, first.y) == (1510.712, 724.778)


def test_read_problems_are_returned_for_the_command_to_report_not_printed(tmp_path, capsys):
    write_text(tmp_path / "mic_a.star", "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n10 20\nnan 5\n")
    write_text(tmp_path / "parts.star", "data_particles\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
                                        "_rlnMicrographName #3\n_rlnOriginXAngst #4\n_rlnOriginYAngst #5\n"
                                        "100 200 mic_b.mrc 4.0 -4.0\n")
    tables = read_coordinates(tmp_path)
    assert sorted(_xy(t) for t in tables) == [[[10.0, 20.0]], [[100.0, 200.0]]]  # no pixel size: not re-centred
    assert len(tables.warnings) == 2
    assert "mic_a.star: 1 coordinate row(s) without a finite x/y" in tables.warnings[0]
    assert "parts.star: has rlnOriginXAngst/YAngst but no pixel size" in tables.warnings[1]
    assert capsys.readouterr().err == ""
