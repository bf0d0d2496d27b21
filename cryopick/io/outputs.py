"""The pick output directory: file naming (RELION AutoPick rule), the ownership ledger, list files and the
optional box/Topaz/particles/cryoSPARC files, rebuilt from the coordinate files present (see docs/formats.md).

Layout (RELION 3.1/4/5): ``<post of rlnMicrographName without extension>_<suffix>.star`` per micrograph
(0 bytes when empty), ``coords_suffix_<suffix>.star`` (3.1 suffix node: the micrographs STAR's path) and
``coordinates_<suffix>.star`` (4/5 ``coordinate_files`` list for ``--coord_list``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

import numpy as np

from cryopick import __version__
from cryopick.errors import CryopickError
from cryopick.fsutil import safe_join, write_json_atomic, write_text_atomic
from cryopick.io.coords import read_coordinate_file
from cryopick.io.cryosparc import write_cs
from cryopick.io.micrographs import MicrographEntry
from cryopick.io.mrc import read_header
from cryopick.io.pickmarker import MARKER_GLOB, MARKER_NAME, ListFiles, read_marker
from cryopick.io.relion import (
    relion_post,
    star_loop,
    write_box,
    write_coordinate_files_list,
    write_micrographs_star,
    write_topaz_table,
)
from cryopick.nms import Picks

PREVIEW_DIR = "preview"
STAGING_PREFIX = ".cryopick_pick.staging"

# ---------------------------------------------------------------------------------------------
# names


def coordinate_file_name(name: str, suffix: str, extension: str = ".star") -> str:
    """``<post of name without extension>_<suffix><extension>`` (RELION's AutoPick naming rule).

    ``.`` and ``..`` components are dropped so the file stays inside the output directory.
    """
    post = relion_post(str(name).replace("\\", "/"))
    parts = [p for p in PurePosixPath(post).parts if p not in ("/", ".", "..")]
    if not parts:
        raise CryopickError(f"micrograph name '{name}' has no file name")
    stem = parts[-1].rsplit(".", 1)[0] if "." in parts[-1].lstrip(".") else parts[-1]
    return str(PurePosixPath(*parts[:-1], f"{stem}_{suffix}{extension}"))


def preview_file_name(star_name: str) -> str:
    return str(PurePosixPath(PREVIEW_DIR) / (star_name[: -len(".star")] + ".png"))


@dataclass(frozen=True)
class PlannedMicrograph:
    entry: MicrographEntry
    star: str  # coordinate STAR, relative to the output directory

    @property
    def box(self) -> str:
        return self.star[: -len(".star")] + ".box"


def plan_outputs(entries: list[MicrographEntry], suffix: str, reserved: Iterable[str]
                 ) -> tuple[list[PlannedMicrograph], dict[str, str]]:
    """Coordinate file of each micrograph; names that clash with another's output fail (name → reason)."""
    taken = {name: "a run-level output file" for name in reserved}
    planned, failed = [], {}
    for entry in entries:
        try:
            star = coordinate_file_name(entry.name, suffix)
        except CryopickError as exc:
            failed[entry.name] = str(exc)
            continue
        if star in taken:
            failed[entry.name] = f"its coordinate file {star} is already the output of {taken[star]}"
            continue
        taken[star] = entry.name
        planned.append(PlannedMicrograph(entry, star))
    return planned, failed


def dotdot_names(planned: list[PlannedMicrograph]) -> list[str]:
    """Micrograph names with a ``..`` component: written without it, so RELION 3.1's suffix lookup misses them."""
    return [p.entry.name for p in planned if ".." in PurePosixPath(p.entry.name).parts]


# ---------------------------------------------------------------------------------------------
# ownership of the output directory


class OutputLedger:
    """What cryopick pick wrote in a directory: ``.cryopick_pick*.json`` markers (one per shard).

    Files are claimed before they are written, so an interrupted run still owns its files.
    """

    def __init__(self, out_dir: Path, shard: tuple[int, int]):
        self.out_dir = out_dir
        index, count = shard
        name = MARKER_NAME if count == 1 else f".cryopick_pick.shard-{index}-of-{count}.json"
        self.path = out_dir / name
        self.owned: set[str] = set()
        self.mine: set[str] = set()
        self.produced_by: dict[str, dict | None] = {}  # marker name → what made its picks (None: unknown)
        self.my_producer: dict | None = None
        for marker in sorted(out_dir.glob(MARKER_GLOB)):
            files, producer = read_marker(marker)
            self.owned |= files
            self.produced_by[marker.name] = producer
            if marker.name == name:
                self.mine = set(files)
                self.my_producer = producer

    def conflicts(self, producer: dict, own_only: bool) -> list[str]:
        """How the picks already here were made differently from ``producer`` (empty: no conflict)."""
        if not any((self.out_dir / f).is_file() for f in self.owned if f.endswith(".star")):
            return []
        markers = [self.path.name] if own_only else list(self.produced_by)
        return sorted({_difference(self.produced_by.get(m), producer) for m in markers
                       if m in self.produced_by and not same_producer(self.produced_by.get(m), producer)})

    def set_producer(self, producer: dict | None) -> None:
        self.my_producer = producer
        self._write()

    def owns(self, relative: str) -> bool:
        return relative in self.owned

    def refuse_foreign(self, relatives: Iterable[str]) -> None:
        """CryopickError naming existing files at our output paths that cryopick pick did not write."""
        foreign = sorted(r for r in relatives if r not in self.owned and (self.out_dir / r).exists())
        if foreign:
            shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
            raise CryopickError(
                f"{self.out_dir}: refusing to overwrite {len(foreign)} file(s) that cryopick pick did not "
                f"write: {shown}; choose another --out directory or --suffix"
            )

    def claim(self, relatives: Iterable[str]) -> None:
        new = set(relatives) - self.mine
        if not new:
            return
        self.mine |= new
        self.owned |= new
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.path, {"written_by": "cryopick pick", "cryopick_version": __version__,
                                      "produced_by": self.my_producer, "files": sorted(self.mine)})


