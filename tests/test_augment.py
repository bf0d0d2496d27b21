"""Augmentation: geometry about the patch centre (64, 64), determinism, and each strong op's effect."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from cryopick.augment import RANDAUGMENT_OPS, cutout, gaussian_blur, mixup, strong_augment, weak_augment
from cryopick.config import AugmentConfig
from cryopick.errors import CryopickError

SIZE = 64  # small patches keep the suite fast; the geometry does not depend on the size
CENTRE = SIZE // 2

# Strong augmentation with nothing but the op under test.
BARE = AugmentConfig(rotate_degrees=0.0, rot90=False, flips=False, randaugment_ops=1, randaugment_magnitude=0.5,
                     cutout=0.0, noise_std=0.0, contrast=0.0, mixup=0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def noise_batch(n=6, size=SIZE, seed=1):
    return torch.randn(n, 1, size, size, generator=gen(seed))


def blob_batch(n=8, sigma=2.0, row=CENTRE, col=CENTRE):
    rows, cols = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                                indexing="ij")
    blob = torch.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2))
    return blob.expand(n, 1, SIZE, SIZE).clone()


def centroids(batch):
    """(row, col) intensity centroid of each image."""
    rows, cols = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                                indexing="ij")
    w = batch[:, 0].clamp(min=0)
    total = w.sum(dim=(1, 2))
    return torch.stack([(w * rows).sum(dim=(1, 2)) / total, (w * cols).sum(dim=(1, 2)) / total], dim=1)


def dihedral_images(img):
    """The 8 flips/quarter turns of a 2-D array about pixel (CENTRE, CENTRE), NaN where the source is outside."""
    out = []
    idx = np.arange(SIZE) - CENTRE
    rows, cols = np.meshgrid(idx, idx, indexing="ij")
    for a, b, c, d in [(1, 0, 0, 1), (-1, 0, 0, 1), (1, 0, 0, -1), (-1, 0, 0, -1),
                       (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, -1, 0), (0, -1, -1, 0)]:
        src_r, src_c = a * rows + b * cols + CENTRE, c * rows + d * cols + CENTRE
        inside = (src_r >= 0) & (src_r < SIZE) & (src_c >= 0) & (src_c < SIZE)
        view = np.full((SIZE, SIZE), np.nan, dtype=np.float32)
        view[inside] = img[src_r[inside], src_c[inside]]
        out.append(view)
    return out


# ------------------------------------------------------------------ weak

def test_weak_identity_when_everything_is_off():
    x = noise_batch()
    y = weak_augment(x, max_shift=0.0, rotate_degrees=0.0, rot90=False, flips=False, generator=gen())
    assert torch.allclose(y, x, atol=1e-5)


def test_weak_keeps_shape_dtype_device_and_is_deterministic():
    x = noise_batch().double()
    a = weak_augment(x, 3.0, generator=gen(7))
    b = weak_augment(x, 3.0, generator=gen(7))
    c = weak_augment(x, 3.0, generator=gen(8))
    assert a.shape == x.shape and a.dtype == torch.float64 and a.device == x.device
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_weak_flips_and_quarter_turns_are_about_the_centre_pixel():
    # No shift or small rotation: every output is one of the 8 dihedral images of the input about
    # pixel (32, 32) (compared wherever the source pixel lies inside the patch), and several differ.
    x = noise_batch(n=16)
    y = weak_augment(x, 0.0, rotate_degrees=0.0, rot90=True, flips=True, generator=gen(3))
    used = set()
    for k in range(x.shape[0]):
        candidates = dihedral_images(x[k, 0].numpy())
        errors = [np.nanmax(np.abs(y[k, 0].numpy() - cand)) for cand in candidates]
        best = int(np.argmin(errors))
        assert errors[best] < 1e-4
        used.add(best)
    assert len(used) >= 3


def test_weak_centre_blob_stays_at_centre_under_rotation_flips_and_quarter_turns():
    x = blob_batch()
    x[:, 0, CENTRE, CENTRE + 5] += 0.3  # an asymmetric feature, so the rotations do something
    y = weak_augment(x, 0.0, rotate_degrees=10.0, rot90=True, flips=True, generator=gen(4))
    assert not torch.allclose(y, x, atol=1e-3)
    peak = y[:, 0].flatten(1).argmax(dim=1)
    assert torch.equal(peak // SIZE, torch.full_like(peak, CENTRE))
    assert torch.equal(peak % SIZE, torch.full_like(peak, CENTRE))
    # a symmetric blob alone keeps its centroid exactly (to interpolation error)
    y_sym = weak_augment(blob_batch(), 0.0, rotate_degrees=10.0, generator=gen(4))
    assert torch.allclose(centroids(y_sym), torch.full((8, 2), float(CENTRE)), atol=0.02)


def test_weak_shift_moves_centre_blob_by_at_most_max_shift():
    max_shift = 4.0
    y = weak_augment(blob_batch(n=32), max_shift, rotate_degrees=10.0, generator=gen(5))
    moved = (centroids(y) - CENTRE).norm(dim=1)
    assert moved.max().item() <= max_shift + 1.0
    assert moved.max().item() > 1.0  # the shift is actually applied


def test_weak_cpu_generator_is_independent_of_global_seed():
    x = noise_batch()
    torch.manual_seed(123)
    a = weak_augment(x, 2.0, generator=gen(9))
    torch.manual_seed(456)
    b = weak_augment(x, 2.0, generator=gen(9))
    assert torch.equal(a, b)


def test_weak_rejects_bad_input():
    with pytest.raises(ValueError, match="N, C, H, W"):
        weak_augment(torch.zeros(SIZE, SIZE), 1.0)
    with pytest.raises(CryopickError, match="max_shift"):
        weak_augment(noise_batch(), -1.0)


# ------------------------------------------------------------------ strong

def test_strong_default_changes_images_keeps_them_finite_and_normalised():
    x = noise_batch(n=32)
    y = strong_augment(x, AugmentConfig(), max_shift=3.0, generator=gen(11))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert ((y - x).abs().flatten(1).amax(dim=1) > 0.1).all()  # every sample changed
    assert abs(y.mean().item()) < 0.5
    assert 0.3 < y.std().item() < 2.0
    assert y.abs().max().item() < 20.0


def test_strong_is_deterministic_for_a_seed():
    x = noise_batch(n=8)
    cfg = dataclasses.replace(AugmentConfig(), mixup=0.75)
    a = strong_augment(x, cfg, 2.0, generator=gen(21))
    b = strong_augment(x, cfg, 2.0, generator=gen(21))
    c = strong_augment(x, cfg, 2.0, generator=gen(22))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("op", RANDAUGMENT_OPS)
def test_each_strong_op_changes_the_image_and_stays_finite(op):
    x = noise_batch(n=4)
    y = strong_augment(x, BARE, 0.0, generator=gen(31), ops=(op,))
    assert torch.isfinite(y).all()
    assert ((y - x).abs().flatten(1).amax(dim=1) > 0.05).all()
    assert y.std().item() < 2.0


def test_strong_with_no_ops_and_no_geometry_is_identity():
    cfg = dataclasses.replace(BARE, randaugment_ops=0)
    x = noise_batch()
    assert torch.allclose(strong_augment(x, cfg, 0.0, generator=gen()), x, atol=1e-5)


def test_brightness_shifts_each_sample_by_plus_or_minus_magnitude():
    x = noise_batch(n=8)
    y = strong_augment(x, BARE, 0.0, generator=gen(2), ops=("brightness",))
    shift = (y - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-5)  # constant per sample
    assert torch.allclose(shift[:, 0].abs(), torch.full((8,), 0.5), atol=1e-5)  # m = 0.5


def test_posterize_quantises_to_sixteen_levels_at_half_magnitude():
    # m = 0.5: round(2^(6 − 2)) = 16 levels over [−3, 3], step 6/16 = 0.375
    x = noise_batch(n=2)
    y = strong_augment(x, BARE, 0.0, generator=gen(), ops=("posterize",))
    steps = y / 0.375
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert (y - x).abs().max().item() <= 0.1875 + 1e-5


def test_solarize_negates_values_beyond_the_level():
    # m = 0.5: level 3·(1 − 0.5) = 1.5; "+" negates x ≥ 1.5, "−" negates x ≤ −1.5; the rest is untouched
    x = noise_batch(n=8)
    y = strong_augment(x, BARE, 0.0, generator=gen(), ops=("solarize",))
    for k in range(8):
        upper = torch.where(x[k] >= 1.5, -x[k], x[k])
        lower = torch.where(x[k] <= -1.5, -x[k], x[k])
        assert torch.allclose(y[k], upper, atol=1e-5) or torch.allclose(y[k], lower, atol=1e-5)


def test_geometric_strong_ops_keep_a_centre_blob_at_the_centre():
    for op in ("rotate", "shear", "scale"):
        y = strong_augment(blob_batch(n=4), dataclasses.replace(BARE, randaugment_magnitude=1.0), 0.0,
                           generator=gen(), ops=(op,))
        assert torch.allclose(centroids(y), torch.full((4, 2), float(CENTRE)), atol=0.05), op


def test_noise_has_the_configured_scale():
    cfg = dataclasses.replace(BARE, randaugment_ops=0, noise_std=0.3)
    x = torch.zeros(64, 1, SIZE, SIZE)
    y = strong_augment(x, cfg, 0.0, generator=gen(6))
    per_sample = y.flatten(1).std(dim=1)
    assert per_sample.max().item() <= 0.3 * 1.1
    # σ = 0.3·U(0, 1): the mean of the per-sample σ is about 0.15
    assert per_sample.mean().item() == pytest.approx(0.15, abs=0.04)


def test_cutout_zeroes_one_square_of_the_expected_size():
    x = torch.ones(6, 1, SIZE, SIZE)
    y = cutout(x, 0.25, generator=gen(8))  # side round(0.25·64) = 16 -> 256 zeros
    zeros = y[:, 0] == 0
    assert zeros.flatten(1).sum(dim=1).tolist() == [256] * 6
    for k in range(6):
        rows, cols = torch.nonzero(zeros[k], as_tuple=True)
        assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15
    positions = {tuple(torch.nonzero(zeros[k])[0].tolist()) for k in range(6)}
    assert len(positions) > 1


def test_cutout_through_strong_augment():
    cfg = dataclasses.replace(BARE, randaugment_ops=0, cutout=0.5)
    y = strong_augment(torch.full((3, 1, SIZE, SIZE), 2.0), cfg, 0.0, generator=gen())
    assert (y[:, 0] == 0).flatten(1).sum(dim=1).tolist() == [32 * 32] * 3


def test_contrast_jitter_keeps_mean_and_scales_deviation():
    cfg = dataclasses.replace(BARE, randaugment_ops=0, contrast=0.3)
    x = noise_batch(n=16) + 1.0
    y = strong_augment(x, cfg, 0.0, generator=gen(12))
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-4)
    ratio = y.flatten(1).std(dim=1) / x.flatten(1).std(dim=1)
    assert ((ratio >= 0.7 - 1e-4) & (ratio <= 1.3 + 1e-4)).all()
    assert ratio.std().item() > 0.01


def test_mixup_blends_with_a_partner_and_dominant_weight():
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 4, 4).contiguous()
    mixed, lam, perm = mixup(x, 0.75, generator=gen(13))
    assert ((lam >= 0.5) & (lam <= 1.0)).all()
    expected = lam.view(6, 1, 1, 1) * x + (1 - lam.view(6, 1, 1, 1)) * x[perm]
    assert torch.allclose(mixed, expected)
    assert sorted(perm.tolist()) == list(range(6))


def test_strong_mixup_only_when_asked():
    cfg = dataclasses.replace(BARE, randaugment_ops=0, mixup=0.75)
    x = noise_batch(n=8)
    assert torch.allclose(strong_augment(x, cfg, 0.0, generator=gen(), mix=False), x, atol=1e-5)
    assert not torch.allclose(strong_augment(x, cfg, 0.0, generator=gen(), mix=True), x, atol=1e-3)


def test_gaussian_blur_preserves_constants_and_sum():
    flat = torch.full((1, 1, 16, 16), 3.0)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat, atol=1e-5)
    dot = torch.zeros(1, 1, 33, 33)
    dot[0, 0, 16, 16] = 1.0
    blurred = gaussian_blur(dot, 1.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 16, 16].item() == pytest.approx(1 / (2 * np.pi), rel=0.05)  # 2-D Gaussian peak


@pytest.mark.parametrize("field,value", [("randaugment_magnitude", 1.5), ("cutout", -0.1), ("noise_std", -1.0),
                                         ("randaugment_ops", 99), ("contrast", 2.0)])
def test_strong_rejects_bad_config(field, value):
    with pytest.raises(CryopickError, match=field):
        strong_augment(noise_batch(n=2), dataclasses.replace(AugmentConfig(), **{field: value}), 1.0)


def test_strong_rejects_unknown_op():
    with pytest.raises(CryopickError, match="unknown"):
        strong_augment(noise_batch(n=2), BARE, 0.0, ops=("warp-drive",))


def test_ops_are_distinct_per_sample():
    # Two ops from a pool of two: both must be applied to every sample, never the same one twice.
    cfg = dataclasses.replace(BARE, randaugment_ops=2)
    x = noise_batch(n=8)
    y = strong_augment(x, cfg, 0.0, generator=gen(), ops=("brightness", "posterize"))
    for k, sample in enumerate(y):
        brightness = [xk + s for xk, s in itertools.product([x[k]], [0.5, -0.5])]
        posterized = [torch.round(b / 0.375) * 0.375 for b in brightness]
        assert any(torch.allclose(sample, p, atol=1e-4) for p in posterized)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_batch_with_cpu_generator_matches_cpu():
    x = noise_batch(n=4)
    cpu = strong_augment(x, AugmentConfig(), 2.0, generator=gen(3))
    cuda = strong_augment(x.cuda(), AugmentConfig(), 2.0, generator=gen(3))
    assert cuda.device.type == "cuda"
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-3)
