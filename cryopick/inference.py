"""Inference: score-map geometry, receptive field and tiling, dense scoring of whole micrographs, read-ahead loading.

Map sample ``(i, j)`` of a micrograph reflect-padded by ``pad`` binned px is the logit of the patch centred on
binned pixel ``(i·OS − pad, j·OS − pad)`` (OS: the network's output stride), i.e. original pixel
``x = (j·OS − pad)·sx``. Backbones that see more than a patch get ``context_pad`` more px of reflection,
whose samples are dropped again: every kept sample sees micrograph, never the network's zero padding, exactly
as dense training's crops do (``cryopick.crops``). ``cryopick.pick`` orchestrates; peaks of the maps are
found by ``cryopick.nms``.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from cryopick.dataset import reflect_pad
from cryopick.device import autocast_factory, channels_last
from cryopick.errors import CryopickError, InputFileError
from cryopick.model import PatchClassifier

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

    def mirror_band(self) -> tuple[float, float]:
        """Half a map sample in original px (rows, cols): how close to a border a peak is on its mirror axis."""
        sy, sx = self.scales
        return self.output_stride / 2 * sy, self.output_stride / 2 * sx

    def to_binned(self, rows, cols) -> tuple[np.ndarray, np.ndarray]:
        """Binned-pixel centres ``(y, x)`` of integer map indices."""
        return rows * self.output_stride - self.pad, cols * self.output_stride - self.pad


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


def context_pad(model: PatchClassifier, patch_size: int) -> int:
    """Reflection beyond half a patch that pick and dense training give every map sample: none when a sample
    sees at most a patch (ResNet-8), else the tile margin (half the receptive field, on the stride grid)."""
    return 0 if receptive_field(model) <= patch_size else tile_margin(model)


def without_context(maps: torch.Tensor, context: int, stride: int) -> torch.Tensor:
    """Maps ``(N, H', W')`` of an input padded ``context`` px more than the geometry's pad, cut back to it."""
    k = context // stride
    return maps[:, k: maps.shape[1] - k, k: maps.shape[2] - k] if k else maps


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
    """Logit maps ``(N, H', W')`` of binned micrographs ``(N, H, W)`` (see ``MapGeometry``), with pick's context
    (``context_pad`` of a patch of ``2·pad``)."""
    context = context_pad(model, 2 * pad)
    padded = reflect_pad(binned[:, None], pad + context)
    maps = tiled_score_map(model, padded, tile_size, tile_margin(model) if margin is None else margin)
    return without_context(maps, context, model.output_stride)


class DenseScorer:
    """The model on its device in channels-last memory (faster on CUDA and CPUs), bf16 autocast on CUDA,
    float32 maps back on the CPU."""

    def __init__(self, model: PatchClassifier, device: torch.device, pad: int, tile_size: int, amp: bool):
        self.cuda = device.type == "cuda"
        self.device = device
        self.model = channels_last(model.to(device).eval(), True)
        self.pad = pad
        self.tile_size = tile_size
        self.margin = tile_margin(model)
        self.context = context_pad(model, 2 * pad)
        self.amp = amp and self.cuda
        self.autocast = autocast_factory(self.amp)

    def geometry(self, scales: tuple[float, float]) -> MapGeometry:
        """Where the samples of a map this scorer made lie, for a micrograph binned with ``scales``."""
        return MapGeometry(self.model.output_stride, self.pad, scales)

    @torch.inference_mode()
    def __call__(self, binned: torch.Tensor) -> np.ndarray:
        x = reflect_pad(binned[:, None].to(self.device, non_blocking=True), self.pad + self.context)
        x = channels_last(x, True)
        try:
            with self.autocast():
                maps = tiled_score_map(self.model, x, self.tile_size, self.margin)
        except torch.cuda.OutOfMemoryError:
            raise CryopickError(
                f"out of GPU memory scoring {tuple(binned.shape)} binned micrographs; "
                "lower batch_size or tile_size"
            ) from None
        return without_context(maps, self.context, self.model.output_stride).float().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# read-ahead loading and batching of preprocessed micrographs


@dataclass
class LoadedMicrograph:
    """One micrograph as the network sees it (``binned``) and what maps its picks back to original pixels."""

    plan: Any  # what the caller loaded it for (pick: a PlannedMicrograph)
    binned: torch.Tensor  # (H, W) float32, CPU
    scales: tuple[float, float]
    shape: tuple[int, int]  # original (ny, nx)
    pixel_size: float
    pixel_size_known: bool


@dataclass(frozen=True)
class LoadFailure:
    plan: Any
    reason: str


Loader = Callable[[Any], LoadedMicrograph]


def load_or_fail(load: Loader, plan: Any) -> LoadedMicrograph | LoadFailure:
    """``load(plan)``, or the reason it could not be loaded (a bad file must not stop the run)."""
    try:
        return load(plan)
    except InputFileError as exc:
        return LoadFailure(plan, exc.problem)
    except CryopickError as exc:  # our own messages are written for the user: no exception class in front
        return LoadFailure(plan, str(exc))
    except (ValueError, RuntimeError, OSError, MemoryError) as exc:
        return LoadFailure(plan, f"{type(exc).__name__}: {exc}")


def iter_loaded(plans: list, load: Loader, workers: int, lookahead: int) -> Iterator[LoadedMicrograph | LoadFailure]:
    """``load`` of each plan in order; ``workers`` threads read up to ``lookahead`` ahead while the caller scores."""
    if workers <= 0:
        for plan in plans:
            yield load_or_fail(load, plan)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cryopick-load")
    try:
        pending: deque = deque()
        upcoming = iter(plans)
        for plan in upcoming:
            pending.append(pool.submit(load_or_fail, load, plan))
            if len(pending) >= lookahead:
                break
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(load_or_fail, load, following))
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
