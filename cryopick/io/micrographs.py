"""Finding micrographs: a directory, a glob, one MRC file, or a RELION micrographs STAR (3.0 and 3.1+).

Also home of the two STAR-side helpers the coordinate readers share: ``read_star_blocks`` (starfile with
its pitfalls handled) and ``resolve_data_path`` (RELION's project-relative file names).
"""

from __future__ import annotations

import glob
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import pandas as pd
import starfile

from cryopick.errors import CryopickError, InputFileError

# Columns that hold names: starfile would turn "0001" into an int without this (starfile issue #37).
NAME_COLUMNS = (
    "rlnMicrographName", "rlnMicrographCoordinates", "rlnOpticsGroupName", "rlnImageName", "rlnCtfImage",
    "rlnMicrographMetadata", "rlnMicrographNameNoDW", "rlnMicrographMovieName",
)
# Compound extensions first: "mic.mrc.gz" must lose ".mrc.gz", not be left as "mic.mrc".
_EXTENSIONS = (".mrc.bz2", ".mrc.gz", ".mrcs", ".mrc", ".tiff", ".tif", ".eer", ".star", ".cbox", ".box",
               ".txt", ".tsv")
_MICROGRAPH_GLOBS = ("*.mrc", "*.mrcs")
_GLOB_CHARACTERS = frozenset("*?[")
_MISSING_SHOWN = 5


@dataclass(frozen=True)
class MicrographEntry:
    path: Path  # the file to open (existing)
    name: str  # as the user's data names it: rlnMicrographName from a STAR, else the path as given
    pixel_size: float | None  # Å/px from the STAR's optics; None when not from a STAR (or the STAR has none)


def micrograph_stem(name: str) -> str:
    """Basename without its (known) extension: ``Movies/mic001.mrc`` → ``mic001``."""
    base = PurePosixPath(str(name).strip().replace("\\", "/")).name
    lower = base.lower()
    for extension in _EXTENSIONS:
        if lower.endswith(extension) and len(base) > len(extension):
            return base[: -len(extension)]
    return base


def read_star_blocks(path: str | Path) -> dict[str, pd.DataFrame | dict]:
    """All data blocks of a STAR file (``{}`` for RELION's 0-byte empty table), name columns kept as text."""
    path = Path(path)
    try:
        _check_block_names(path, _check_utf8(path))
        blocks = starfile.read(path, always_dict=True, parse_as_string=list(NAME_COLUMNS))
    except FileNotFoundError:
        raise InputFileError(path, "file not found") from None
    except IsADirectoryError:
        raise InputFileError(path, "is a directory, not a STAR file") from None
    except InputFileError:
        raise
    except Exception as exc:  # starfile/pandas raise many kinds (ParserError, ValueError, UnicodeDecodeError…)
        raise InputFileError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    blocks = blocks if isinstance(blocks, dict) else {"": blocks}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame) and block.columns.duplicated().any():
            twice = sorted(set(block.columns[block.columns.duplicated()]))
            raise InputFileError(path, f"data block '{name}' names column {', '.join(twice)} more than once")
    return blocks


def _check_block_names(path: Path, text: str) -> None:
    """Refuse a data block name given twice (``cat a.star b.star``): starfile would keep only the last one."""
    names = Counter(line.strip()[5:] for line in text.splitlines() if line.strip().startswith("data_"))
    repeated = sorted(name for name, count in names.items() if count > 1)
    if repeated:
        shown = ", ".join(f"data_{name}" for name in repeated)
        raise InputFileError(path, f"data block {shown} appears more than once (concatenated STAR files?); "
                                   "give each table its own file or block name")


def _check_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 anywhere are refused: starfile would read such a file as empty."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputFileError(path, f"line {line} is not UTF-8 text (byte {exc.start}); "
                                   "a STAR file must be plain text") from None


def candidate_bases(star_path: str | Path, project_dir: str | Path | None = None) -> list[Path]:
    """Directories a relative RELION file name may be relative to, in the order they are tried.

    RELION opens names relative to the project directory (its working directory); files from a job sit in
    ``<project>/Job/jobNNN/``, hence the STAR's directory, its parent and grandparent after the cwd.
    """
    if project_dir is not None:
        return [Path(project_dir)]
    star_dir = Path(os.path.abspath(star_path)).parent  # abspath also folds '..' for readable messages
    bases, seen = [], set()
    for base in (Path("."), star_dir, star_dir.parent, star_dir.parent.parent):
        if base.absolute() not in seen:
            seen.add(base.absolute())
            bases.append(base)
    return bases


def resolve_data_path(name: str, bases: Sequence[Path]) -> Path | None:
    """The existing file a RELION name refers to (absolute names as is), or None."""
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    for base in bases:
        path = base / candidate
        if path.is_file():
            return path
    return None


def describe_bases(bases: Sequence[Path]) -> str:
    return ", ".join("the current directory" if b == Path(".") else str(b) for b in bases)


