"""Batch augmentation for normalised patches: weak (geometry) and strong (RandAugment-style) views.

Everything works on a whole ``(N, C, H, W)`` float batch on its own device, without per-sample
Python loops: per-sample randomness is drawn as tensors and applied through masks. All random
numbers come from ``generator`` when given (a CPU generator may serve a CUDA batch), so a seeded
generator reproduces a batch exactly.

Geometry: pixel ``(row i, column j)`` has its centre at coordinate ``(i, j)``; the patch centre is
pixel ``(H/2, W/2)`` (``(64, 64)`` for 128 px, where the model reads its logit). Every view is
sampled with one per-sample affine map about that centre and a single ``F.grid_sample`` call
(bilinear, reflection padding, ``align_corners=False``), so a particle at the centre stays there
unless a shift is asked for. Shifts are uniform in a disk of radius ``max_shift`` (binned pixels;
the caller converts ``data.max_shift``, a fraction of the particle diameter).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cryopick.config import AugmentConfig
from cryopick.errors import CryopickError

# The pool RandAugment draws from; selected ops are applied in this order.
RANDAUGMENT_OPS = ("rotate", "shear", "scale", "brightness", "contrast", "gamma", "sharpness", "blur",
                   "posterize", "solarize")
GEOMETRIC_OPS = ("rotate", "shear", "scale")

# Normalised patches have mean ≈ 0 and σ ≈ 1: this is the range mapped to "0–255" by the
# intensity-range ops (gamma, posterize, solarize).
_RANGE = 3.0


def weak_augment(x: torch.Tensor, max_shift: float, rotate_degrees: float = 10.0, rot90: bool = True,
                 flips: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random shift (disk of radius ``max_shift`` px), flips, 90° turns and a ±``rotate_degrees`` rotation.

    All composed into one affine map per sample about the patch centre. With everything off the
    output equals the input.
    """
    _check_batch(x)
    _check_range("max_shift", max_shift, 0.0, math.inf)
    _check_range("augment.rotate_degrees", rotate_degrees, 0.0, 180.0)
    if x.shape[0] == 0:
        return x.clone()
    matrix, shift = _weak_geometry(x.shape[0], x.device, max_shift, rotate_degrees, rot90, flips, generator)
    return _warp(x, matrix, shift).to(x.dtype)


