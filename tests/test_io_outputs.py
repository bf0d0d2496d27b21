"""cryopick.io.outputs: our coordinate files read back through io.coords, list files, extra formats, ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cryopick.errors import CryopickError
from cryopick.io.micrographs import MicrographEntry
from cryopick.io.outputs import (
    OutputFormats,
    OutputLedger,
    dotdot_names,
    plan_outputs,
    read_coordinate_star,
    write_extra_formats,
    write_list_files,
)
from cryopick.io.pickmarker import ListFiles
from cryopick.io.relion import write_coordinate_star


def test_coordinate_star_round_trip_and_empty_file(tmp_path):
    write_coordinate_star(tmp_path / "a.star", [10.0, 200.0], [30.0, 4.0], [0.9, 0.55])
    picks = read_coordinate_star(tmp_path / "a.star")
    assert picks.x.tolist() == [10.0, 200.0] and picks.y.tolist() == [30.0, 4.0]
    assert picks.score.tolist() == [0.9, 0.55]
    write_coordinate_star(tmp_path / "empty.star", [], [], [])
    assert (tmp_path / "empty.star").stat().st_size == 0 and len(read_coordinate_star(tmp_path / "empty.star")) == 0


def entries(*names: str) -> list[MicrographEntry]:
    return [MicrographEntry(name=n, path=Path(n), pixel_size=None) for n in names]


def test_plans_refuse_clashes_and_report_dotdot_names():
    lists = ListFiles("cryopick")
    plans, failed = plan_outputs(entries("Movies/a.mrc", "Movies/a.tif", "../up/b.mrc", "coordinates.mrc"),
                                 "cryopick", lists.all())
    assert [p.star for p in plans] == ["Movies/a_cryopick.star", "up/b_cryopick.star"]
    assert set(failed) == {"Movies/a.tif", "coordinates.mrc"}
    assert dotdot_names(plans) == ["../up/b.mrc"]


def test_list_files_and_extra_formats(tmp_path):
    lists = ListFiles("s")
    plans, _ = plan_outputs(entries("mics/a.mrc", "mics/b.mrc"), "s", lists.all())
    (tmp_path / "mics").mkdir()
    write_coordinate_star(tmp_path / "mics/a_s.star", [50.0], [60.0], [0.8])
    write_coordinate_star(tmp_path / "mics/b_s.star", [], [], [])
    written = write_list_files(tmp_path, Path("out"), lists, plans, None, 1.5)
    assert [p.name for p in written] == ["micrographs_s.star", "coords_suffix_s.star", "coordinates_s.star"]
    assert (tmp_path / "coords_suffix_s.star").read_text() == "out/micrographs_s.star\n"
    assert "out/mics/a_s.star" in (tmp_path / "coordinates_s.star").read_text()
    extra = write_extra_formats(tmp_path, lists, plans, OutputFormats(box=True, topaz=True),
                                {"mics/a.mrc": 20, "mics/b.mrc": 20})
    assert [p.name for p in extra] == ["a_s.box", "b_s.box", "topaz_s.txt"]
    assert (tmp_path / "mics/a_s.box").read_text() == "40\t50\t20\t20\n"
    assert (tmp_path / "topaz_s.txt").read_text().splitlines()[1] == "a\t50\t60\t0.800000"
    assert write_extra_formats(tmp_path, lists, plans, OutputFormats(), {}) == []


def test_ledger_claims_files_and_refuses_foreign_ones(tmp_path):
    ledger = OutputLedger(tmp_path, (0, 1))
    ledger.claim(["a.star"])
    (tmp_path / "a.star").write_text("")
    (tmp_path / "b.star").write_text("not ours")
    ledger.refuse_foreign(["a.star"])
    with pytest.raises(CryopickError, match="did not write: b.star"):
        ledger.refuse_foreign(["a.star", "b.star"])
    assert json.loads((tmp_path / ".cryopick_pick.json").read_text())["files"] == ["a.star"]
    assert OutputLedger(tmp_path, (0, 1)).owns("a.star")
