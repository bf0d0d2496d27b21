"""Training data: load an extracted dataset into memory and sample P:U batches from it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cryopick.errors import CryopickError
from cryopick.preprocessing import PreprocessRecord

DATASET_FORMAT = 2  # 2: adds labelled_micrographs.pt (binned labelled micrographs, for pick calibration)
LABELLED_MICROGRAPHS = "labelled_micrographs.pt"


@dataclass
class SplitData:
    positive: torch.Tensor  # (n_p, P, P) float16
    unlabeled: torch.Tensor  # (n_u, P, P) float16
    unlabeled_truth_distance: torch.Tensor  # (n_u,) original px to the nearest true particle; NaN when unknown
    positive_micrograph: torch.Tensor | None = None  # (n_p,) micrograph index; None when unknown
    unlabeled_micrograph: torch.Tensor | None = None  # (n_u,)

    def to(self, device: torch.device) -> "SplitData":
        return SplitData(self.positive.to(device), self.unlabeled.to(device), self.unlabeled_truth_distance.to(device),
                         self.positive_micrograph, self.unlabeled_micrograph)

    def unlabeled_from_labelled_micrographs(self) -> "SplitData":
        """Only the unlabeled patches of micrographs that also gave positives (unchanged when unknown)."""
        if self.positive_micrograph is None or self.unlabeled_micrograph is None:
            return self
        keep = torch.isin(self.unlabeled_micrograph, torch.unique(self.positive_micrograph))
        idx = keep.nonzero()[:, 0]
        return SplitData(self.positive, self.unlabeled[idx.to(self.unlabeled.device)],
                         self.unlabeled_truth_distance[idx.to(self.unlabeled_truth_distance.device)],
                         self.positive_micrograph, self.unlabeled_micrograph[idx])


@dataclass
class PatchDataset:
    train: SplitData
    val: SplitData
    record: PreprocessRecord
    has_truth: bool
    mean_binned_area: float  # binned px² per micrograph, for the prior from expected particles
    source: Path


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CryopickError(f"{path}: not a readable cryopick patch file ({str(exc).splitlines()[0]})") from None


def _check_chunk(path: Path, chunk: dict) -> None:
    if not isinstance(chunk, dict) or "patches" not in chunk or "metadata" not in chunk:
        raise CryopickError(f"{path}: not a cryopick patch file (expected 'patches' and 'metadata')")
    for kind in ("positive", "unlabeled"):
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
    mics = {k: [_micrographs(c, k) for c in chunks] for k in ("positive", "unlabeled")}
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
    manifest_path = path / "manifest.json"
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
        why = (" (older datasets lack the binned labelled micrographs that calibrate pick's probabilities)"
               if older else "")
        raise CryopickError(f"{manifest_path}: dataset format {version} is not supported "
                            f"(expected {DATASET_FORMAT}){why}; re-run extract with --overwrite")
    try:
        return _load_from_manifest(path, manifest)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CryopickError(f"{manifest_path}: damaged manifest (missing or bad entry {exc}); re-run extract "
                            "with --overwrite") from None


def _load_from_manifest(path: Path, manifest: dict) -> PatchDataset:
    record = PreprocessRecord.from_dict(manifest["preprocess"])
    by_split: dict[str, list[dict]] = {"train": [], "val": []}
    for entry in manifest["chunks"]:
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


def load_labelled_micrographs(path: str | Path) -> list[dict]:
    """The binned labelled micrographs extract kept (name, split, binned, scales, shape, labels); [] if none."""
    file = Path(path) / LABELLED_MICROGRAPHS
    if not file.is_file():
        return []
    data = _load(file)
    mics = data.get("micrographs") if isinstance(data, dict) else None
    if not isinstance(mics, list):
        raise CryopickError(f"{file}: not a cryopick labelled-micrographs file")
    return mics


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
    for kind in ("positive", "unlabeled"):
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


def batch_composition(batch_size: int, ratio: list[int]) -> tuple[int, int]:
    """(positives, unlabeled) per batch: ``batch_size`` patches split by the P:U ratio."""
    if len(ratio) != 2 or min(ratio) <= 0:
        raise CryopickError(f"data.batch_ratio must be two positive numbers P U, got {ratio}")
    n_p = max(1, int(round(batch_size * ratio[0] / (ratio[0] + ratio[1]))))
    n_u = batch_size - n_p
    if n_u < 1:
        raise CryopickError(f"batch size {batch_size} is too small for P:U = {ratio[0]}:{ratio[1]}")
    return n_p, n_u


class PUBatchSampler:
    """Index batches: an epoch is one pass over the larger of the two sets (by default), so every
    positive is seen at least once per epoch; positives are cycled through fresh permutations.

    The order depends only on (seed, epoch), so a resumed run can skip to any step of an epoch.
    Under DDP each rank takes every ``world``-th batch.
    """

    def __init__(self, n_pos: int, n_unl: int, n_p: int, n_u: int, seed: int, steps_per_epoch: int | None = None,
                 rank: int = 0, world: int = 1):
        if n_pos == 0 or n_unl == 0:
            raise CryopickError(f"training needs positives and unlabeled patches (have {n_pos} and {n_unl})")
        self.n_pos, self.n_unl, self.n_p, self.n_u = n_pos, n_unl, n_p, n_u
        self.seed, self.rank, self.world = seed, rank, world
        default = math.ceil(max(n_pos / n_p, n_unl / n_u))
        self.global_steps = max(world, steps_per_epoch or default)
        self.steps_per_epoch = self.global_steps // world

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        pos = self._stream(self.n_pos, self.n_p * self.global_steps, g)
        unl = self._stream(self.n_unl, self.n_u * self.global_steps, g)
        for step in range(self.rank, self.steps_per_epoch * self.world, self.world):
            yield pos[step * self.n_p:(step + 1) * self.n_p], unl[step * self.n_u:(step + 1) * self.n_u]

    @staticmethod
    def _stream(n: int, length: int, g: torch.Generator) -> torch.Tensor:
        reps = math.ceil(length / n)
        return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:length]
