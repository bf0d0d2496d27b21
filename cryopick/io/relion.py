"""Writers of the STAR files RELION reads, in RELION's own layout (see docs/formats.md)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Iterable, Sequence

import numpy as np

from cryopick.fsutil import write_text_atomic

STAR_VERSION_LINE = "# version 30001"
_JOB_DIR = re.compile(r"(^|/)[^/]+/job\d{3}/")


def relion_post(micrograph_name: str) -> str:
    """The part of ``rlnMicrographName`` after its ``Job/jobNNN/`` prefix (RELION's naming rule)."""
    match = _JOB_DIR.search(micrograph_name)
    return micrograph_name[match.end():] if match else micrograph_name


def _format_double(v: float) -> str:
    """RELION's double format: %12.6f, %12.6e for |v| < 0.001 (non-zero) or > 100000."""
    a = abs(v)
    if v != 0 and (a < 0.001 or a > 100000):
        return f"{v:12.6e}"
    return f"{v:12.6f}" if v >= 0 else f"{v:12.5f}"


def _format_value(v) -> str:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):12d}"
    if isinstance(v, (float, np.floating)):
        return _format_double(float(v))
    s = str(v)
    return f'"{s}"' if (" " in s or s == "") else s


def star_loop(block: str, columns: Sequence[str], rows: Iterable[Sequence]) -> str:
    """One RELION loop block: version line, ``data_<block>``, labels, rows each ending in a space."""
    lines = [STAR_VERSION_LINE, "", f"data_{block}", "", "loop_ "]
    lines += [f"_{c} #{i + 1} " for i, c in enumerate(columns)]
    for row in rows:
        lines.append(" ".join(_format_value(v) for v in row) + " ")
    lines.append(" ")
    return "\n".join(lines) + "\n\n"


def coordinate_star_text(x: np.ndarray, y: np.ndarray, fom: np.ndarray) -> str:
    """A per-micrograph coordinate STAR as RELION's LoG/Topaz pickers write it (centres, 0-based px)."""
    if len(x) == 0:
        return ""  # RELION writes (and reads) an empty coordinate table as a 0-byte file
    cols = ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnClassNumber", "rlnAnglePsi"]
    rows = ((float(a), float(b), float(c), 0, 0.0) for a, b, c in zip(x, y, fom))
    return star_loop("", cols, rows)


def write_coordinate_star(path, x, y, fom) -> None:
    write_text_atomic(path, coordinate_star_text(np.asarray(x), np.asarray(y), np.asarray(fom)))


def write_coordinate_files_list(path, pairs: Sequence[tuple[str, str]]) -> None:
    """RELION 4/5 ``coordinate_files`` list: micrograph name → coordinate file, paths as RELION sees them."""
    write_text_atomic(path, star_loop("coordinate_files", ["rlnMicrographName", "rlnMicrographCoordinates"], pairs))


def write_micrographs_star(path, names: Sequence[str], pixel_size: float, voltage: float = 300.0,
                           cs: float = 2.7, amplitude_contrast: float = 0.1,
                           extra: dict[str, Sequence] | None = None) -> None:
    """RELION 3.1+ micrographs STAR (``data_optics`` + ``data_micrographs``) with one optics group."""
    optics = star_loop(
        "optics",
        ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
         "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMicrographPixelSize"],
        [("opticsGroup1", 1, float(pixel_size), float(voltage), float(cs), float(amplitude_contrast),
          float(pixel_size))],
    )
    extra = extra or {}
    cols = ["rlnMicrographName", "rlnOpticsGroup", *extra]
    rows = [(n, 1, *(extra[k][i] for k in extra)) for i, n in enumerate(names)]
    write_text_atomic(path, optics + star_loop("micrographs", cols, rows))


def write_box(path, x, y, box_size: int) -> None:
    """EMAN ``.box``: corner = centre − box/2 (integer arithmetic as RELION reads it back)."""
    half = box_size // 2
    lines = [f"{int(round(a)) - half}\t{int(round(b)) - half}\t{box_size}\t{box_size}" for a, b in zip(x, y)]
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def write_topaz_table(path, rows: Sequence[tuple[str, float, float, float]]) -> None:
    """Topaz coordinate table: ``image_name x_coord y_coord score`` (name without extension)."""
    lines = ["image_name\tx_coord\ty_coord\tscore"]
    lines += [f"{PurePosixPath(n).stem}\t{int(round(a))}\t{int(round(b))}\t{s:.6f}" for n, a, b, s in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")
