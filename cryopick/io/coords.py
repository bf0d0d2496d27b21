"""Reading particle coordinates: RELION STAR (per micrograph, coordinate_files lists, particles), EMAN/crYOLO
box, crYOLO cbox (STAR and plain text), Topaz tables and cryoSPARC ``.cs`` files. Every reader returns particle
centres in the pixels of the micrograph (x = column, y = row, 0-based), see docs/formats.md. Readers do not
print: what they skipped or dropped comes back in ``CoordinateTables.warnings`` for the command to report.
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryopick.errors import CryopickError, InputFileError
from cryopick.io.cryosparc import is_cs_file, read_cs_locations
from cryopick.io.micrographs import candidate_bases, describe_bases, read_star_blocks, resolve_data_path
from cryopick.io.pickmarker import marked_coordinate_files

COORDINATE_SUFFIXES = (".star", ".box", ".cbox", ".txt", ".tsv", ".cs")
# RELION job bookkeeping that sits beside coordinate files in a job directory and holds no coordinates.
_BOOKKEEPING_FILES = frozenset({
    "job.star", "job_pipeline.star", "default_pipeline.star", "RELION_OUTPUT_NODES.star", "note.txt",
    "run.out", "run.err",
})
_SUFFIX_NODE_PREFIX = "coords_suffix"  # RELION 3.1 suffix node: its name, not its content, says where files are
_GLOB_CHARACTERS = frozenset("*?[")
_SNIFF_BYTES = 65536
_PLACEHOLDER_FOM = -999.0  # RELION ManualPick 3.1 and old crYOLO write this when there is no figure of merit
_MISSING_SHOWN = 5


@dataclass
class CoordinateTable:
    source: Path  # file it came from
    micrograph: str | None  # micrograph named inside the file; None: matched by the file's own name
    coords: pd.DataFrame  # x, y (float64 centres, original px), score (float64, NaN when the format has none)


class CoordinateTables(list):
    """The tables read (a list of CoordinateTable) and ``warnings``: files skipped, rows dropped, one line each."""

    def __init__(self, tables=(), warnings=()):
        super().__init__(tables)
        self.warnings: list[str] = list(warnings)


class MissingCoordinatesError(InputFileError):
    """A readable file that holds no coordinate columns (e.g. a micrographs STAR beside the picks)."""


def empty_coords() -> pd.DataFrame:
    return pd.DataFrame({c: np.array([], dtype=np.float64) for c in ("x", "y", "score")})


def find_coordinate_files(spec: str | Path) -> list[Path]:
    """Coordinate files named by ``spec``: one file, a glob, or every *.star/.box/.cbox/.txt/.tsv under a directory;
    of a ``cryopick pick`` output directory only its per-micrograph STARs (not the lists, particles or copies
    in other formats that hold the same picks)."""
    text = str(spec)
    path = Path(spec)
    if path.is_file():
        return [path]
    marked = marked_coordinate_files(path) if path.is_dir() else None
    if marked is not None:
        if not marked:
            raise CryopickError(f"no coordinate files found in {text}: a cryopick pick directory without picks")
        return marked
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in COORDINATE_SUFFIXES and _is_candidate(p))
        where = f"directory {text} (looked for {', '.join('*' + s for s in COORDINATE_SUFFIXES)}, recursively)"
    elif _GLOB_CHARACTERS & set(text):
        files = sorted(Path(m) for m in glob.glob(text, recursive=True) if _is_candidate(Path(m)))
        where = f"pattern {text}"
    else:
        raise CryopickError(f"no coordinate files found: {text} does not exist")
    if not files:
        raise CryopickError(f"no coordinate files found in {where}")
    return files


def _is_candidate(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name not in _BOOKKEEPING_FILES


def read_coordinates(spec: str | Path, coord_scale: float = 1.0, *,
                     micrograph_pixel_size: float | None = None, cs_flip_y: bool = True) -> CoordinateTables:
    """Find and read every coordinate file of ``spec``.

    With several files, files without coordinate columns (a micrographs STAR in a job directory) are skipped
    and named in ``warnings``; files also listed by a coordinate_files list are read once, keeping the list's name.
    """
    files = find_coordinate_files(spec)
    tables = CoordinateTables()
    skipped = 0
    for path in files:
        try:
            found = read_coordinate_file(path, coord_scale, micrograph_pixel_size=micrograph_pixel_size,
                                         cs_flip_y=cs_flip_y)
        except MissingCoordinatesError as exc:
            if len(files) == 1:
                raise
            tables.warnings.append(f"skipping {exc}")
            skipped += 1
            continue
        tables += found
        tables.warnings += found.warnings
    if skipped == len(files):
        raise CryopickError(f"no coordinate tables found in {spec}: none of its {skipped} files holds coordinates")
    return CoordinateTables(_without_duplicates(tables), tables.warnings)


def _without_duplicates(tables: list[CoordinateTable]) -> list[CoordinateTable]:
    named_sources = {t.source.resolve() for t in tables if t.micrograph is not None}
    return [t for t in tables if t.micrograph is not None or t.source.resolve() not in named_sources]


def read_coordinate_file(path: str | Path, coord_scale: float = 1.0, *,
                         micrograph_pixel_size: float | None = None, cs_flip_y: bool = True) -> CoordinateTables:
    """The coordinate tables in one file, centres multiplied by ``coord_scale``.

    ``micrograph_pixel_size`` (Å/px of the pixels the file's coordinates are in) is only used to re-centre
    particles STAR rows by ``rlnOriginXAngst/YAngst``; by default it comes from the file's optics table
    (rlnMicrographPixelSize, else rlnMicrographOriginalPixelSize, which is wrong when MotionCorr binned).
    ``cs_flip_y``: cryoSPARC ``.cs`` fractions have a lower-left origin (see ``cryopick.io.cryosparc``).
    """
    if not (isinstance(coord_scale, (int, float)) and math.isfinite(coord_scale) and coord_scale > 0):
        raise CryopickError(f"coordinate scale must be a positive number, got {coord_scale!r}")
    warnings: list[str] = []
    tables = CoordinateTables(_read_tables(Path(path), micrograph_pixel_size, True, warnings, cs_flip_y), warnings)
    dropped = sum(int(t.coords.attrs.get("dropped_nonfinite", 0)) for t in tables)
    if dropped:
        tables.warnings.append(f"{path}: {dropped} coordinate row(s) without a finite x/y (NaN, inf or missing) "
                               "ignored")
    if coord_scale != 1.0:
        for table in tables:
            table.coords["x"] *= coord_scale
            table.coords["y"] *= coord_scale
    return tables


def _read_tables(path: Path, pixel_size: float | None, allow_list: bool,
                 warnings: list[str], cs_flip_y: bool = True) -> list[CoordinateTable]:
    """Tables in ``path``; problems that do not stop the read are appended to ``warnings``."""
    if not path.is_file():
        raise InputFileError(path, "file not found" if not path.exists() else "not a regular file")
    if path.name.startswith(_SUFFIX_NODE_PREFIX):
        return _read_suffix_node(path, warnings)
    if is_cs_file(path):  # binary numpy: before the text sniffing below
        return [CoordinateTable(path, name, _finite_rows(coords))  # non-finite rows counted as for every format
                for name, coords in read_cs_locations(path, cs_flip_y)]
    head = _read_head(path)
    if not head.strip():
        return [CoordinateTable(path, None, empty_coords())]  # RELION's empty coordinate table is a 0-byte file
    if _looks_like_star(head):
        return _read_star(path, pixel_size, allow_list, warnings)
    if path.suffix.lower() == ".star":  # a plain table would take its first line for a header: labels lost
        raise InputFileError(path, f"not a STAR file (it starts {_first_content_line(head)[:60]!r}, not data_ or "
                                   "loop_)")
    first = _first_content_line(head).split()
    if "x_coord" in first and "y_coord" in first:
        return _read_topaz_table(path)
    if {"image_name", "x_coord", "y_coord"} & set(first):
        raise InputFileError(path, f"a Topaz table needs x_coord and y_coord columns (header: {' '.join(first)})")
    suffix = path.suffix.lower()
    if suffix in (".box", ".cbox"):
        return [CoordinateTable(path, None, _read_corner_boxes(path, with_confidence=suffix == ".cbox"))]
    return [CoordinateTable(path, None, _read_plain_centres(path))]


def _read_head(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(_SNIFF_BYTES).decode("utf-8", errors="strict").removeprefix("\ufeff")  # BOM
    except UnicodeDecodeError:
        raise InputFileError(path, "not a text file (not UTF-8); expected a coordinate table") from None
    except OSError as exc:
        raise InputFileError(path, f"cannot be read ({exc.strerror or exc})") from None


def _first_content_line(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return stripped
    return ""


def _looks_like_star(text: str) -> bool:
    first = _first_content_line(text)
    return first.startswith("data_") or first.startswith("loop_")


# --- STAR ------------------------------------------------------------------------------------------------------

def _read_star(path: Path, pixel_size: float | None, allow_list: bool, warnings: list[str]) -> list[CoordinateTable]:
    blocks = read_star_blocks(path)
    loops = [block for block in blocks.values() if isinstance(block, pd.DataFrame)]
    if not blocks:
        return [CoordinateTable(path, None, empty_coords())]
    for table in loops:
        if {"rlnMicrographName", "rlnMicrographCoordinates"} <= set(table.columns):
            if not allow_list:
                raise InputFileError(path, "a coordinate_files list may not refer to another list")
            return _read_coordinate_list(path, table, pixel_size, warnings)
    _warn_extra_coordinate_blocks(path, blocks, warnings)
    for table in loops:
        if {"rlnCoordinateX", "rlnCoordinateY"} <= set(table.columns):
            if "rlnMicrographName" in table.columns:
                return _particle_tables(path, table, blocks.get("optics"), pixel_size, warnings)
            return [CoordinateTable(path, None, _relion_centres(path, table))]
    for table in loops:
        if {"CoordinateX", "CoordinateY"} <= set(table.columns):
            return [CoordinateTable(path, None, _cbox_centres(path, table))]
    found = sorted({c for table in loops for c in table.columns})
    raise MissingCoordinatesError(
        path, f"no rlnCoordinateX/rlnCoordinateY columns (found: {', '.join(found) or 'no loop tables'})"
    )


def _warn_extra_coordinate_blocks(path: Path, blocks: dict, warnings: list[str]) -> None:
    """Only the first coordinate table of a STAR is read; say so when there are more (concatenated files)."""
    names = [name for name, block in blocks.items()
             if isinstance(block, pd.DataFrame) and {"rlnCoordinateX", "rlnCoordinateY"} <= set(block.columns)]
    if len(names) > 1:
        shown = ", ".join(f"data_{n}" for n in names)
        warnings.append(f"{path}: {len(names)} coordinate tables ({shown}); only data_{names[0]} is read "
                        "(one table per file)")


def _relion_centres(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    x = _numeric(path, table, "rlnCoordinateX")
    y = _numeric(path, table, "rlnCoordinateY")
    return _coords_frame(x, y, _relion_score(path, table))


def _relion_score(path: Path, table: pd.DataFrame) -> np.ndarray:
    if "rlnAutopickFigureOfMerit" not in table.columns:
        return np.full(len(table), np.nan)
    score = _numeric(path, table, "rlnAutopickFigureOfMerit")
    if len(score) and np.all(score == _PLACEHOLDER_FOM):
        return np.full(len(table), np.nan)
    return score


def _read_coordinate_list(path: Path, table: pd.DataFrame, pixel_size: float | None,
                          warnings: list[str]) -> list[CoordinateTable]:
    """RELION 4/5 ``coordinate_files``: each row names a micrograph and the file holding its picks."""
    bases = candidate_bases(path)
    tables, missing = [], []
    for micrograph, coordinate_file in zip(table["rlnMicrographName"], table["rlnMicrographCoordinates"]):
        resolved = resolve_data_path(str(coordinate_file).strip(), bases)
        if resolved is None:
            missing.append(str(coordinate_file))
            continue
        for referenced in _read_tables(resolved, pixel_size, False, warnings):
            tables.append(CoordinateTable(resolved, str(micrograph).strip(), referenced.coords))
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN]) + (", …" if len(missing) > _MISSING_SHOWN else "")
        raise InputFileError(
            path,
            f"{len(missing)} of {len(table)} coordinate files listed in rlnMicrographCoordinates do not exist: "
            f"{shown} (looked in {describe_bases(bases)})",
        )
    return tables


def _particle_tables(path: Path, table: pd.DataFrame, optics, pixel_size: float | None,
                     warnings: list[str]) -> list[CoordinateTable]:
    """Particles STAR (3.1+ with optics, 3.0 or Topaz ``data_images`` without): one table per micrograph."""
    x, y = _recentred(path, table, optics, pixel_size, warnings)
    coords = _coords_frame(x, y, _relion_score(path, table), drop_missing=False)
    return _split_by_name(path, coords, table["rlnMicrographName"])


def _recentred(path: Path, table: pd.DataFrame, optics, pixel_size: float | None,
               warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates moved by the refined origin, as RELION re-extraction does: x - ROUND(origin / pixel size)."""
    x = _numeric(path, table, "rlnCoordinateX")
    y = _numeric(path, table, "rlnCoordinateY")
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(table.columns):
        pixel = _particle_pixel_sizes(table, optics, pixel_size)
        if pixel is None:
            warnings.append(f"{path}: has rlnOriginXAngst/YAngst but no pixel size; particles are not re-centred")
            return x, y
        shift_x = np.nan_to_num(_numeric(path, table, "rlnOriginXAngst")) / pixel
        shift_y = np.nan_to_num(_numeric(path, table, "rlnOriginYAngst")) / pixel
    elif {"rlnOriginX", "rlnOriginY"} <= set(table.columns):  # RELION 3.0: offsets in pixels
        shift_x = np.nan_to_num(_numeric(path, table, "rlnOriginX"))
        shift_y = np.nan_to_num(_numeric(path, table, "rlnOriginY"))
    else:
        return x, y
    return x - _relion_round(shift_x), y - _relion_round(shift_y)


def _relion_round(values: np.ndarray) -> np.ndarray:
    """RELION's ROUND: halves away from zero (numpy's round goes to even)."""
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def _particle_pixel_sizes(table: pd.DataFrame, optics, pixel_size: float | None) -> np.ndarray | None:
    if pixel_size is not None:
        return np.full(len(table), float(pixel_size))
    if not isinstance(optics, pd.DataFrame) or optics.empty:
        return None
    per_group = {}
    for row in optics.to_dict("records"):
        value = next((float(row[c]) for c in ("rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize",
                                              "rlnImagePixelSize") if _positive(row.get(c))), None)
        per_group[row.get("rlnOpticsGroup")] = value
    if len(per_group) == 1 or "rlnOpticsGroup" not in table.columns:
        values = np.full(len(table), next(iter(per_group.values())) or np.nan)
    else:
        values = np.array([per_group.get(g) or np.nan for g in table["rlnOpticsGroup"]], dtype=np.float64)
    return None if np.isnan(values).all() else values


def _positive(value) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def _cbox_centres(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """crYOLO >= 1.8 cbox: corner + size / 2; all picks, their confidence as score."""
    x = _numeric(path, table, "CoordinateX")
    y = _numeric(path, table, "CoordinateY")
    width = _numeric(path, table, "Width") if "Width" in table.columns else np.zeros(len(table))
    height = _numeric(path, table, "Height") if "Height" in table.columns else np.zeros(len(table))
    score = _numeric(path, table, "Confidence") if "Confidence" in table.columns else np.full(len(table), np.nan)
    return _coords_frame(x + width / 2, y + height / 2, score)


def _read_suffix_node(path: Path, warnings: list[str]) -> list[CoordinateTable]:
    """RELION 3.1 ``coords_suffix<S>``: the coordinate files are ``<its directory>/**/*<S>``."""
    suffix = path.name[len(_SUFFIX_NODE_PREFIX):]
    files = sorted(p for p in path.parent.rglob(f"*{suffix}") if p != path and _is_candidate(p)
                   and not p.name.startswith(_SUFFIX_NODE_PREFIX) and not _is_coordinate_list(p))
    if not suffix or not files:
        raise InputFileError(path, f"RELION suffix file, but no coordinate files *{suffix} beside it in {path.parent}")
    return [table for file in files for table in _read_tables(file, None, False, warnings)]


def _is_coordinate_list(path: Path) -> bool:
    """A RELION 4/5 ``coordinate_files`` list (e.g. pick's ``coordinates_<suffix>.star``), not a coordinate file."""
    head = _read_head(path)
    return _looks_like_star(head) and "_rlnMicrographCoordinates" in head


# --- plain text ------------------------------------------------------------------------------------------------

def _read_topaz_table(path: Path) -> list[CoordinateTable]:
    """Topaz ``image_name x_coord y_coord [score]`` (tab-separated); one table per image."""
    try:
        table = pd.read_csv(path, sep=r"\s+", dtype={"image_name": str}, comment=None, engine="python")
    except Exception as exc:  # pandas raises ParserError, ValueError, UnicodeDecodeError…
        raise InputFileError(path, f"not a readable Topaz coordinate table ({type(exc).__name__}: {exc})") from None
    if not isinstance(table.index, pd.RangeIndex):  # pandas takes surplus leading fields for an index
        raise InputFileError(path, f"rows have more fields than the header's {len(table.columns)} "
                                   f"({', '.join(map(str, table.columns))})")
    score = _numeric(path, table, "score") if "score" in table.columns else np.full(len(table), np.nan)
    coords = _coords_frame(_numeric(path, table, "x_coord"), _numeric(path, table, "y_coord"), score,
                           drop_missing=False)
    if "image_name" not in table.columns:
        return [CoordinateTable(path, None, _finite_rows(coords))]
    return _split_by_name(path, coords, table["image_name"])


def _split_by_name(path: Path, coords: pd.DataFrame, names: pd.Series) -> list[CoordinateTable]:
    """One table per micrograph name, in order of first appearance."""
    keys = names.astype(str).str.strip().to_numpy()
    groups = coords.groupby(keys, sort=False)
    return [CoordinateTable(path, str(name), _finite_rows(rows)) for name, rows in groups]


def _content_lines(path: Path):
    """(line number, whitespace-separated tokens) of every line that is not blank or a ``#`` comment."""
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            tokens = line.split()
            if tokens and not tokens[0].startswith("#"):
                yield number, tokens


def _floats(tokens: list[str]) -> list[float] | None:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        return None


def _read_corner_boxes(path: Path, with_confidence: bool) -> pd.DataFrame:
    """EMAN/crYOLO ``x y w h`` corners (centre = corner + size / 2, in float); old cbox adds ``confidence``."""
    rows = []
    used = 5 if with_confidence else 4  # EMAN1's 5th column is a flag, not a score
    for number, tokens in _content_lines(path):
        values = _floats(tokens[:used]) if len(tokens) >= 4 else None
        if values is None:
            found = " ".join(tokens)
            raise InputFileError(path, f"line {number}: expected numbers 'x y width height', found {found!r}")
        confidence = values[4] if len(values) > 4 else np.nan
        rows.append((values[0] + values[2] / 2, values[1] + values[3] / 2, confidence))
    return _frame_from_rows(rows)


def _read_plain_centres(path: Path) -> pd.DataFrame:
    """Any other text: ``x y`` centres per line, a header line allowed first (RELION's rule)."""
    rows = []
    for index, (number, tokens) in enumerate(_content_lines(path)):
        values = _floats(tokens[:2]) if len(tokens) >= 2 else None
        if values is None:
            if index == 0:
                continue
            raise InputFileError(path, f"line {number}: expected numbers 'x y' (particle centres), "
                                       f"found {' '.join(tokens)!r}")
        rows.append((values[0], values[1], np.nan))
    return _frame_from_rows(rows)


# --- helpers ---------------------------------------------------------------------------------------------------

def _frame_from_rows(rows: list[tuple[float, float, float]]) -> pd.DataFrame:
    if not rows:
        return empty_coords()
    array = np.asarray(rows, dtype=np.float64)
    return _coords_frame(array[:, 0], array[:, 1], array[:, 2])


def _numeric(path: Path, table: pd.DataFrame, column: str) -> np.ndarray:
    """A column as float64; NaN stays NaN, any other non-number is an error naming the file."""
    values = table[column]
    converted = pd.to_numeric(values, errors="coerce")
    failed = converted.isna() & values.notna()
    if failed.any():
        text = values[failed].astype(str).str.strip()
        bad = text[~text.str.lower().isin({"nan", "<na>", ""})]
        if len(bad):
            raise InputFileError(path, f"column {column} holds a non-numeric value {bad.iloc[0]!r}")
    return converted.to_numpy(dtype=np.float64, na_value=np.nan)


def _coords_frame(x, y, score, drop_missing: bool = True) -> pd.DataFrame:
    frame = pd.DataFrame({
        "x": np.asarray(x, dtype=np.float64),
        "y": np.asarray(y, dtype=np.float64),
        "score": np.asarray(score, dtype=np.float64),
    })
    return _finite_rows(frame) if drop_missing else frame


def _finite_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose centre is a number (unfinished picks and ``<NA>`` corners are dropped), index 0..n-1."""
    keep = np.isfinite(frame["x"].to_numpy()) & np.isfinite(frame["y"].to_numpy())
    out = frame[keep].reset_index(drop=True)
    out.attrs["dropped_nonfinite"] = int(frame.attrs.get("dropped_nonfinite", 0)) + int((~keep).sum())
    return out