def strong_augment(x: torch.Tensor, cfg: AugmentConfig, max_shift: float,
                   generator: torch.Generator | None = None, mix: bool = True,
                   ops: tuple[str, ...] = RANDAUGMENT_OPS) -> torch.Tensor:
    """Weak geometry plus RandAugment, contrast jitter, Gaussian noise, cutout and optional mixup.

    RandAugment: every sample draws ``cfg.randaugment_ops`` distinct ops from ``ops`` (default: all
    of ``RANDAUGMENT_OPS``) at magnitude ``m = cfg.randaugment_magnitude`` with a random sign each:

    - rotate ±30°·m, shear ±0.3·m (x or y), scale 1.25^(±m): folded into the weak affine map;
    - brightness ±m (σ units); contrast ×(1 ± 0.8·m) about the sample mean;
    - gamma 2^(±m) on the range [−3, 3] (values outside it are shifted, not remapped);
    - sharpness: unsharp mask ``x + a·(x − blur(x))``, a = +2m (sharpen) or −m (soften);
    - blur: Gaussian, σ = 0.5 + 1.5·m px;
    - posterize: round to round(2^(6 − 4m)) levels across [−3, 3] (16 at m = 0.5);
    - solarize: negate values beyond the level ±3·(1 − m) (above it for +, below −it for −).

    Then contrast jitter ×(1 + U(−c, c)) about the sample mean (c = ``cfg.contrast``), Gaussian noise
    with σ = ``cfg.noise_std``·U(0, 1) per sample, and cutout: a square of side round(``cfg.cutout``·H)
    placed uniformly inside the patch and set to 0 (the normalised mean).

    With ``cfg.mixup > 0`` and ``mix`` true, each sample is finally blended with a random partner of
    the batch (see :func:`mixup`, weight ≥ 0.5 on itself). The trainer mixes only the unlabeled
    strong views, so it passes ``mix=False`` for any other batch.
    """
    _check_batch(x)
    _check_config(cfg, max_shift)
    unknown = sorted(set(ops) - set(RANDAUGMENT_OPS))
    if unknown or not ops:
        raise CryopickError(f"unknown RandAugment op(s) {unknown} (choose from {', '.join(RANDAUGMENT_OPS)})")
    n = x.shape[0]
    if n == 0:
        return x.clone()
    device, m = x.device, float(cfg.randaugment_magnitude)
    pool = [op for op in RANDAUGMENT_OPS if op in ops]
    chosen = _choose_ops(n, len(pool), cfg.randaugment_ops, device, generator)
    selected = {op: chosen[:, k] for k, op in enumerate(pool)}
    signs = _random_signs((n, len(RANDAUGMENT_OPS)), device, generator)
    sign = {op: signs[:, k] for k, op in enumerate(RANDAUGMENT_OPS)}

    matrix, shift = _weak_geometry(n, device, max_shift, cfg.rotate_degrees, cfg.rot90, cfg.flips, generator)
    extra = _randaugment_geometry(selected, sign, m, device, generator)
    y = _warp(x, matrix @ extra, shift)

    for op in pool:
        if op not in GEOMETRIC_OPS:
            y = _apply_to_selected(y, selected[op], sign[op], m, _PHOTOMETRIC[op])

    y = _scale_about_mean(y, 1.0 + cfg.contrast * _uniform((n,), device, generator, -1.0, 1.0))
    noise_sigma = cfg.noise_std * _uniform((n,), device, generator)
    y = y + _per_sample(noise_sigma) * _normal(y.shape, device, generator)
    y = cutout(y, cfg.cutout, generator)
    if mix and cfg.mixup > 0:
        y = mixup(y, cfg.mixup, generator)[0]
    return y.to(x.dtype)


