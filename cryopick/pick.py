"""``cryopick pick``: dense scoring of whole micrographs, peaks, NMS, RELION coordinate files.

Each micrograph gets the checkpoint's own preprocessing (binning to the trained binned pixel
size, normalisation), is reflect-padded by half a patch (as extract pads edge patches) and scored
once by the classifier's fully convolutional ``score_map``. Map sample ``(i, j)`` is the logit of
the patch centred on binned pixel ``(i·OS − pad, j·OS − pad)``, i.e. original pixel
``x = (j·OS − pad)·sx``. Local maxima of the map, refined below the stride by a quadratic fit, are
thresholded on probability σ(logit) and thinned by greedy NMS in original pixels.

Output directory layout (RELION 3.1/4/5, see shared/docs/formats.md §1.2-1.6):
``<post of rlnMicrographName without extension>_<suffix>.star`` per micrograph (0 bytes when empty),
``coords_suffix_<suffix>.star`` (3.1 suffix node: the micrographs STAR's path), and
``coordinates_<suffix>.star`` (4/5 ``coordinate_files`` list for ``--coord_list``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from rich.table import Table
from scipy.special import expit

from cryopick import __version__
from cryopick.calibrate import Calibration
from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.config import PickConfig, dump_yaml, validate
from cryopick.dataset import fits_edge_padding, reflect_pad
from cryopick.device import resolve_device
from cryopick.errors import CryopickError, InputFileError
from cryopick.fsutil import check_output_dir, discard_dir, safe_join, write_json_atomic, write_text_atomic
from cryopick.io.cryosparc import write_cs
from cryopick.io.micrographs import MicrographEntry, find_micrographs, read_star_blocks
from cryopick.io.mrc import read_header, read_micrograph
from cryopick.io.relion import (
    relion_post,
    star_loop,
    write_box,
    write_coordinate_files_list,
    write_coordinate_star,
    write_micrographs_star,
    write_topaz_table,
)
from cryopick.model import PatchClassifier
from cryopick.nms import greedy_nms, local_maxima, refine_peaks
from cryopick.preprocessing import PreprocessRecord, micrograph_factor, micrograph_pixel_size, preprocess
from cryopick.preview import preview_image, write_png
from cryopick.progress import console, info, progress_bar, warn
from cryopick.report import next_steps_pick, pick_count_lines, pick_counts

MARKER_NAME = ".cryopick_pick.json"
MARKER_GLOB = ".cryopick_pick*.json"
CONFIG_NAME = "pick_config.yaml"
PREVIEW_DIR = "preview"
HISTOGRAM_BINS = 10
PIXEL_SIZE_TOLERANCE = 1e-3  # relative difference below which pixel sizes count as equal
STAGING_PREFIX = ".cryopick_pick.staging"
# the settings that change which picks are written: a rerun into the same --out must use the same ones
PROVENANCE_KEYS = ("threshold", "radius", "radius_px", "edge", "max_picks", "pixel_size", "suffix")


# ---------------------------------------------------------------------------------------------
# geometry: score-map samples ↔ original micrograph pixels


@dataclass(frozen=True)
class MapGeometry:
    """Where score-map samples of one micrograph lie: sample (i, j) ↔ binned (i·OS − pad, j·OS − pad)."""

    output_stride: int
    pad: int  # binned px of reflection padding on each side
    scales: tuple[float, float]  # (sy, sx): original px per binned px, from preprocess

    def to_original(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """Original-pixel centres ``(x, y)`` of (fractional) map indices."""
        sy, sx = self.scales
        x_binned = np.asarray(cols, dtype=np.float64) * self.output_stride - self.pad
        y_binned = np.asarray(rows, dtype=np.float64) * self.output_stride - self.pad
        return x_binned * sx, y_binned * sy

    def to_map(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Fractional map indices ``(rows, cols)`` of original-pixel centres (inverse of ``to_original``)."""
        sy, sx = self.scales
        rows = (np.asarray(y, dtype=np.float64) / sy + self.pad) / self.output_stride
        cols = (np.asarray(x, dtype=np.float64) / sx + self.pad) / self.output_stride
        return rows, cols


def receptive_field(model: PatchClassifier) -> int:
    """Input pixels one score-map sample sees (main path of the backbone; shortcuts see less)."""
    size, jump = 1, 1
    for name, module in model.backbone.named_modules():
        if ".shortcut" in name or not isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            continue
        kernel, dilation, stride = (_first(getattr(module, a)) for a in ("kernel_size", "dilation", "stride"))
        size += (kernel - 1) * dilation * jump
        jump *= stride
    return size


def _first(value) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def tile_margin(model: PatchClassifier) -> int:
    """Context each tile needs beyond the samples it keeps: half the receptive field, on the stride grid."""
    stride = model.output_stride
    half = math.ceil((receptive_field(model) - 1) / 2)
    return stride * math.ceil(half / stride)


