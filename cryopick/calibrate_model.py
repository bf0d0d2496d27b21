"""Calibrate a trained checkpoint on the labeled micrographs extract kept (see ``cryopick.calibrate``).

The micrographs are scored exactly as ``pick`` scores them (dense map, peaks, NMS at half the diameter);
peaks are matched one-to-one to the labels within half the diameter (as ``evaluate`` matches). Labels of
validation micrographs never trained the model, so they are used when there are any; otherwise the
training micrographs' labels are used and the calibration is marked optimistic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryopick.calibrate import Calibration, fit_calibration
from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.dataset import load_labeled_micrographs
from cryopick.errors import CryopickError
from cryopick.evaluate import match_picks
from cryopick.fsutil import save_torch_atomic
from cryopick.inference import DenseScorer
from cryopick.nms import candidate_picks


def peak_scores(model, micrographs: list[dict], pad: int, radius_px: float, device: torch.device,
                tile_size: int = 2048) -> tuple[np.ndarray, np.ndarray, int]:
    """(all peak probabilities, probabilities of the peaks matched to labels, number of labels)."""
    scorer = DenseScorer(model, device, pad, tile_size, amp=False)
    peaks, matched, n_labels = [], [], 0
    for mic in micrographs:
        binned = mic["binned"].float()
        logits = scorer(binned[None])[0]
        scales = tuple(float(v) for v in mic["scales"])
        shape = tuple(int(v) for v in mic["shape"])
        geometry = scorer.geometry(scales)
        cand = candidate_picks(logits, geometry, tuple(binned.shape), shape, radius_px)
        labels = mic["labels"].numpy().reshape(-1, 2)
        hit = match_picks(np.stack([cand.x, cand.y], axis=1), cand.score, labels, radius_px)
        peaks.append(cand.score)
        matched.append(cand.score[hit])
        n_labels += len(labels)
    return np.concatenate(peaks), np.concatenate(matched), n_labels


def calibration_micrographs(data_dir: str | Path) -> tuple[list[dict], bool]:
    """Labeled validation micrographs when there are any (held out: True), else the training ones."""
    mics = [m for m in load_labeled_micrographs(data_dir) if len(m["labels"])]
    held_out = [m for m in mics if m["split"] == "val"]
    return (held_out, True) if held_out else (mics, False)


def calibrate_checkpoint(checkpoint: str | Path, data_dir: str | Path, expected_particles: float | None = None,
                         device: torch.device | str = "cpu") -> Calibration:
    """Fit the calibration of ``checkpoint`` on ``data_dir``'s labeled micrographs and store it in the file."""
    ckpt = load_checkpoint(checkpoint)
    record = preprocess_from_checkpoint(ckpt)
    mics, held_out = calibration_micrographs(data_dir)
    if not mics:
        raise CryopickError(f"{data_dir}: no labeled micrographs kept by extract (a dataset of format ≥ 2 "
                            "is needed): cannot calibrate")
    model = model_from_checkpoint(ckpt)
    radius = record.diameter_A / 2 / record.pixel_size
    peaks, matched, n_labels = peak_scores(model, mics, record.patch_size // 2, radius, torch.device(device))
    calibration = fit_calibration(peaks, matched, n_labels, len(mics), held_out, expected_particles)
    ckpt["calibration"] = calibration.to_dict()
    save_torch_atomic(checkpoint, ckpt)
    return calibration