def cutout(x: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Set one square of side round(fraction·H), placed uniformly inside each patch, to 0."""
    _check_range("augment.cutout", fraction, 0.0, 1.0)
    n, _, h, w = x.shape
    side = min(int(round(fraction * h)), h, w)
    if side == 0 or n == 0:
        return x
    top = torch.floor(_uniform((n,), x.device, generator) * (h - side + 1)).clamp(max=h - side)
    left = torch.floor(_uniform((n,), x.device, generator) * (w - side + 1)).clamp(max=w - side)
    rows = torch.arange(h, device=x.device, dtype=torch.float32)
    cols = torch.arange(w, device=x.device, dtype=torch.float32)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + side)
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + side)
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(square, 0.0)


def mixup(x: torch.Tensor, alpha: float, generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend each sample with a random partner: ``λ·x + (1 − λ)·x[perm]``.

    ``λ ~ Beta(α, α)`` per sample, then ``λ = max(λ, 1 − λ)`` (MixMatch) so the sample dominates its
    partner and keeps its own pseudo-label. Returns ``(mixed, λ, perm)`` for callers that mix targets.
    """
    if not (alpha > 0 and math.isfinite(alpha)):
        raise CryopickError(f"augment.mixup must be > 0 to mix, got {alpha}")
    n = x.shape[0]
    perm = torch.argsort(_uniform((n,), x.device, generator))
    # torch's Beta sampler takes no generator; numpy's, seeded from ours, keeps batches reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu").item())
    lam_np = np.random.default_rng(seed).beta(alpha, alpha, size=n).astype(np.float32)
    lam = torch.from_numpy(np.maximum(lam_np, 1.0 - lam_np)).to(x.device)
    weight = lam.to(x.dtype).view(n, *([1] * (x.dim() - 1)))
    return weight * x + (1.0 - weight) * x[perm], lam, perm


# ---------------------------------------------------------------------------------------------
# geometry


def _weak_geometry(n: int, device: torch.device, max_shift: float, rotate_degrees: float, rot90: bool,
                   flips: bool, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sampling matrix (output offset -> input offset, (x, y) order) and shift, px."""
    angle = torch.deg2rad(rotate_degrees * _uniform((n,), device, generator, -1.0, 1.0))
    quarter_turns = torch.floor(_uniform((n,), device, generator) * 4.0).clamp(max=3.0)
    flip_x = _random_signs((n,), device, generator)
    flip_y = _random_signs((n,), device, generator)
    radius = max_shift * torch.sqrt(_uniform((n,), device, generator))
    direction = 2.0 * math.pi * _uniform((n,), device, generator)
    if rot90:
        angle = angle + quarter_turns * (math.pi / 2.0)
    matrix = _rotation(angle)
    if flips:
        matrix = matrix @ torch.diag_embed(torch.stack([flip_x, flip_y], dim=1))
    shift = torch.stack([radius * torch.cos(direction), radius * torch.sin(direction)], dim=1)
    return matrix, shift


def _randaugment_geometry(selected: dict[str, torch.Tensor], sign: dict[str, torch.Tensor], m: float,
                          device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    n = next(iter(sign.values())).shape[0]
    shear_on_x = _uniform((n,), device, generator) < 0.5
    eye = torch.eye(2, device=device).expand(n, 2, 2)
    matrix = eye
    if "rotate" in selected:
        rotation = _rotation(torch.deg2rad(30.0 * m * sign["rotate"]))
        matrix = matrix @ torch.where(selected["rotate"][:, None, None], rotation, eye)
    if "shear" in selected:
        k = 0.3 * m * sign["shear"]
        zero, one = torch.zeros_like(k), torch.ones_like(k)
        kx, ky = torch.where(shear_on_x, k, zero), torch.where(shear_on_x, zero, k)
        shear = torch.stack([torch.stack([one, kx], 1), torch.stack([ky, one], 1)], 1)
        matrix = matrix @ torch.where(selected["shear"][:, None, None], shear, eye)
    if "scale" in selected:
        factor = torch.where(selected["scale"], 1.25 ** (m * sign["scale"]), torch.ones_like(sign["scale"]))
        matrix = matrix * factor[:, None, None]
    return matrix


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)


def _warp(x: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Float32 copy of ``x`` sampled at ``centre + matrix·(p − centre) + shift`` for every output pixel ``p``.

    The grid is built in pixel units and only then normalised (``u = (2p + 1)/size − 1``, the
    ``align_corners=False`` convention), so the identity map samples pixel centres exactly.
    """
    n, _, h, w = x.shape
    dy = (torch.arange(h, device=x.device, dtype=torch.float32) - h / 2)[None, :, None]
    dx = (torch.arange(w, device=x.device, dtype=torch.float32) - w / 2)[None, None, :]
    m = matrix.to(x.device, torch.float32)[:, :, :, None, None]
    sx = (shift[:, 0] + w / 2)[:, None, None]
    sy = (shift[:, 1] + h / 2)[:, None, None]
    src_x = m[:, 0, 0] * dx + m[:, 0, 1] * dy + sx
    src_y = m[:, 1, 0] * dx + m[:, 1, 1] * dy + sy
    grid = torch.stack([(2 * src_x + 1) / w - 1, (2 * src_y + 1) / h - 1], dim=-1)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ---------------------------------------------------------------------------------------------
# photometric RandAugment ops: (batch, per-sample sign ±1, magnitude) -> batch


def _brightness(y: torch.Tensor, sign: torch.Tensor, m: float) -> torch.Tensor:
    return y + _per_sample(sign) * m


def _contrast(y: torch.Tensor, sign: torch.Tensor, m: float) -> torch.Tensor:
    return _scale_about_mean(y, 1.0 + 0.8 * m * sign)


def _gamma(y: torch.Tensor, sign: torch.Tensor, m: float) -> torch.Tensor:
    unit = ((y + _RANGE) / (2 * _RANGE)).clamp(0.0, 1.0)
    exponent = _per_sample(2.0 ** (m * sign))
    return y + 2 * _RANGE * (unit.pow(exponent) - unit)


def _sharpness(y: torch.Tensor, sign: torch.Tensor, m: float) -> torch.Tensor:
    amount = torch.where(sign > 0, 2.0 * m, -m)
    return y + _per_sample(amount) * (y - gaussian_blur(y, 1.0))


def _blur(y: torch.Tensor, sign: torch.Tensor, m: float) -> torch.Tensor:
    return gaussian_blur(y, 0.5 + 1.5 * m)


def _posterize(y: torch.Tensor, sign: torch.Tensor, m: float) -> torch.Tensor:
    levels = max(2, round(2.0 ** (6.0 - 4.0 * m)))
    step = 2 * _RANGE / levels
    return torch.round(y / step) * step


def _solarize(y: torch.Tensor, sign: torch.Tensor, m: float) -> torch.Tensor:
    level = _RANGE * (1.0 - m)
    s = _per_sample(sign)
    return torch.where(y * s >= level, -y, y)


_PHOTOMETRIC = {"brightness": _brightness, "contrast": _contrast, "gamma": _gamma, "sharpness": _sharpness,
                "blur": _blur, "posterize": _posterize, "solarize": _solarize}


def _apply_to_selected(y: torch.Tensor, chosen: torch.Tensor, sign: torch.Tensor, m: float, op) -> torch.Tensor:
    """``y`` (our own working copy, updated in place on the CPU) with ``op`` applied where ``chosen``.

    On CUDA every sample is computed and masked (no host sync, and the GPU has time to spare); on
    the CPU only the chosen samples are computed, several times cheaper. Both give the same values.
    """
    if y.is_cuda:
        return torch.where(_per_sample(chosen), op(y, sign, m), y)
    rows = torch.nonzero(chosen).squeeze(1)
    if rows.numel() == 0:
        return y
    return y.index_copy_(0, rows, op(y.index_select(0, rows), sign.index_select(0, rows), m))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every channel, reflect-padded; identity for sigma ≤ 0."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    radius = max(1, min(int(math.ceil(3.0 * sigma)), h - 1, w - 1))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    # Weighted sums of shifted views: far faster on CPU than a 1-channel conv2d, same on GPU.
    rows = sum(kernel[k] * padded[:, :, k:k + h, :] for k in range(2 * radius + 1))
    return sum(kernel[k] * rows[:, :, :, k:k + w] for k in range(2 * radius + 1))


# ---------------------------------------------------------------------------------------------
# randomness and helpers


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None,
             low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return (torch.rand(shape, generator=generator, device=source) * (high - low) + low).to(device)


def _normal(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


def _random_signs(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.where(_uniform(shape, device, generator) < 0.5, -1.0, 1.0)


def _choose_ops(n: int, pool: int, per_sample: int, device: torch.device,
                generator: torch.Generator | None) -> torch.Tensor:
    """(n, pool) bool: ``per_sample`` distinct ops per row, uniformly at random (ranks of random keys)."""
    ranks = _uniform((n, pool), device, generator).argsort(dim=1).argsort(dim=1)
    return ranks < min(per_sample, pool)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _scale_about_mean(y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (y - mean) * _per_sample(factor)


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"augmentation needs a float (N, C, H, W) batch, got {x.dtype} {tuple(x.shape)}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (isinstance(value, (int, float)) and low <= value <= high and not math.isnan(value)):
        raise CryopickError(f"{name} must be in [{low}, {high}], got {value!r}")


def _check_config(cfg: AugmentConfig, max_shift: float) -> None:
    _check_range("max_shift", max_shift, 0.0, math.inf)
    _check_range("augment.rotate_degrees", cfg.rotate_degrees, 0.0, 180.0)
    _check_range("augment.randaugment_ops", cfg.randaugment_ops, 0, len(RANDAUGMENT_OPS))
    _check_range("augment.randaugment_magnitude", cfg.randaugment_magnitude, 0.0, 1.0)
    _check_range("augment.cutout", cfg.cutout, 0.0, 1.0)
    _check_range("augment.noise_std", cfg.noise_std, 0.0, math.inf)
    _check_range("augment.contrast", cfg.contrast, 0.0, 1.0)
    _check_range("augment.mixup", cfg.mixup, 0.0, math.inf)