# ---------------------------------------------------------------------------------------------
# dense scoring


def tiled_score_map(model: PatchClassifier, padded: torch.Tensor, tile_size: int, margin: int) -> torch.Tensor:
    """``model.score_map`` of ``padded`` (N, 1, H, W), computed on tiles of at most ``tile_size`` px.

    Tiles start on the stride grid and overlap by ``margin`` (≥ half the receptive field), so every
    kept sample sees exactly the input it would see untiled: the stitched map equals the untiled one.
    """
    stride = model.output_stride
    height, width = padded.shape[-2:]
    if height <= tile_size and width <= tile_size:
        return model.score_map(padded).float()
    core = (tile_size - 2 * margin) // stride * stride
    if core < stride:
        raise CryopickError(
            f"tile size {tile_size} px is too small: tiles need {margin} px of context on each side "
            f"for this network; use at least {2 * margin + stride}"
        )
    out = torch.empty((padded.shape[0], math.ceil(height / stride), math.ceil(width / stride)),
                      dtype=torch.float32, device=padded.device)
    for r0 in range(0, height, core):
        for c0 in range(0, width, core):
            r_lo, c_lo = max(0, r0 - margin), max(0, c0 - margin)
            tile = padded[..., r_lo: min(height, r0 + core + margin), c_lo: min(width, c0 + core + margin)]
            tile_map = model.score_map(tile).float()
            i0, j0 = r0 // stride, c0 // stride
            i1, j1 = min(out.shape[1], (r0 + core) // stride), min(out.shape[2], (c0 + core) // stride)
            k0, l0 = (r0 - r_lo) // stride, (c0 - c_lo) // stride
            out[:, i0:i1, j0:j1] = tile_map[:, k0: k0 + i1 - i0, l0: l0 + j1 - j0]
    return out


def dense_score_map(model: PatchClassifier, binned: torch.Tensor, pad: int, tile_size: int = 1 << 30,
                    margin: int | None = None) -> torch.Tensor:
    """Logit maps ``(N, H', W')`` of binned micrographs ``(N, H, W)`` (see ``MapGeometry``)."""
    padded = reflect_pad(binned[:, None], pad)
    return tiled_score_map(model, padded, tile_size, tile_margin(model) if margin is None else margin)


class DenseScorer:
    """The model on its device: bf16 autocast and channels-last on CUDA, float32 maps back on the CPU."""

    def __init__(self, model: PatchClassifier, device: torch.device, pad: int, tile_size: int, amp: bool):
        self.cuda = device.type == "cuda"
        self.device = device
        self.model = model.to(device).eval()
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pad = pad
        self.tile_size = tile_size
        self.margin = tile_margin(model)
        self.amp = amp and self.cuda

    @torch.inference_mode()
    def __call__(self, binned: torch.Tensor) -> np.ndarray:
        x = reflect_pad(binned[:, None].to(self.device, non_blocking=True), self.pad)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        try:
            with autocast:
                maps = tiled_score_map(self.model, x, self.tile_size, self.margin)
        except torch.cuda.OutOfMemoryError:
            raise CryopickError(
                f"out of GPU memory scoring {tuple(binned.shape)} binned micrographs; "
                "lower batch_size or tile_size"
            ) from None
        return maps.float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# picks from one score map


@dataclass(frozen=True)
class Picks:
    """Centres in original pixels (x = column, y = row) and probabilities, best first."""

    x: np.ndarray
    y: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def take(self, index) -> "Picks":
        return Picks(self.x[index], self.y[index], self.score[index])


def candidate_picks(logits: np.ndarray, geometry: MapGeometry, binned_shape: tuple[int, int],
                    shape: tuple[int, int], radius_px: float, edge: float = 0.0) -> Picks:
    """Every peak of the map inside the micrograph and ``edge`` px from its border, after NMS.

    Thresholding afterwards gives the same picks as thresholding first: greedy NMS only lets a
    pick be suppressed by a better one.
    """
    rows, cols = local_maxima(logits)
    y_binned = rows * geometry.output_stride - geometry.pad
    x_binned = cols * geometry.output_stride - geometry.pad
    inside = (y_binned >= 0) & (y_binned < binned_shape[0]) & (x_binned >= 0) & (x_binned < binned_shape[1])
    rows, cols = rows[inside], cols[inside]
    drow, dcol = refine_peaks(logits, rows, cols)
    x, y = geometry.to_original(rows + drow, cols + dcol)
    # RELION's Extract truncates coordinates to integers; rounding here centres its boxes on the nearest pixel
    x = np.clip(np.rint(x), 0, shape[1] - 1)
    y = np.clip(np.rint(y), 0, shape[0] - 1)
    score = expit(logits[rows, cols].astype(np.float64))
    away = away_from_edges(x, y, shape, edge)
    candidates = Picks(x[away], y[away], score[away])
    return candidates.take(greedy_nms(candidates.x, candidates.y, candidates.score, radius_px))


def away_from_edges(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], edge: float) -> np.ndarray:
    """Mask of centres whose RELION box of edge ``2·edge`` lies inside the micrograph.

    RELION cuts ``x − B/2 … x + B/2 − 1``, so a box of B = 2·edge fits for ``edge ≤ x ≤ nx − edge``.
    """
    return (x >= edge) & (x <= shape[1] - edge) & (y >= edge) & (y <= shape[0] - edge)


