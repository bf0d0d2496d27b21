"""cryoSPARC particle locations: ``.cs`` files (numpy structured arrays saved with ``np.save``).

A ``.cs`` file from Manual Picker, Inspect Picks, Extract or any particles output holds one row per particle
with ``location/micrograph_path`` (bytes), ``location/micrograph_shape`` (``[ny, nx]``: rows, columns),
``location/center_x_frac`` and ``location/center_y_frac`` (the particle centre as a fraction of the
micrograph's width and height). x is ``center_x_frac · nx`` (pyem ``metadata/cryosparc2.py
cryosparc_2_cs_particle_locations`` multiplies by ``shape[::-1]``, its always-on "swapxy").

The y axis: cryoSPARC puts the origin at the lower left, so for the micrograph file it picked on, the RELION
row is ``y = (1 − center_y_frac) · ny``; cryoSPARC's Import Particles applies the same inversion to RELION
STAR coordinates (pyem#81 and #101, by pyem's author, who made this pyem's default). That is our default
(``flip_y=True``), and :func:`write_cs` inverts back, so its ``.cs`` and cryoSPARC agree. pyem#81 adds that
Patch Motion writes micrographs upside down relative to MotionCor2/RELION: picks made on Patch Motion output,
used with RELION's motion-corrected micrographs of the same movies, need ``flip_y=False``.

cryoSPARC prefixes the micrographs it imports with a numeric id and an underscore
(``J1/imported/012345678901234567_mic001.mrc``) and adds suffixes such as ``_patch_aligned_doseweighted``;
:mod:`cryopick.io.matching` strips the id when matching names, so the original names still match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cryopick.errors import InputFileError
from cryopick.fsutil import atomic_path

PATH_FIELD = "location/micrograph_path"
SHAPE_FIELD = "location/micrograph_shape"
X_FIELD = "location/center_x_frac"
Y_FIELD = "location/center_y_frac"
SCORE_FIELD = "pick_stats/ncc_score"  # cryoSPARC's pickers' score; optional
REQUIRED_FIELDS = (PATH_FIELD, SHAPE_FIELD, X_FIELD, Y_FIELD)
NUMPY_MAGIC = b"\x93NUMPY"


def is_cs_file(path: str | Path) -> bool:
    """A ``.cs`` name, or any file that starts with numpy's ``.npy`` magic."""
    path = Path(path)
    return path.suffix.lower() == ".cs" or is_numpy_file(path)


def is_numpy_file(path: Path) -> bool:
    """Whether the file starts with numpy's ``.npy`` magic."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(NUMPY_MAGIC)) == NUMPY_MAGIC
    except OSError:
        return False


def load_cs(path: str | Path) -> np.ndarray:
    """The structured array of a ``.cs`` file, checked for the location fields."""
    path = Path(path)
    if path.is_file() and not is_numpy_file(path):
        raise InputFileError(path, "not a numpy .cs file (no .npy header); export the particles .cs from cryoSPARC")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputFileError(path, "file not found") from None
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputFileError(path, "holds Python objects (pickled); cryopick reads plain numpy .cs files "
                                       "as cryoSPARC exports them") from None
        raise InputFileError(path, f"not a numpy .cs file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputFileError(path, f"cannot be read as a numpy .cs file ({exc})") from None
    names = array.dtype.names or ()
    missing = [f for f in REQUIRED_FIELDS if f not in names]
    if missing:
        found = ", ".join(names[:12]) + (", …" if len(names) > 12 else "") if names else "no named fields"
        raise InputFileError(path, f"no particle locations: missing {', '.join(missing)} (found: {found}); "
                                   "export a particles .cs (Manual Picker, Inspect Picks or Extract output)")
    return np.atleast_1d(array)


def read_cs_locations(path: str | Path, flip_y: bool = True) -> list[tuple[str, pd.DataFrame]]:
    """``(micrograph path, centres)`` per micrograph of a ``.cs`` file, in order of first appearance.

    Centres are a frame with ``x``, ``y`` (original micrograph pixels, RELION's row convention) and
    ``score`` (NaN when absent); ``flip_y``: cryoSPARC's lower-left origin (see the module docstring).
    Rows without a finite centre are kept: ``io.coords`` drops and counts them as for every format.
    """
    path = Path(path)
    array = load_cs(path)
    if len(array) == 0:
        raise InputFileError(path, "holds no particles (0 rows)")
    try:
        shapes = np.asarray(array[SHAPE_FIELD], dtype=np.float64).reshape(len(array), -1)
        fx = np.asarray(array[X_FIELD], dtype=np.float64)
        fy = np.asarray(array[Y_FIELD], dtype=np.float64)
        score = (np.asarray(array[SCORE_FIELD], dtype=np.float64) if SCORE_FIELD in array.dtype.names
                 else np.full(len(array), np.nan))
    except (TypeError, ValueError) as exc:
        raise InputFileError(path, f"particle location fields are not numbers ({exc})") from None
    if shapes.shape[1] != 2 or np.any(shapes <= 0):
        raise InputFileError(path, f"{SHAPE_FIELD} must hold two positive sizes [ny, nx] per particle")
    if flip_y:
        fy = 1.0 - fy
    frame = pd.DataFrame({"x": fx * shapes[:, 1], "y": fy * shapes[:, 0], "score": score})
    names = np.array([_text(v) for v in array[PATH_FIELD]], dtype=object)
    return [(str(name), rows.reset_index(drop=True)) for name, rows in frame.groupby(names, sort=False)]


def _text(value) -> str:
    return value.decode("utf-8", errors="replace").strip() if isinstance(value, bytes) else str(value).strip()


def write_cs(path: str | Path, rows: Sequence[tuple[str, tuple[int, int], np.ndarray, np.ndarray, np.ndarray]],
             flip_y: bool = True) -> None:
    """Write picks as a cryoSPARC particles ``.cs`` (atomically).

    ``rows``: ``(micrograph name, (ny, nx), x, y, score)`` per micrograph, centres in original pixels
    (RELION rows); ``flip_y`` writes cryoSPARC's lower-left-origin fractions, as :func:`read_cs_locations`.
    """
    names, shapes, fx, fy, scores = [], [], [], [], []
    for name, (ny, nx), x, y, score in rows:
        n = len(x)
        names += [str(name).encode("utf-8")] * n
        shapes += [(ny, nx)] * n
        fx.append(np.asarray(x, dtype=np.float64) / nx)
        fy.append(np.asarray(y, dtype=np.float64) / ny)
        scores.append(np.asarray(score, dtype=np.float64))
    total = len(names)
    width = max((len(n) for n in names), default=1)
    dtype = [("uid", "<u8"), (PATH_FIELD, f"S{width}"), (SHAPE_FIELD, "<u4", (2,)), (X_FIELD, "<f4"),
             (Y_FIELD, "<f4"), (SCORE_FIELD, "<f4")]
    array = np.zeros(total, dtype=dtype)
    if total:
        frac_y = np.concatenate(fy)
        array["uid"] = np.arange(1, total + 1, dtype=np.uint64)
        array[PATH_FIELD] = names
        array[SHAPE_FIELD] = np.asarray(shapes, dtype=np.uint32)
        array[X_FIELD] = np.concatenate(fx)
        array[Y_FIELD] = 1.0 - frac_y if flip_y else frac_y
        array[SCORE_FIELD] = np.concatenate(scores)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # a file object: np.save would append ".npy" to a name
            np.save(handle, array, allow_pickle=False)
