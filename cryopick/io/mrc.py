"""MRC micrographs: memory-mapped reading in every mode users meet, atomic writing."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from cryopick.errors import InputFileError
from cryopick.fsutil import atomic_path

_SUPPORTED_DTYPES = (np.int8, np.int16, np.uint16, np.float16, np.float32, np.uint8)


@dataclass(frozen=True)
class MicrographHeader:
    path: Path
    shape: tuple[int, int]  # (ny, nx): rows, columns
    pixel_size: float | None  # Å/px from the header; None when the header has none
    mode: int


def read_header(path: str | Path) -> MicrographHeader:
    """Shape, pixel size and mode of a 2-D micrograph, without reading its data."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                h = mrc.header
                if bytes(h.map) != b"MAP ":  # permissive mode reads any 1024 bytes as a header
                    raise InputFileError(path, "not an MRC file (no 'MAP ' identifier at byte 208)")
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                mode = int(h.mode)
                voxel = float(mrc.voxel_size.x)
    except InputFileError:
        raise
    except FileNotFoundError:
        raise InputFileError(path, "file not found") from None
    except (ValueError, OSError, EOFError) as exc:
        raise InputFileError(path, f"not a readable MRC file ({exc})") from None
    if nz != 1:
        raise InputFileError(path, f"holds {nz} sections; a micrograph must be a single 2-D image")
    if nx <= 0 or ny <= 0:
        raise InputFileError(path, f"invalid dimensions {nx}×{ny} in the MRC header")
    pixel_size = voxel if np.isfinite(voxel) and voxel > 0 else None
    return MicrographHeader(path, (ny, nx), pixel_size, mode)


def read_micrograph(path: str | Path) -> np.ndarray:
    """The micrograph as a 2-D float32 array ``[row, column]`` (y, x); checks size and finiteness."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(path, mode="r") as mrc:
                data = mrc.data
                if data is None:
                    raise InputFileError(path, "MRC data block could not be read")
                if data.ndim == 3:
                    if data.shape[0] != 1:
                        raise InputFileError(path, f"holds {data.shape[0]} sections; expected one 2-D micrograph")
                    data = data[0]
                if data.ndim != 2:
                    raise InputFileError(path, f"has {data.ndim} dimensions; expected a 2-D micrograph")
                if np.iscomplexobj(data):
                    raise InputFileError(path, "holds complex data (MRC mode 3/4); expected real pixels")
                image = np.array(data, dtype=np.float32)  # copy out of the map (also fixes byte order)
    except InputFileError:
        raise
    except FileNotFoundError:
        raise InputFileError(path, "file not found") from None
    except (ValueError, OSError, EOFError, TypeError) as exc:
        raise InputFileError(path, f"corrupt or truncated MRC file ({exc})") from None
    if not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise InputFileError(path, f"contains {bad} NaN/inf pixels")
    if image.size and image.min() == image.max():
        raise InputFileError(path, f"is constant (every pixel is {float(image.flat[0]):g}): no image to pick from")
    return image


def write_mrc(path: str | Path, array: np.ndarray, pixel_size: float | None = None) -> None:
    """Write a 2-D image atomically; the MRC mode follows the array dtype (float32, float16, int16, …)."""
    array = np.asarray(array)
    if array.dtype not in [np.dtype(d) for d in _SUPPORTED_DTYPES]:
        array = array.astype(np.float32)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(array))
            if pixel_size:
                mrc.voxel_size = float(pixel_size)