def select_picks(candidates: Picks, threshold: float, max_picks: int | None = None) -> Picks:
    """Candidates (best first) with probability ≥ ``threshold``, at most ``max_picks`` of them."""
    kept = candidates.take(candidates.score >= threshold)
    return kept.take(slice(0, max_picks)) if max_picks is not None else kept


def threshold_for_expected(scores: np.ndarray, n_micrographs: int, expected: float) -> float | None:
    """Probability threshold giving about ``expected`` picks per micrograph over ``scores``."""
    wanted = int(round(expected * n_micrographs))
    if n_micrographs == 0 or wanted <= 0 or len(scores) == 0:
        return None
    ordered = np.sort(np.asarray(scores))[::-1]
    return float(ordered[min(wanted, len(ordered)) - 1])


def score_histogram(scores: np.ndarray) -> list[int]:
    counts, _ = np.histogram(np.asarray(scores, dtype=np.float64), bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return [int(c) for c in counts]


# ---------------------------------------------------------------------------------------------
# set-up: device, shards, sizes, output names


def parse_shard(spec: str | None, environ=os.environ) -> tuple[int, int]:
    """``"i/n"`` → (i, n); without one, torchrun's RANK/WORLD_SIZE when WORLD_SIZE > 1, else (0, 1)."""
    if spec is None:
        world = int(environ.get("WORLD_SIZE", "1") or 1)
        return (int(environ.get("RANK", "0") or 0), world) if world > 1 else (0, 1)
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not match:
        raise CryopickError(f"shard '{spec}' must look like i/n, e.g. 0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise CryopickError(f"shard '{spec}': need 0 ≤ i < n")
    return index, count


def shard_items(items: list, index: int, count: int) -> list:
    """Item k of the (sorted) list belongs to shard k mod n."""
    return [item for k, item in enumerate(items) if k % count == index]


def nms_radius_px(config: PickConfig, record: PreprocessRecord, pixel_size: float) -> float:
    """--radius-px, else --radius Å, else half the trained particle diameter, in original px."""
    if config.radius_px is not None:
        return float(config.radius_px)
    radius_A = config.radius if config.radius is not None else record.diameter_A / 2
    return float(radius_A) / pixel_size


def box_size_px(record: PreprocessRecord, pixel_size: float) -> int:
    """Box edge in original px: the particle diameter."""
    return max(1, int(round(record.diameter_A / pixel_size)))


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


@dataclass(frozen=True)
class ListFiles:
    """Names of the run-level files in the output directory."""

    suffix: str

    @property
    def coords_suffix(self) -> str:
        return f"coords_suffix_{self.suffix}.star"

    @property
    def coordinate_list(self) -> str:
        return f"coordinates_{self.suffix}.star"

    @property
    def micrographs(self) -> str:
        return f"micrographs_{self.suffix}.star"

    @property
    def topaz(self) -> str:
        return f"topaz_{self.suffix}.txt"

    @property
    def particles(self) -> str:
        return f"particles_{self.suffix}.star"

    @property
    def cryosparc(self) -> str:
        return f"particles_{self.suffix}.cs"

    def all(self) -> list[str]:
        return [self.coords_suffix, self.coordinate_list, self.micrographs, self.topaz, self.particles,
                self.cryosparc, CONFIG_NAME]


def plan_outputs(entries: list[MicrographEntry], suffix: str, reserved: Iterable[str]
                 ) -> tuple[list[PlannedMicrograph], dict[str, str]]:
    """Coordinate file of each micrograph; names that clash with another's output fail."""
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
    if any(".." in PurePosixPath(p.entry.name).parts for p in planned):
        warn("micrograph names containing '..' are written without it; RELION 3.1's coords_suffix lookup "
             "will not find those files (RELION 4/5 --coord_list with the coordinates list will)")
    return planned, failed


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
            files, producer = _read_marker(marker)
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
                       if m in self.produced_by and not _same_producer(self.produced_by.get(m), producer)})

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


