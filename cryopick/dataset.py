"""The patch dataset on disk: its layout and format version, how a patch is cut, the writer and the reader.

A dataset directory holds ``chunk_NNNNN.pt`` files (plain dicts of tensors, read with
``torch.load(..., weights_only=True)``; each chunk holds patches of one split, train or val),
``labeled_micrographs.pt`` (the binned labeled micrographs, which calibrate pick's probabilities),
``extract_config.yaml`` and ``manifest.json`` (written last: a directory without it is an interrupted
extraction). A patch is the ``patch_size``² window of the binned, normalised micrograph centred on a
binned pixel; past an edge it sees the micrograph reflected (no edge repeat), as pick's dense maps do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cryopick import __version__
from cryopick.data import PatchDataset, SplitData
from cryopick.errors import CryopickError, naming
from cryopick.fsutil import load_torch_weights, save_torch_atomic, write_json_atomic
from cryopick.preprocessing import PreprocessRecord

DATASET_FORMAT = 2  # 2: adds labeled_micrographs.pt (binned labeled micrographs, for pick calibration)
MANIFEST = "manifest.json"
CONFIG_NAME = "extract_config.yaml"
LABELED_MICROGRAPHS = "labeled_micrographs.pt"
KINDS = ("positive", "unlabeled")


def is_dataset_file(name: str) -> bool:
    """Whether a file of this name belongs to a dataset directory (chunks, their temporary files, the rest)."""
    return (name in (MANIFEST, CONFIG_NAME, LABELED_MICROGRAPHS) or
            (name.startswith("chunk_") and name.endswith(".pt")) or name.startswith(".chunk_"))


# ---------------------------------------------------------------------------------------------
# patch geometry (binned pixels)


def fits_edge_padding(binned_shape: tuple[int, ...], patch_size: int) -> bool:
    """A binned micrograph must exceed half a patch on each side to be reflected by half a patch."""
    return min(binned_shape[-2:]) > patch_size // 2


def reflect_pad(binned: torch.Tensor, pad: int) -> torch.Tensor:
    """Micrograph(s) ``(…, H, W)`` padded by ``pad`` px on each side by reflection without edge repeat
    (numpy's ``mode="reflect"``, repeated when ``pad`` exceeds the image): what patches at an edge see, in
    extract, in dense training and in pick."""
    height, width = binned.shape[-2:]
    if min(height, width) < 2:
        raise CryopickError(f"binned micrograph {(height, width)} is too small to be padded by reflection")
    if pad < min(height, width):
        flat = binned.reshape(-1, 1, height, width)  # F.pad's reflect mode wants (N, C, H, W)
        padded = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
        return padded.reshape(*binned.shape[:-2], *padded.shape[-2:])
    rows, cols = _reflected_indices(height, pad, binned.device), _reflected_indices(width, pad, binned.device)
    return binned.index_select(-2, rows).index_select(-1, cols)


def _reflected_indices(size: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source index of every padded position: a triangle wave of period 2·(size − 1), as numpy reflects."""
    period = 2 * (size - 1)
    phase = torch.arange(-pad, size + pad, device=device) % period
    return torch.where(phase < size, phase, period - phase)


def crop_patches(padded: np.ndarray, centres_binned: np.ndarray, patch_size: int) -> np.ndarray:
    """Patches of ``padded`` (padded by patch_size/2) centred on integer binned pixels ``(x, y)``.

    The padded index of binned pixel c is c + patch_size/2, so the window starting at c is centred on it.
    """
    windows = np.lib.stride_tricks.sliding_window_view(padded, (patch_size, patch_size))
    centres = np.asarray(centres_binned, dtype=np.int64).reshape(-1, 2)
    return windows[centres[:, 1], centres[:, 0]]  # one gather (a copy) in C


def to_binned_pixels(xy: np.ndarray, scales: tuple[float, float]) -> np.ndarray:
    """Original-pixel centres → nearest binned pixel (x, y) integers."""
    sy, sx = scales
    return np.stack([np.rint(xy[:, 0] / sx), np.rint(xy[:, 1] / sy)], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# writing


class ChunkWriter:
    """Buffers one split's patches and writes a chunk file each time ``chunk_size`` is reached."""

    def __init__(self, dataset: "DatasetWriter", split: str):
        self.dataset, self.split = dataset, split
        self.buffers: dict[str, list] = {k: [] for k in KINDS}
        self.meta: dict[str, list] = {k: [] for k in KINDS}
        self.pending = 0

    def add(self, kind: str, patches: np.ndarray, micrograph: int, xy: np.ndarray,
            truth_distance: np.ndarray | None = None) -> None:
        start, chunk_size = 0, self.dataset.chunk_size
        while start < len(patches):
            take = min(len(patches) - start, chunk_size - self.pending)
            sl = slice(start, start + take)
            self.buffers[kind].append(patches[sl])
            td = truth_distance[sl] if truth_distance is not None else np.full(take, np.nan, np.float32)
            self.meta[kind].append((np.full(take, micrograph, np.int64), xy[sl], td))
            self.pending += take
            start += take
            if self.pending >= chunk_size:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        patches, metadata = {}, {"split": self.split, "micrograph_names": self.dataset.names}
        counts = {}
        for kind in KINDS:
            parts, size = self.buffers[kind], self.dataset.patch_size
            arr = np.concatenate(parts) if parts else np.zeros((0, size, size), np.float16)
            patches[kind] = torch.from_numpy(arr)
            counts[kind] = len(arr)
            mics = np.concatenate([m for m, _, _ in self.meta[kind]]) if parts else np.zeros(0, np.int64)
            xy = np.concatenate([c for _, c, _ in self.meta[kind]]) if parts else np.zeros((0, 2), np.float32)
            td = np.concatenate([t for _, _, t in self.meta[kind]]) if parts else np.zeros(0, np.float32)
            metadata[kind] = {
                "micrograph": torch.from_numpy(mics),
                "x": torch.from_numpy(xy[:, 0].astype(np.float32)),
                "y": torch.from_numpy(xy[:, 1].astype(np.float32)),
                "truth_distance": torch.from_numpy(td.astype(np.float32)),
            }
        self.dataset.write_chunk(self.split, {"patches": patches, "metadata": metadata}, counts)
        self.buffers = {k: [] for k in KINDS}
        self.meta = {k: [] for k in KINDS}
        self.pending = 0


class DatasetWriter:
    """Writes one dataset directory: chunks of each split as they fill, then ``finish`` writes the rest."""

    def __init__(self, out_dir: Path, patch_size: int, chunk_size: int, names: list[str]):
        self.out_dir, self.patch_size, self.chunk_size, self.names = out_dir, patch_size, chunk_size, names
        self.chunks: list[dict] = []  # manifest entries, in the order written (one numbering for both splits)
        self.counts = {s: {k: 0 for k in KINDS} for s in ("train", "val")}
        self.labeled: list[dict] = []
        self.splits = {s: ChunkWriter(self, s) for s in ("train", "val")}

    def add(self, split: str, kind: str, patches: np.ndarray, micrograph: int, xy: np.ndarray,
            truth_distance: np.ndarray | None = None) -> None:
        """Patches (n, P, P) float16 of one micrograph, their centres (n, 2) in original px."""
        self.splits[split].add(kind, patches, micrograph, xy, truth_distance)
        self.counts[split][kind] += len(patches)

    def write_chunk(self, split: str, chunk: dict, counts: dict) -> None:
        name = f"chunk_{len(self.chunks):05d}.pt"
        save_torch_atomic(self.out_dir / name, chunk)
        self.chunks.append({"file": name, "split": split, "n_positive": counts["positive"],
                            "n_unlabeled": counts["unlabeled"]})

    def add_labeled_micrograph(self, name: str, split: str, binned: np.ndarray, scales: tuple[float, float],
                                shape: tuple[int, int], labels: np.ndarray) -> None:
        """A labeled micrograph as pick sees it (binned, float16) and its labels: what calibration scores."""
        self.labeled.append({"name": name, "split": split, "binned": torch.from_numpy(binned),
                              "scales": torch.tensor(scales, dtype=torch.float64),
                              "shape": torch.tensor(shape, dtype=torch.int64),
                              "labels": torch.from_numpy(np.asarray(labels, dtype=np.float32).reshape(-1, 2))})

    def finish(self, record: PreprocessRecord, has_truth: bool, micrographs: list[dict], extra: dict) -> None:
        """The last chunks, the labeled micrographs and, last, the manifest (with ``extra`` entries)."""
        for writer in self.splits.values():
            writer.flush()
        save_torch_atomic(self.out_dir / LABELED_MICROGRAPHS, {"micrographs": self.labeled})
        counts = {s: {**c, "micrographs": sum(1 for m in micrographs if m["split"] == s and not m["error"])}
                  for s, c in self.counts.items()}
        write_json_atomic(self.out_dir / MANIFEST, {
            "format": "cryopick-dataset",
            "format_version": DATASET_FORMAT,
            "cryopick_version": __version__,
            "patch_size": self.patch_size,
            "dtype": "float16",
            "preprocess": record.to_dict(),
            "pixel_size": record.pixel_size,
            "binned_pixel_size": record.binned_pixel_size,
            "has_truth": has_truth,
            "counts": counts,
            "chunks": self.chunks,
            "micrographs": micrographs,
            **extra,
        })


# ---------------------------------------------------------------------------------------------
# reading


def _load(path: Path) -> dict:
    return load_torch_weights(path, "cryopick patch file")


def _check_chunk(path: Path, chunk: dict) -> None:
    if not isinstance(chunk, dict) or "patches" not in chunk or "metadata" not in chunk:
        raise CryopickError(f"{path}: not a cryopick patch file (expected 'patches' and 'metadata')")
    for kind in KINDS:
        t = chunk["patches"].get(kind)
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            raise CryopickError(f"{path}: patches['{kind}'] must be a tensor of shape (n, size, size)")


def _truth_distance(chunk: dict) -> torch.Tensor:
    meta = chunk["metadata"].get("unlabeled", {})
    n = len(chunk["patches"]["unlabeled"])
    td = meta.get("truth_distance") if isinstance(meta, dict) else None
    return td.float() if isinstance(td, torch.Tensor) else torch.full((n,), float("nan"))


def _micrographs(chunk: dict, kind: str) -> torch.Tensor | None:
    meta = chunk["metadata"].get(kind)
    mic = meta.get("micrograph") if isinstance(meta, dict) else None
    return mic.long() if isinstance(mic, torch.Tensor) else None


def _concat(chunks: list[dict], patch_size: int) -> SplitData:
    empty = torch.zeros((0, patch_size, patch_size), dtype=torch.float16)
    pos = [c["patches"]["positive"].to(torch.float16) for c in chunks]
    unl = [c["patches"]["unlabeled"].to(torch.float16) for c in chunks]
    td = [_truth_distance(c) for c in chunks]
    mics = {k: [_micrographs(c, k) for c in chunks] for k in KINDS}
    known = all(m is not None for ms in mics.values() for m in ms)
    pos_mic = torch.cat(mics["positive"]) if known and chunks else None
    unl_mic = torch.cat(mics["unlabeled"]) if known and chunks else None
    return SplitData(torch.cat(pos) if pos else empty, torch.cat(unl) if unl else empty,
                     torch.cat(td) if td else torch.zeros(0), pos_mic, unl_mic)


def load_dataset(path: str | Path) -> PatchDataset:
    """A dataset directory written by extract (chunks + manifest.json) or one ``preprocessed_data.pt``."""
    path = Path(path)
    if path.is_file():
        return _load_single_file(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CryopickError(f"{path}: dataset not found")
    if not manifest_path.is_file():
        hint = " (extract was interrupted: re-run it with --overwrite)" if any(path.glob("chunk_*.pt")) else ""
        raise CryopickError(f"{path}: no manifest.json, not a cryopick dataset{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CryopickError(f"{manifest_path}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != DATASET_FORMAT:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        older = isinstance(version, int) and version < DATASET_FORMAT
        why = (" (older datasets lack the binned labeled micrographs that calibrate pick's probabilities)"
               if older else "")
        raise CryopickError(f"{manifest_path}: dataset format {version} is not supported "
                            f"(expected {DATASET_FORMAT}){why}; re-run extract with --overwrite")
    try:
        with naming(manifest_path, within=path):  # a chunk's own error already names the chunk
            return _load_from_manifest(path, manifest)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        what = f"missing entry {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise CryopickError(f"{manifest_path}: damaged manifest ({what}); re-run extract with --overwrite") from None


def _load_from_manifest(path: Path, manifest: dict) -> PatchDataset:
    record = PreprocessRecord.from_dict(manifest["preprocess"])
    by_split: dict[str, list[dict]] = {"train": [], "val": []}
    for entry in manifest["chunks"]:
        if Path(entry["file"]).name != entry["file"] or entry["file"] in ("", ".", ".."):
            raise CryopickError(f"{path / MANIFEST}: chunk {entry['file']!r} is not a file name in the dataset")
        chunk_path = path / entry["file"]
        if not chunk_path.is_file():
            raise CryopickError(f"{chunk_path}: chunk listed in the manifest is missing")
        chunk = _load(chunk_path)
        _check_chunk(chunk_path, chunk)
        by_split[entry["split"]].append(chunk)
    areas = [m["binned_shape"][0] * m["binned_shape"][1] for m in manifest["micrographs"] if not m.get("error")]
    size = int(manifest["patch_size"])
    return PatchDataset(_concat(by_split["train"], size), _concat(by_split["val"], size), record,
                        bool(manifest.get("has_truth")), float(np.mean(areas)) if areas else 0.0, path)


def load_labeled_micrographs(path: str | Path) -> list[dict]:
    """The binned labeled micrographs extract kept (name, split, binned, scales, shape, labels); [] if none."""
    file = Path(path) / LABELED_MICROGRAPHS
    if not file.is_file():
        return []
    data = _load(file)
    mics = data.get("micrographs") if isinstance(data, dict) else None
    if not isinstance(mics, list):
        raise CryopickError(f"{file}: not a cryopick labeled-micrographs file")
    return mics


def dataset_fingerprint(data_dir: str | Path) -> str:
    """Identifies a dataset's content wherever it lies (its manifest and extract's config, hashed): a copy
    or a move keeps it, a new extraction with other settings changes it. A single .pt file: its resolved path."""
    path = Path(data_dir)
    if not path.is_dir():
        return str(path.resolve())
    digest = hashlib.sha256()
    for name in (MANIFEST, CONFIG_NAME):
        file = path / name
        digest.update(file.read_bytes() if file.is_file() else b"")
    return digest.hexdigest()[:16]


def dataset_micrographs(data_dir: str | Path) -> str | None:
    """The micrographs argument extract was given, as recorded in the dataset's manifest (None if unknown)."""
    try:
        manifest = json.loads((Path(data_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return (manifest.get("inputs") or {}).get("micrographs")


def _load_single_file(path: Path) -> PatchDataset:
    """One file of the chunk layout; its metadata must carry 'preprocess' and may carry a 'split'.

    Without per-micrograph splits, every 5th micrograph (by index) is held out for validation.
    """
    data = _load(path)
    _check_chunk(path, data)
    meta = data["metadata"]
    if "preprocess" not in meta:
        raise CryopickError(f"{path}: metadata has no 'preprocess' record (needed so pick repeats the binning)")
    record = PreprocessRecord.from_dict(meta["preprocess"])
    split = meta.get("split")
    if split in ("train", "val"):
        whole = _concat([data], record.patch_size)
        other = _concat([], record.patch_size)
        train, val = (whole, other) if split == "train" else (other, whole)
    else:
        train, val = _split_by_micrograph(data, record.patch_size)
    area = float(meta.get("mean_binned_area", 0.0))
    return PatchDataset(train, val, record, bool(meta.get("has_truth", False)), area, path)


def _split_by_micrograph(data: dict, patch_size: int) -> tuple[SplitData, SplitData]:
    meta = data["metadata"]
    parts = {}
    for kind in KINDS:
        mic = meta.get(kind, {}).get("micrograph") if isinstance(meta.get(kind), dict) else None
        n = len(data["patches"][kind])
        mic = mic if isinstance(mic, torch.Tensor) else torch.zeros(n, dtype=torch.long)
        parts[kind] = (mic % 5 == 4)
    td = _truth_distance(data)

    def take(val: bool) -> SplitData:
        mp, mu = parts["positive"] == val, parts["unlabeled"] == val
        pos_mic, unl_mic = _micrographs(data, "positive"), _micrographs(data, "unlabeled")
        return SplitData(data["patches"]["positive"][mp].half(), data["patches"]["unlabeled"][mu].half(), td[mu],
                         pos_mic[mp] if pos_mic is not None else None,
                         unl_mic[mu] if unl_mic is not None else None)

    return take(False), take(True)