def staging_dir(out_root: Path, shard: tuple[int, int]) -> Path:
    """Where an --overwrite run of ``shard`` builds its files before they replace the old ones."""
    return out_root / f"{STAGING_PREFIX}-{shard[0]}-of-{shard[1]}"


def promote_staged(stage: Path, out_root: Path, stale: Iterable[str]) -> None:
    """Move every file built in ``stage`` over its counterpart in ``out_root``; remove the ``stale`` files."""
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        target = out_root / path.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    for relative in stale:
        (out_root / relative).unlink(missing_ok=True)


def producer_record(model: str | Path, settings: dict) -> dict:
    """What decides the picks: the checkpoint's content (SHA-256) and the pick settings that select them."""
    digest = hashlib.sha256()
    with open(model, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"checkpoint_sha256": digest.hexdigest(), "checkpoint": str(model), "settings": settings}


def same_producer(a: dict | None, b: dict) -> bool:
    return a is not None and a.get("checkpoint_sha256") == b["checkpoint_sha256"] and a.get("settings") == b["settings"]


def _difference(old: dict | None, new: dict) -> str:
    if old is None:
        return "picks of an unrecorded model or settings (an earlier or interrupted run)"
    parts = []
    if old.get("checkpoint_sha256") != new["checkpoint_sha256"]:
        parts.append(f"another checkpoint ({old.get('checkpoint')})")
    settings = old.get("settings") or {}
    parts += [f"{k} {settings.get(k)} (now {v})" for k, v in new["settings"].items() if settings.get(k) != v]
    return ", ".join(parts) or "other settings"


# ---------------------------------------------------------------------------------------------
# run-level files, rebuilt from every coordinate file present (so shards and reruns compose)


def read_coordinate_star(path: str | Path) -> Picks:
    """Picks of one of our coordinate files (0-byte file → none), read back through ``io.coords``."""
    tables = read_coordinate_file(path)
    if not tables or tables[0].coords.empty:
        empty = np.zeros(0)
        return Picks(empty, empty, empty)
    coords = tables[0].coords
    score = np.nan_to_num(coords["score"].to_numpy(dtype=np.float64), nan=1.0)  # no figure of merit: 1
    return Picks(coords["x"].to_numpy(dtype=np.float64), coords["y"].to_numpy(dtype=np.float64), score)


def as_given(out_dir_given: Path, relative: str) -> str:
    """A path inside the output directory spelled from the directory as the user gave it."""
    return str(PurePosixPath(out_dir_given.as_posix()) / relative)


def write_list_files(out_root: Path, out_dir_given: Path, lists: ListFiles, present: list[PlannedMicrograph],
                     micrographs_star: str | None, pixel_size: float) -> list[Path]:
    """The 3.1 suffix file and the 4/5 coordinate-files list; without an input ``micrographs_star``, one of ours
    (at ``pixel_size`` Å/px) for the suffix file to name."""
    written = []
    if micrographs_star is None:
        written.append(safe_join(out_root, lists.micrographs))
        write_micrographs_star(written[-1], [p.entry.name for p in present], pixel_size)
        micrographs_star = as_given(out_dir_given, lists.micrographs)
    written.append(safe_join(out_root, lists.coords_suffix))
    write_text_atomic(written[-1], micrographs_star + "\n")
    written.append(safe_join(out_root, lists.coordinate_list))
    write_coordinate_files_list(written[-1], [(p.entry.name, as_given(out_dir_given, p.star)) for p in present])
    return written


@dataclass(frozen=True)
class OutputFormats:
    """Which optional files to write beside the RELION coordinate files."""

    box: bool = False
    topaz: bool = False
    particles: bool = False
    cryosparc: bool = False

    def any(self) -> bool:
        return self.box or self.topaz or self.particles or self.cryosparc


def write_extra_formats(out_root: Path, lists: ListFiles, present: list[PlannedMicrograph], formats: OutputFormats,
                        box_sizes: dict[str, int]) -> list[Path]:
    """EMAN box files (edge ``box_sizes[name]`` px), a Topaz table, a particles STAR and a cryoSPARC ``.cs``."""
    if not formats.any():
        return []
    picks = {p.entry.name: read_coordinate_star(out_root / p.star) for p in present}
    rows = [(p.entry.name, float(x), float(y), float(s)) for p in present
            for x, y, s in zip(picks[p.entry.name].x, picks[p.entry.name].y, picks[p.entry.name].score)]
    written = []
    if formats.box:
        for p in present:
            written.append(safe_join(out_root, p.box))
            write_box(written[-1], picks[p.entry.name].x, picks[p.entry.name].y, box_sizes[p.entry.name])
    if formats.topaz:
        written.append(safe_join(out_root, lists.topaz))
        write_topaz_table(written[-1], rows)
    if formats.particles:
        written.append(safe_join(out_root, lists.particles))
        write_text_atomic(written[-1], star_loop(
            "particles", ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"], rows))
    if formats.cryosparc:
        written.append(safe_join(out_root, lists.cryosparc))
        write_cs(written[-1], [(p.entry.name, read_header(p.entry.path).shape, picks[p.entry.name].x,
                                picks[p.entry.name].y, picks[p.entry.name].score) for p in present])
    return written