def _read_marker(path: Path) -> tuple[set[str], dict | None]:
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError("files is not a list of names")
        producer = data.get("produced_by")
        if producer is not None and not isinstance(producer, dict):
            raise TypeError("produced_by is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CryopickError(f"{path}: damaged cryopick pick marker ({exc}); remove it to continue") from None
    return set(files), producer


def producer_record(model: str | Path, config: PickConfig) -> dict:
    """What decides the picks: the checkpoint's content (SHA-256) and the pick settings that select them."""
    digest = hashlib.sha256()
    with open(model, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"checkpoint_sha256": digest.hexdigest(), "checkpoint": str(model),
            "settings": {k: getattr(config, k) for k in PROVENANCE_KEYS}}


def _same_producer(a: dict | None, b: dict) -> bool:
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
# background loading and batching


@dataclass
class LoadedMicrograph:
    plan: PlannedMicrograph
    binned: torch.Tensor  # (H, W) float32, CPU
    scales: tuple[float, float]
    shape: tuple[int, int]  # original (ny, nx)
    pixel_size: float
    pixel_size_known: bool


@dataclass(frozen=True)
class LoadFailure:
    plan: PlannedMicrograph
    reason: str


def load_micrograph(plan: PlannedMicrograph, record: PreprocessRecord, config: PickConfig) -> LoadedMicrograph:
    """Read and preprocess exactly as training did, at the trained binned pixel size."""
    header = read_header(plan.entry.path)
    pixel_size = micrograph_pixel_size(config.pixel_size, plan.entry.pixel_size, header.pixel_size)
    image = read_micrograph(plan.entry.path)
    binned, scales = preprocess(image, micrograph_factor(record, pixel_size))
    if not fits_edge_padding(binned.shape, record.patch_size):
        raise InputFileError(plan.entry.path, f"too small: {tuple(binned.shape)} binned px, needs more than "
                             f"{record.patch_size // 2}")
    return LoadedMicrograph(plan, binned, scales, tuple(image.shape), pixel_size or record.pixel_size,
                            pixel_size is not None)


def _load_or_fail(plan: PlannedMicrograph, record: PreprocessRecord, config: PickConfig
                  ) -> LoadedMicrograph | LoadFailure:
    try:
        return load_micrograph(plan, record, config)
    except InputFileError as exc:
        return LoadFailure(plan, exc.problem)
    except (CryopickError, ValueError, RuntimeError, OSError, MemoryError) as exc:
        return LoadFailure(plan, f"{type(exc).__name__}: {exc}")


def iter_loaded(plans: list[PlannedMicrograph], record: PreprocessRecord, config: PickConfig
                ) -> Iterator[LoadedMicrograph | LoadFailure]:
    """Loaded micrographs in order; ``config.workers`` threads read ahead while the caller scores."""
    if config.workers <= 0:
        for plan in plans:
            yield _load_or_fail(plan, record, config)
        return
    lookahead = max(2 * config.workers, 2 * config.batch_size)
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="cryopick-load")
    try:
        pending: deque = deque()
        upcoming = iter(plans)
        for plan in upcoming:
            pending.append(pool.submit(_load_or_fail, plan, record, config))
            if len(pending) >= lookahead:
                break
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(_load_or_fail, following, record, config))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_batches(loaded: Iterable[LoadedMicrograph | LoadFailure], batch_size: int
                 ) -> Iterator[list[LoadedMicrograph] | LoadFailure]:
    """Consecutive micrographs of one binned shape, up to ``batch_size`` at a time; failures alone."""
    batch: list[LoadedMicrograph] = []
    for item in loaded:
        if isinstance(item, LoadFailure):
            yield item
            continue
        if batch and (len(batch) >= batch_size or batch[0].binned.shape != item.binned.shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class PickSummary:
    counts: dict[str, int] = field(default_factory=dict)  # micrograph name → picks written this run
    skipped: list[str] = field(default_factory=list)  # coordinate file already there (rerun without --overwrite)
    failed: dict[str, str] = field(default_factory=dict)  # micrograph name → reason
    threshold: float = 0.5
    radius_px: float | None = None  # NMS radius, original px (of the first micrograph's pixel size)
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)  # candidates per 0.1 of probability
    expected: float | None = None
    expected_threshold: float | None = None  # threshold giving `expected` picks per micrograph
    estimated_particles: float | None = None  # Σ calibrated p over candidates per micrograph (calibrated models)
    outputs: list[Path] = field(default_factory=list)
    shard: tuple[int, int] = (0, 1)
    device: str = "cpu"
    seconds: float = 0.0
    stopped: bool = False  # the caller's stop() asked to stop between micrographs (e.g. a RELION abort)
    out_dir: Path | None = None  # as the user gave it
    suffix: str = "cryopick"

    @property
    def total_picks(self) -> int:
        return sum(self.counts.values())

    @property
    def micrographs_per_second(self) -> float:
        return len(self.counts) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _RunState:
    summary: PickSummary
    candidate_scores: list[np.ndarray] = field(default_factory=list)
    pixel_sizes_seen: set[float] = field(default_factory=set)
    preview_stars: set[str] = field(default_factory=set)  # coordinate files whose micrograph gets a preview
    processed_pixel_sizes: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None  # score → P(particle | peak), from train; None: raw σ(logit)


