import numpy as np
import pytest
import torch

from cryopick.errors import CryopickError
from cryopick.preprocessing import (
    PreprocessRecord,
    axis_scales,
    binned_shape,
    choose_bin_factor,
    fourier_crop,
    micrograph_factor,
    preprocess,
    robust_normalise,
)


def test_bin_factor_puts_particle_at_half_the_patch():
    # 200 Å at 1 Å/px = 200 px; half a 128 patch is 64 px → 200/64 = 3.1 → bin 3
    assert choose_bin_factor(200, 1.0) == 3.0
    # 120 Å at 1.7 Å/px = 70.6 px → bin 1
    assert choose_bin_factor(120, 1.7) == 1.0
    assert choose_bin_factor(200, 1.0, bin_factor=4) == 4.0
    assert choose_bin_factor(200, 1.0, target_pixel_size=2.5) == pytest.approx(2.5)


@pytest.mark.parametrize("kwargs", [dict(bin_factor=2, target_pixel_size=2.0), dict(target_pixel_size=0.5),
                                    dict(bin_factor=0)])
def test_bin_factor_rejects_nonsense(kwargs):
    with pytest.raises(CryopickError):
        choose_bin_factor(200, 1.0, **kwargs)


def test_binned_shape_and_scales_non_square():
    assert binned_shape((4092, 5760), 4) == (1023, 1440)
    sy, sx = axis_scales((4092, 5760), 4)
    assert sy == pytest.approx(4.0) and sx == pytest.approx(4.0)
    sy, sx = axis_scales((1001, 1000), 3)
    assert sy == pytest.approx(1001 / 334) and sx == pytest.approx(1000 / 333)


def test_fourier_crop_preserves_low_frequencies_and_mean():
    ny, nx = 96, 128
    y, x = np.mgrid[0:ny, 0:nx]
    # a wave of 2 cycles across the image survives binning ×2 exactly (sampled at even pixels)
    image = 3 + np.cos(2 * np.pi * 2 * x / nx) + np.sin(2 * np.pi * 3 * y / ny)
    out = fourier_crop(torch.tensor(image, dtype=torch.float64), (48, 64)).numpy()
    np.testing.assert_allclose(out, image[::2, ::2], atol=1e-9)


def test_fourier_crop_removes_frequencies_above_new_nyquist():
    nx = 128
    x = np.arange(nx)
    image = np.tile(np.cos(2 * np.pi * 40 * x / nx), (8, 1))  # 40 cycles > 32 (Nyquist after ×2)
    out = fourier_crop(torch.tensor(image), (4, 64)).numpy()
    assert np.abs(out).max() < 1e-9  # removed, not aliased to 24 cycles


def test_fourier_upsampling_interpolates_band_limited_images_exactly():
    # micrographs coarser than training's binned pixel are upsampled (they used to fail: "cannot Fourier-crop")
    y, x = np.mgrid[0:96, 0:128]
    fine = 3 + np.cos(2 * np.pi * 2 * x / 128) + np.sin(2 * np.pi * 3 * y / 96)
    out = fourier_crop(torch.tensor(fine[::2, ::2], dtype=torch.float64), (96, 128)).numpy()
    np.testing.assert_allclose(out, fine, atol=1e-9)
    odd = fourier_crop(torch.tensor(fine[::2, ::2], dtype=torch.float64), (51, 67)).numpy()
    assert odd.shape == (51, 67) and abs(odd.mean() - 3) < 1e-9
    assert np.allclose(fourier_crop(fourier_crop(torch.tensor(fine), (97, 131)), (96, 128)).numpy(), fine)


def test_robust_normalise_ignores_contamination():
    rng = np.random.default_rng(0)
    image = rng.normal(10.0, 2.0, (400, 400))
    image[:120, :120] -= 40.0  # dark ice contamination, 9% of the area
    out = robust_normalise(torch.tensor(image, dtype=torch.float32)).numpy()
    clean = out[150:, 150:]
    assert abs(clean.mean()) < 0.05 and abs(clean.std() - 1) < 0.05
    naive = (image - image.mean()) / image.std()
    assert abs(naive[150:, 150:].std() - 1) > 0.5  # what plain mean/std would give


def test_preprocess_returns_float32_and_scales():
    image = np.random.default_rng(1).normal(size=(300, 200)).astype(np.float16)
    out, scales = preprocess(image, 2)
    assert out.dtype == torch.float32 and tuple(out.shape) == (150, 100)
    assert scales == (2.0, 2.0)


def test_record_round_trip_and_version_check():
    rec = PreprocessRecord(pixel_size=1.1, bin_factor=3.0, diameter_A=180.0)
    assert PreprocessRecord.from_dict(rec.to_dict()) == rec
    assert rec.binned_pixel_size == pytest.approx(3.3)
    assert rec.diameter_binned_px == pytest.approx(180 / 3.3)
    with pytest.raises(CryopickError, match="version"):
        PreprocessRecord.from_dict({**rec.to_dict(), "version": 99})


def test_micrograph_factor_rescales_other_pixel_sizes():
    rec = PreprocessRecord(pixel_size=1.0, bin_factor=4.0, diameter_A=200.0)
    assert micrograph_factor(rec, 1.0) == 4.0
    assert micrograph_factor(rec, 2.0) == 2.0  # twice-coarser micrographs need half the binning
    assert micrograph_factor(rec, None) == 4.0