def find_micrographs(spec: str | Path, project_dir: str | Path | None = None) -> list[MicrographEntry]:
    """Micrographs named by ``spec`` (directory, glob, single MRC file or micrographs STAR), sorted by name."""
    text = str(spec)
    path = Path(spec)
    if path.is_dir():
        entries = [_plain_entry(p) for pattern in _MICROGRAPH_GLOBS for p in path.glob(pattern) if p.is_file()]
        where = f"directory {text} (looked for *.mrc and *.mrcs)"
    elif path.is_file():
        entries = _entries_from_file(path, text, project_dir)
        where = text
    elif _GLOB_CHARACTERS & set(text):
        matches = sorted(m for m in glob.glob(text, recursive=True) if Path(m).is_file())
        entries = [e for m in matches for e in _entries_from_file(Path(m), m, project_dir)]
        where = f"pattern {text}"
    else:
        raise CryopickError(f"no micrographs found: {text} does not exist")
    if not entries:
        raise CryopickError(f"no micrographs found in {where}")
    return _sorted_unique(entries)


def _plain_entry(path: Path) -> MicrographEntry:
    return MicrographEntry(path=path, name=str(path), pixel_size=None)


def _entries_from_file(path: Path, name: str, project_dir) -> list[MicrographEntry]:
    if path.suffix.lower() == ".star":
        return _entries_from_star(path, project_dir)
    return [MicrographEntry(path=path, name=name, pixel_size=None)]


def _sorted_unique(entries: Iterable[MicrographEntry]) -> list[MicrographEntry]:
    unique: dict[str, MicrographEntry] = {}
    for entry in entries:
        unique.setdefault(entry.name, entry)
    return [unique[name] for name in sorted(unique)]


def _entries_from_star(star: Path, project_dir) -> list[MicrographEntry]:
    blocks = read_star_blocks(star)
    table = _micrographs_table(star, blocks)
    names = [str(n).strip() for n in table["rlnMicrographName"]]
    pixel_sizes = micrograph_pixel_sizes(blocks, table)
    bases = candidate_bases(star, project_dir)
    entries, missing = [], []
    for name, pixel_size in zip(names, pixel_sizes):
        path = resolve_data_path(name, bases)
        if path is None:
            missing.append(name)
            path = Path(name) if Path(name).is_absolute() else bases[0] / name
        entries.append(MicrographEntry(path=path, name=name, pixel_size=pixel_size))
    if missing and len(missing) < len(names):
        return entries  # a few gone: reading them fails, and extract and pick skip and list them
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN]) + (", …" if len(missing) > _MISSING_SHOWN else "")
        raise InputFileError(
            star,
            f"{len(missing)} of {len(names)} micrographs listed in rlnMicrographName do not exist: {shown} "
            f"(relative names were looked up in {describe_bases(bases)}; "
            "run from the RELION project directory or give the project directory)",
        )
    return entries


def _micrographs_table(star: Path, blocks: dict) -> pd.DataFrame:
    loops = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    preferred = [loops["micrographs"]] if "micrographs" in loops else []
    for table in preferred + list(loops.values()):
        if "rlnMicrographName" in table.columns:
            if table.empty:
                raise CryopickError(f"no micrographs found: {star} lists no micrographs")
            return table
    found = sorted({c for table in loops.values() for c in table.columns})
    raise InputFileError(
        star, f"no rlnMicrographName column, so it is not a micrographs STAR (found: {', '.join(found) or 'nothing'})"
    )


def micrograph_pixel_sizes(blocks: dict, table: pd.DataFrame) -> list[float | None]:
    """Å/px for each row of a micrographs table: optics (3.1+) or per-row columns (3.0)."""
    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame) and not optics.empty:
        return _pixel_sizes_from_optics(optics, table)
    return [_row_pixel_size(row) for row in table.to_dict("records")]


def _pixel_sizes_from_optics(optics: pd.DataFrame, table: pd.DataFrame) -> list[float | None]:
    per_group = {}
    for row in optics.to_dict("records"):
        group = _positive(row.get("rlnOpticsGroup"))
        per_group[None if group is None else int(group)] = _optics_pixel_size(row)
    if "rlnOpticsGroup" not in table.columns or len(per_group) == 1:
        only = next(iter(per_group.values())) if len(per_group) == 1 else None
        return [only] * len(table)
    groups = (_positive(g) for g in table["rlnOpticsGroup"])
    return [None if g is None else per_group.get(int(g)) for g in groups]


def _optics_pixel_size(row: dict) -> float | None:
    # RELION copies rlnImagePixelSize into rlnMicrographPixelSize for non-particle files that lack the latter.
    for column in ("rlnMicrographPixelSize", "rlnImagePixelSize", "rlnMicrographOriginalPixelSize"):
        value = _positive(row.get(column))
        if value is not None:
            return value
    return None


def _row_pixel_size(row: dict) -> float | None:
    value = _positive(row.get("rlnMicrographPixelSize"))
    if value is not None:
        return value
    detector, magnification = _positive(row.get("rlnDetectorPixelSize")), _positive(row.get("rlnMagnification"))
    if detector is not None and magnification is not None:
        return 1e4 * detector / magnification  # RELION 3.0: detector pixel in µm, pixel size in Å
    return None


def _positive(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None