def pick(micrographs: str | Path, model: str | Path, out_dir: str | Path, config: PickConfig,
         quiet: bool = False, project_dir: str | Path | None = None,
         stop: Callable[[], bool] | None = None) -> PickSummary:
    """Pick particles in ``micrographs`` with checkpoint ``model``; RELION coordinate files in ``out_dir``.

    ``stop`` is polled between micrographs; when it returns True the run stops there (``summary.stopped``),
    still writing the list files for the micrographs done, so a rerun continues where it stopped.
    """
    started = time.perf_counter()
    validate(config)
    ckpt = load_checkpoint(model)
    record = preprocess_from_checkpoint(ckpt)
    network = model_from_checkpoint(ckpt)
    device = resolve_device(config.device)
    shard = parse_shard(config.shard)
    out_root = check_output_dir(out_dir, "--out")
    entries = sorted(find_micrographs(micrographs, project_dir), key=lambda e: e.name)
    lists = ListFiles(config.suffix)
    plans, plan_failures = plan_outputs(entries, config.suffix, lists.all())

    out_root.mkdir(parents=True, exist_ok=True)
    ledger = OutputLedger(out_root, shard)
    producer = producer_record(model, config)
    _refuse_mixing(ledger, producer, config.overwrite, out_root)
    discard_dir(_staging_dir(out_root, shard))  # left by a killed --overwrite run
    my_names = {e.name for e in shard_items(entries, *shard)}
    my_plans = [p for p in plans if p.entry.name in my_names]
    todo = [p for p in my_plans if config.overwrite or not (out_root / p.star).exists()]
    preview_stars = {p.star for p in todo[: config.preview]}
    previews = sorted(preview_file_name(star) for star in preview_stars)
    our_files = [p.star for p in plans] + ([p.box for p in plans] if config.write_box else []) + lists.all()
    ledger.refuse_foreign(our_files + previews)
    ledger.claim(our_files + previews)
    if not config.overwrite and not _same_producer(ledger.my_producer, producer):
        ledger.set_producer(producer)  # recorded before the first pick is written

    summary = PickSummary(threshold=config.threshold, shard=shard, device=str(device), expected=config.expected,
                          out_dir=Path(out_dir), suffix=config.suffix)
    summary.failed.update({n: r for n, r in plan_failures.items() if n in my_names})
    todo_names = {p.entry.name for p in todo}
    summary.skipped = [p.entry.name for p in my_plans if p.entry.name not in todo_names]
    if shard[1] > 1:
        info(f"shard {shard[0]}/{shard[1]}: {len(my_plans)} of {len(plans)} micrographs", quiet)
    if summary.skipped:
        info(f"{len(summary.skipped)} micrographs already picked in {out_root} with the same model and settings "
             "(kept; --overwrite redoes them)", quiet)
    state = _RunState(summary, preview_stars=preview_stars, calibration=_calibration(ckpt, quiet))
    if todo:
        scorer = DenseScorer(network, device, record.patch_size // 2, config.tile_size, config.amp)
        if config.overwrite:
            _pick_aside(todo, scorer, record, config, out_root, state, ledger, producer, shard, quiet, stop)
        else:
            _pick_all(todo, scorer, record, config, out_root, state, quiet, stop)
    _finish_scores(state, config)
    summary.outputs += write_run_files(micrographs, out_root, Path(out_dir), plans, ledger, lists, record, config,
                                       state.processed_pixel_sizes)
    summary.seconds = time.perf_counter() - started
    if not quiet:
        print_summary(summary)
    if (todo or summary.failed) and not summary.counts and not summary.stopped:
        raise CryopickError(f"every micrograph failed ({len(summary.failed)}); first: "
                            + "; ".join(f"{n}: {r}" for n, r in list(summary.failed.items())[:3]))
    return summary


def _refuse_mixing(ledger: OutputLedger, producer: dict, overwrite: bool, out_root: Path) -> None:
    """One --out holds the picks of one model and one set of settings, so its files never come from two."""
    differences = ledger.conflicts(producer, own_only=overwrite)
    if differences and not overwrite:
        raise CryopickError(
            f"{out_root} already holds picks made with {'; '.join(differences)}; a rerun must use the same "
            "--model and settings to resume. Use --overwrite to replace those picks (the new ones are built "
            "aside and replace the old only when the run succeeds), or choose another --out")


def _staging_dir(out_root: Path, shard: tuple[int, int]) -> Path:
    return out_root / f"{STAGING_PREFIX}-{shard[0]}-of-{shard[1]}"


def _pick_aside(todo: list[PlannedMicrograph], scorer: DenseScorer, record: PreprocessRecord, config: PickConfig,
                out_root: Path, state: _RunState, ledger: OutputLedger, producer: dict, shard: tuple[int, int],
                quiet: bool, stop: Callable[[], bool] | None = None) -> None:
    """--overwrite: pick into a hidden staging directory, then move the new files over the old ones.

    A failed or interrupted run leaves the old picks untouched; old coordinate files of micrographs that
    failed this time are removed, so no file of the previous model stays behind.
    """
    stage = _staging_dir(out_root, shard).resolve()
    stage.mkdir()
    try:
        _pick_all(todo, scorer, record, config, stage, state, quiet, stop)
        if not state.summary.counts or state.summary.stopped:
            return  # every micrograph failed (pick() reports it) or the run was stopped: the old picks stay
        ledger.set_producer(None)  # between old and new: a rerun without --overwrite must not resume
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = out_root / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        for plan in todo:
            if plan.entry.name not in state.summary.counts:
                for stale in (plan.star, plan.box, preview_file_name(plan.star)):
                    (out_root / stale).unlink(missing_ok=True)
        ledger.set_producer(producer)
        state.summary.outputs = [out_root / p.relative_to(stage) for p in state.summary.outputs]
    finally:
        discard_dir(stage)


def _calibration(ckpt: dict, quiet: bool) -> Calibration | None:
    """The checkpoint's calibration (scores become P(particle | peak)); a warning when it has none."""
    data = ckpt.get("calibration")
    if not data:
        warn("this model has no pick calibration (trained by an older cryopick, or calibration failed): scores "
             "are the network's raw probabilities and 0.5 may over- or under-pick; --expected N prints the "
             "threshold giving N picks per micrograph")
        return None
    calibration = Calibration.from_dict(data)
    info(f"calibrated scores: {calibration.describe()}", quiet)
    return calibration


def validate_pick_config(config: PickConfig) -> None:
    """Kept for callers; the checks live in cryopick.config.validate."""
    validate(config)


def _pick_all(todo: list[PlannedMicrograph], scorer: DenseScorer, record: PreprocessRecord, config: PickConfig,
              out_root: Path, state: _RunState, quiet: bool, stop: Callable[[], bool] | None = None) -> None:
    def stopping() -> bool:
        state.summary.stopped = state.summary.stopped or (stop is not None and stop())
        return state.summary.stopped

    found = done = 0
    start = time.perf_counter()
    with progress_bar(quiet, extra="{task.fields[particles]} particles · {task.fields[rate]} mic/s") as bar:
        task = bar.add_task("picking", total=len(todo), particles=0, rate="–")
        for batch in iter_batches(iter_loaded(todo, record, config), config.batch_size):
            if stopping():
                break
            if isinstance(batch, LoadFailure):
                warn(f"{batch.plan.entry.name}: {batch.reason} (skipped)")
                state.summary.failed[batch.plan.entry.name] = batch.reason
                done += 1
                bar.update(task, completed=done)
                continue
            maps = scorer(torch.stack([m.binned for m in batch]))
            for loaded, logits in zip(batch, maps):
                if stopping():
                    break
                found += _pick_one(loaded, logits, scorer, record, config, out_root, state, quiet)
                done += 1
            rate = len(state.summary.counts) / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done, particles=found, rate=f"{rate:.2f}")


