"""PNG previews of picks: the binned micrograph, low-pass filtered and contrast-stretched, with a
circle at each pick coloured from red (at the threshold) to green (probability 1)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
from skimage.draw import circle_perimeter
from skimage.filters import gaussian

from cryopick.fsutil import atomic_path

LOWPASS_SIGMA = 1.5  # binned px: removes pixel noise, keeps particle-sized features
STRETCH_PERCENTILES = (1.0, 99.0)


def contrast_stretch(image: np.ndarray) -> np.ndarray:
    """Grey levels 0–255 between the 1st and 99th percentile of a low-passed copy."""
    smooth = gaussian(np.asarray(image, dtype=np.float32), sigma=LOWPASS_SIGMA, preserve_range=True)
    low, high = np.percentile(smooth, STRETCH_PERCENTILES)
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((smooth - low) * scale, 0, 255).astype(np.uint8)


def score_colours(scores: np.ndarray, threshold: float) -> np.ndarray:
    """RGB rows from red (score = threshold) to green (score = 1)."""
    span = max(1.0 - threshold, 1e-6)
    t = np.clip((np.asarray(scores, dtype=np.float64) - threshold) / span, 0.0, 1.0)
    return np.stack([255 * (1 - t), 255 * t, np.zeros_like(t)], axis=1).astype(np.uint8)


def preview_image(binned: np.ndarray, x_binned: np.ndarray, y_binned: np.ndarray, scores: np.ndarray,
                  radius_binned: float, threshold: float) -> np.ndarray:
    """RGB uint8 image ``(rows, cols, 3)``: the stretched micrograph with a 2-px circle per pick."""
    grey = contrast_stretch(binned)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    colours = score_colours(scores, threshold)
    radius = max(int(round(radius_binned)), 2)
    for cx, cy, colour in zip(x_binned, y_binned, colours):
        for r in (radius - 1, radius):
            rr, cc = circle_perimeter(int(round(cy)), int(round(cx)), r, shape=rgb.shape[:2])
            rgb[rr, cc] = colour
    return rgb


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write atomically (the temporary name has no .png, so the format is named explicitly)."""
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image, extension=".png")
