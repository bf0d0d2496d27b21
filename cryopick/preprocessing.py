"""One preprocessing for extract and pick: anti-aliased binning and robust per-micrograph normalisation.

Coordinates: binned pixel ``j`` samples original position ``j * scale`` (Fourier cropping keeps the
origin), so ``x_binned = x_original / scale_x``. This is the convention of RELION's autopicker and
of Topaz (``round(coord * x / s)``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from cryopick.errors import CryopickError

PREPROCESS_VERSION = 1


@dataclass(frozen=True)
class PreprocessRecord:
    """Everything needed to repeat the preprocessing exactly; stored in datasets and checkpoints."""

    pixel_size: float  # Å/px of the original micrographs
    bin_factor: float  # original px per binned px (≥ 1; integer unless a target pixel size was asked)
    diameter_A: float  # particle diameter the user stated, Å
    patch_size: int = 128  # binned px
    normalisation: str = "gmm2"
    version: int = PREPROCESS_VERSION

    @property
    def binned_pixel_size(self) -> float:
        return self.pixel_size * self.bin_factor

    @property
    def diameter_binned_px(self) -> float:
        return self.diameter_A / self.binned_pixel_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, remedy: str = "re-run extract") -> "PreprocessRecord":
        """The record stored in a dataset or checkpoint; ``remedy`` ends the message when it is unusable."""
        if not isinstance(data, dict):
            raise CryopickError(f"preprocessing record must be a mapping, got {type(data).__name__}; {remedy}")
        missing = [k for k in ("pixel_size", "bin_factor", "diameter_A") if k not in data]
        if missing:
            raise CryopickError(f"preprocessing record lacks {', '.join(missing)}; {remedy}")
        if not all(isinstance(data[k], (int, float)) and math.isfinite(data[k]) and data[k] > 0 for k in
                   ("pixel_size", "bin_factor", "diameter_A")):
            raise CryopickError("preprocessing record holds a pixel size, bin factor or diameter that is not a "
                                f"positive number; {remedy}")
        if data.get("version", -1) != PREPROCESS_VERSION:
            raise CryopickError(
                f"preprocessing record version {data.get('version')} is not supported "
                f"(this cryopick writes version {PREPROCESS_VERSION}); {remedy}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def choose_bin_factor(diameter_A: float, pixel_size: float, patch_size: int = 128,
                      bin_factor: int | None = None, target_pixel_size: float | None = None) -> float:
    """Bin factor so the particle spans about half the patch, unless given explicitly."""
    if diameter_A <= 0:
        raise CryopickError(f"particle diameter must be positive, got {diameter_A} Å")
    if pixel_size <= 0 or not math.isfinite(pixel_size):
        raise CryopickError(f"pixel size must be positive, got {pixel_size} Å/px")
    if bin_factor is not None and target_pixel_size is not None:
        raise CryopickError("give either a bin factor or a target pixel size, not both")
    if bin_factor is not None:
        if bin_factor < 1:
            raise CryopickError(f"bin factor must be ≥ 1, got {bin_factor}")
        return float(bin_factor)
    if target_pixel_size is not None:
        factor = target_pixel_size / pixel_size
        if factor < 1 - 1e-6:
            raise CryopickError(
                f"target pixel size {target_pixel_size} Å is finer than the micrographs' {pixel_size} Å/px "
                "(cryopick only bins down)"
            )
        return max(1.0, float(factor))
    diameter_px = diameter_A / pixel_size
    return float(max(1, round(diameter_px / (patch_size / 2))))


def binned_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    ny, nx = shape
    return max(1, int(round(ny / factor))), max(1, int(round(nx / factor)))


def axis_scales(shape: tuple[int, int], factor: float) -> tuple[float, float]:
    """Exact original-per-binned pixel ratios (sy, sx) after rounding the binned shape."""
    my, mx = binned_shape(shape, factor)
    return shape[0] / my, shape[1] / mx


def fourier_crop(image: torch.Tensor, out_shape: tuple[int, int]) -> torch.Tensor:
    """Resample a 2-D image to ``out_shape`` through its spectrum: cropped to bin (ideal anti-aliasing
    low-pass), zero-padded to upsample (micrographs picked at a coarser pixel size than training's)."""
    ny, nx = image.shape[-2:]
    my, mx = out_shape
    if (my, mx) == (ny, nx):
        return image
    spec = _resize_full_axis(torch.fft.rfft2(image), ny, my)
    half = mx // 2 + 1
    if half <= spec.shape[-1]:
        spec = spec[..., :half]
    else:
        spec = torch.cat([spec, spec.new_zeros((*spec.shape[:-1], half - spec.shape[-1]))], dim=-1)
    out = torch.fft.irfft2(spec, s=(my, mx))
    return out * (my * mx) / (ny * nx)


def _resize_full_axis(spec: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The lowest min(n, m) frequencies of the spectrum's row axis (length n), zeros between them up to m."""
    keep = min(n, m)
    top, bottom = (keep + 1) // 2, keep // 2
    parts = [spec[..., :top, :]]
    if m > keep:
        parts.append(spec.new_zeros((*spec.shape[:-2], m - keep, spec.shape[-1])))
    if bottom:
        parts.append(spec[..., n - bottom:, :])
    return torch.cat(parts, dim=-2)


def robust_normalise(image: torch.Tensor, max_samples: int = 1 << 20, bins: int = 512) -> torch.Tensor:
    """Normalise by the dominant component of a 2-Gaussian mixture fitted to the pixel values.

    Ice contamination and carbon film form a second population of pixel values; mean/std would be
    pulled by them, the dominant mixture component (the ice the particles sit in) is not. This is
    the normalisation Topaz uses. The mixture is fitted by EM on a histogram of a fixed strided
    subsample: deterministic, and microseconds instead of many passes over the pixels.
    """
    flat = image.reshape(-1)
    x = flat[:: max(1, flat.numel() // max_samples)].float()
    sample = x[:: max(1, x.numel() // 65536)]  # the histogram range needs no more than this
    lo, hi = (float(v) for v in torch.quantile(sample, torch.tensor([0.001, 0.999], device=x.device)))
    if not hi > lo:
        return image.to(torch.float32) - float(x.median())
    counts = torch.histc(x, bins=bins, min=lo, max=hi).double().cpu().numpy()
    width = (hi - lo) / bins
    centres = lo + (np.arange(bins) + 0.5) * width
    mean, sigma = _dominant_gaussian(centres, counts, width)
    return (image.to(torch.float32) - mean) / sigma


def _dominant_gaussian(centres: np.ndarray, counts: np.ndarray, width: float,
                       iterations: int = 50) -> tuple[float, float]:
    """EM for 2 Gaussians on a histogram; (mean, σ) of the heavier component."""
    total = counts.sum()
    cdf = np.cumsum(counts) / total
    median = centres[np.searchsorted(cdf, 0.5)]
    spread = np.sqrt(np.sum(counts * (centres - median) ** 2) / total) or width
    mu = np.array([median - spread / 2, median + spread / 2])
    var = np.array([spread**2, spread**2]) / 4
    w = np.array([0.5, 0.5])
    floor = width**2 / 12  # histogram quantisation
    for _ in range(iterations):
        logp = -0.5 * ((centres[:, None] - mu) ** 2 / var + np.log(var)) + np.log(w)
        logp -= logp.max(axis=1, keepdims=True)
        resp = np.exp(logp)
        resp /= resp.sum(axis=1, keepdims=True)
        resp *= counts[:, None]
        nk = resp.sum(axis=0) + 1e-12
        w = nk / nk.sum()
        mu = (resp * centres[:, None]).sum(axis=0) / nk
        var = (resp * (centres[:, None] - mu) ** 2).sum(axis=0) / nk + floor
    k = int(np.argmax(w))
    return float(mu[k]), float(np.sqrt(var[k]))


def preprocess(image: np.ndarray | torch.Tensor, factor: float,
               device: str | torch.device | None = None) -> tuple[torch.Tensor, tuple[float, float]]:
    """Bin by ``factor`` (Fourier crop) and normalise; returns float32 image and (sy, sx) scales."""
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32))
    else:
        tensor = image.to(torch.float32)
    if device is not None:
        tensor = tensor.to(device)
    shape = tuple(tensor.shape[-2:])
    out_shape = binned_shape(shape, factor)
    binned = fourier_crop(tensor, out_shape)
    return robust_normalise(binned), axis_scales(shape, factor)


def micrograph_factor(record: PreprocessRecord, micrograph_pixel_size: float | None) -> float:
    """Bin factor that brings a micrograph of ``micrograph_pixel_size`` to the record's binned pixel size."""
    if micrograph_pixel_size is None or micrograph_pixel_size <= 0:
        return record.bin_factor
    return record.binned_pixel_size / micrograph_pixel_size


def micrograph_pixel_size(given: float | None, star: float | None, header: float | None) -> float | None:
    """A micrograph's pixel size (Å/px): the one given (--pixel-size), else its micrographs STAR's, else its
    MRC header's; None when none is a positive number."""
    for value in (given, star, header):
        if value is not None and value > 0:
            return float(value)
    return None