def _pick_one(loaded: LoadedMicrograph, logits: np.ndarray, scorer: DenseScorer, record: PreprocessRecord,
              config: PickConfig, out_root: Path, state: _RunState, quiet: bool) -> int:
    _note_pixel_size(loaded, record, state, quiet)
    radius = nms_radius_px(config, record, loaded.pixel_size)
    if state.summary.radius_px is None:
        state.summary.radius_px = radius
    geometry = MapGeometry(scorer.model.output_stride, scorer.pad, loaded.scales)
    candidates = candidate_picks(logits, geometry, tuple(loaded.binned.shape), loaded.shape, radius, config.edge)
    if state.calibration is not None:
        candidates = Picks(candidates.x, candidates.y, state.calibration.apply(candidates.score))
    picks = select_picks(candidates, config.threshold, config.max_picks)
    star_path = safe_join(out_root, loaded.plan.star)
    write_coordinate_star(star_path, picks.x, picks.y, picks.score)
    name = loaded.plan.entry.name
    state.summary.counts[name] = len(picks)
    state.summary.outputs.append(star_path)
    state.candidate_scores.append(candidates.score)
    state.processed_pixel_sizes[name] = loaded.pixel_size
    if loaded.plan.star in state.preview_stars:
        particle_radius = record.diameter_A / 2 / loaded.pixel_size
        state.summary.outputs.append(_write_preview(loaded, picks, particle_radius, config, out_root))
    return len(picks)


def _note_pixel_size(loaded: LoadedMicrograph, record: PreprocessRecord, state: _RunState, quiet: bool) -> None:
    """One line per distinct pixel size that differs from training (or is unknown)."""
    key = round(loaded.pixel_size, 6) if loaded.pixel_size_known else -1.0
    if key in state.pixel_sizes_seen:
        return
    state.pixel_sizes_seen.add(key)
    if not loaded.pixel_size_known:
        warn(f"{loaded.plan.entry.name}: no pixel size in the STAR or MRC header; assuming the training pixel "
             f"size {record.pixel_size:.4g} Å/px (give --pixel-size to set it)")
    elif abs(loaded.pixel_size - record.pixel_size) > PIXEL_SIZE_TOLERANCE * record.pixel_size:
        info(f"micrographs at {loaded.pixel_size:.4g} Å/px (training: {record.pixel_size:.4g} Å/px): rescaling by "
             f"{micrograph_factor(record, loaded.pixel_size):.4g} to the trained binned pixel size "
             f"{record.binned_pixel_size:.4g} Å/px", quiet)


def _write_preview(loaded: LoadedMicrograph, picks: Picks, radius_px: float, config: PickConfig,
                   out_root: Path) -> Path:
    """The binned micrograph with a circle of the particle's radius at each pick."""
    sy, sx = loaded.scales
    image = preview_image(loaded.binned.numpy(), picks.x / sx, picks.y / sy, picks.score, radius_px / sx,
                          config.threshold)
    path = safe_join(out_root, preview_file_name(loaded.plan.star))
    write_png(path, image)
    return path


def _finish_scores(state: _RunState, config: PickConfig) -> None:
    scores = np.concatenate(state.candidate_scores) if state.candidate_scores else np.zeros(0)
    state.summary.histogram = score_histogram(scores)
    if state.calibration is not None and state.summary.counts:
        state.summary.estimated_particles = float(scores.sum()) / len(state.summary.counts)
    if config.expected is not None:
        state.summary.expected_threshold = threshold_for_expected(scores, len(state.summary.counts), config.expected)


# ---------------------------------------------------------------------------------------------
# run-level files, rebuilt from every coordinate file present (so shards and reruns compose)


def read_coordinate_star(path: str | Path) -> Picks:
    """Picks of one of our coordinate files (0-byte file → none)."""
    blocks = read_star_blocks(path)
    table = next((b for b in blocks.values() if isinstance(b, pd.DataFrame)), None)
    if table is None or table.empty:
        empty = np.zeros(0)
        return Picks(empty, empty, empty)
    fom = table["rlnAutopickFigureOfMerit"] if "rlnAutopickFigureOfMerit" in table else np.ones(len(table))
    return Picks(np.asarray(table["rlnCoordinateX"], dtype=np.float64),
                 np.asarray(table["rlnCoordinateY"], dtype=np.float64), np.asarray(fom, dtype=np.float64))


def _as_given(out_dir_given: Path, relative: str) -> str:
    """A path inside the output directory spelled from the directory as the user gave it."""
    return str(PurePosixPath(out_dir_given.as_posix()) / relative)


def _pixel_size_for_outputs(plan: PlannedMicrograph, config: PickConfig, record: PreprocessRecord,
                            known: dict[str, float]) -> float:
    if plan.entry.name in known:
        return known[plan.entry.name]
    try:
        header_pixel_size = read_header(plan.entry.path).pixel_size
    except InputFileError:
        header_pixel_size = None
    return micrograph_pixel_size(config.pixel_size, plan.entry.pixel_size, header_pixel_size) or record.pixel_size


def write_run_files(micrographs: str | Path, out_root: Path, out_dir_given: Path, plans: list[PlannedMicrograph],
                    ledger: OutputLedger, lists: ListFiles, record: PreprocessRecord, config: PickConfig,
                    known_pixel_sizes: dict[str, float]) -> list[Path]:
    """Suffix file, coordinate-files list, optional box/Topaz/particles files and the resolved config."""
    present = [p for p in plans if ledger.owns(p.star) and (out_root / p.star).is_file()]
    written: list[Path] = []

    def target(relative: str) -> Path:
        path = safe_join(out_root, relative)
        written.append(path)
        return path

    pixel_sizes = {p.entry.name: _pixel_size_for_outputs(p, config, record, known_pixel_sizes) for p in present}
    input_is_star = Path(micrographs).suffix.lower() == ".star" and Path(micrographs).is_file()
    if input_is_star:
        micrographs_star = str(micrographs)
    else:
        common = Counter(pixel_sizes.values()).most_common(1)
        write_micrographs_star(target(lists.micrographs), [p.entry.name for p in present],
                               common[0][0] if common else record.pixel_size)
        micrographs_star = _as_given(out_dir_given, lists.micrographs)
    write_text_atomic(target(lists.coords_suffix), micrographs_star + "\n")
    write_coordinate_files_list(target(lists.coordinate_list),
                                [(p.entry.name, _as_given(out_dir_given, p.star)) for p in present])
    if config.write_box or config.write_topaz or config.write_particles or config.write_cryosparc:
        picks = {p.entry.name: read_coordinate_star(out_root / p.star) for p in present}
        if config.write_box:
            for p in present:
                found = picks[p.entry.name]
                write_box(target(p.box), found.x, found.y, box_size_px(record, pixel_sizes[p.entry.name]))
        if config.write_topaz:
            write_topaz_table(target(lists.topaz), [(p.entry.name, x, y, s) for p in present
                                                   for x, y, s in zip(*_columns(picks[p.entry.name]))])
        if config.write_particles:
            rows = [(p.entry.name, float(x), float(y), float(s)) for p in present
                    for x, y, s in zip(*_columns(picks[p.entry.name]))]
            write_text_atomic(target(lists.particles), star_loop(
                "particles", ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"],
                rows))
        if config.write_cryosparc:
            write_cs(target(lists.cryosparc), [(p.entry.name, read_header(p.entry.path).shape,
                                                *_columns(picks[p.entry.name])) for p in present])
    resolved = config
    if config.radius_px is None and pixel_sizes:
        first_pixel_size = next(iter(pixel_sizes.values()))
        resolved = dataclasses.replace(config, radius_px=nms_radius_px(config, record, first_pixel_size))
    write_text_atomic(target(CONFIG_NAME), dump_yaml(resolved))
    return written


def _columns(picks: Picks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return picks.x, picks.y, picks.score


# ---------------------------------------------------------------------------------------------
# report


def histogram_lines(histogram: list[int], threshold: float, width: int = 40) -> list[str]:
    """One text bar per probability bin; the bin holding the threshold is marked."""
    peak = max(max(histogram), 1)
    lines = []
    for k, count in enumerate(histogram):
        low, high = k / HISTOGRAM_BINS, (k + 1) / HISTOGRAM_BINS
        mark = " ← threshold" if low <= threshold < high or (k == HISTOGRAM_BINS - 1 and threshold >= high) else ""
        lines.append(f"{low:.1f}–{high:.1f} {'█' * round(width * count / peak):<{width}} {count}{mark}")
    return lines


def print_summary(summary: PickSummary) -> None:
    table = Table(title="cryopick pick", show_header=False)
    table.add_column("item")
    table.add_column("value")
    n = len(summary.counts)
    table.add_row("micrographs picked", str(n))
    if summary.skipped:
        table.add_row("already picked (kept)", str(len(summary.skipped)))
    table.add_row("failed", str(len(summary.failed)))
    table.add_row("particles", f"{summary.total_picks} ({summary.total_picks / n:.1f} per micrograph)" if n else "0")
    table.add_row("threshold", f"{summary.threshold:g}")
    if summary.estimated_particles is not None:
        table.add_row("estimated particles (Σ p)", f"{summary.estimated_particles:.1f} per micrograph")
    if summary.radius_px is not None:
        table.add_row("NMS radius", f"{summary.radius_px:.1f} px")
    if summary.expected_threshold is not None:
        table.add_row(f"threshold for {summary.expected:g}/micrograph", f"{summary.expected_threshold:.3f}")
    table.add_row("speed", f"{summary.micrographs_per_second:.2f} micrographs/s on {summary.device}")
    console.print(table)
    if n:
        console.print("candidate peaks by probability:")
        for line in histogram_lines(summary.histogram, summary.threshold):
            console.print(line, highlight=False)
    for line in pick_count_lines(pick_counts(summary.counts)):
        console.print(line, highlight=False, markup=False)  # micrograph names may hold [brackets]
    for name, reason in list(summary.failed.items())[:10]:
        console.print(f"[red]failed[/red] {name}: {reason}", highlight=False)
    if len(summary.failed) > 10:
        console.print(f"… and {len(summary.failed) - 10} more failures", highlight=False)


def next_steps(summary: PickSummary) -> list[str]:
    """Which of the written files RELION's Particle extraction takes (3.1 and 4/5)."""
    lists = ListFiles(summary.suffix)
    return next_steps_pick(summary.out_dir or Path("."), lists.coords_suffix, lists.coordinate_list, summary.suffix)
