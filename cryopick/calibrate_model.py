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

from cryopick.calibrate import Calibration, default_cut, default_threshold, fit_calibration
from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.dataset import load_labeled_micrographs
from cryopick.errors import CryopickError, naming
from cryopick.fsutil import save_torch_atomic
from cryopick.inference import DenseScorer
from cryopick.metrics import auc_standard_error, pu_corrected_auc
from cryopick.nms import candidate_picks
from cryopick.pickmatch import match_picks
from cryopick.progress import info, warn


def peak_scores(model, micrographs: list[dict], pad: int, radius_px: float, device: torch.device,
                tile_size: int = 2048) -> tuple[np.ndarray, np.ndarray, int]:
    """(all peak probabilities, probabilities of the peaks matched to labels, number of labels)."""
    peaks, hits, n_labels = scored_peaks(model, micrographs, pad, radius_px, device, tile_size)
    return peaks, peaks[hits], n_labels


def scored_peaks(model, micrographs: list[dict], pad: int, radius_px: float, device: torch.device,
                 tile_size: int = 2048) -> tuple[np.ndarray, np.ndarray, int]:
    """(all peak probabilities, which of them are matched to a label, number of labels).

    Peaks matched to a micrograph's ``exclude`` labels (those that trained the model) are left out: their
    particles are known, and their scores would flatter the model.
    """
    scorer = DenseScorer(model, device, pad, tile_size, amp=False)
    peaks, matched, n_labels = [], [], 0
    for mic in micrographs:
        binned = mic["binned"].float()
        logits = scorer(binned[None])[0]
        scales = tuple(float(v) for v in mic["scales"])
        shape = tuple(int(v) for v in mic["shape"])
        geometry = scorer.geometry(scales)
        cand = candidate_picks(logits, geometry, tuple(binned.shape), shape, radius_px)
        xy, score = np.stack([cand.x, cand.y], axis=1), cand.score
        exclude = mic.get("exclude")
        if exclude is not None and len(exclude):
            known = match_picks(xy, score, exclude.numpy().reshape(-1, 2), radius_px)
            xy, score = xy[~known], score[~known]
        labels = mic["labels"].numpy().reshape(-1, 2)
        hit = match_picks(xy, score, labels, radius_px)
        peaks.append(score)
        matched.append(hit)
        n_labels += len(labels)
    if not peaks:
        return np.zeros(0), np.zeros(0, dtype=bool), 0
    return np.concatenate(peaks), np.concatenate(matched), n_labels


def calibration_micrographs(data_dir: str | Path, split_held_out: bool = True) -> tuple[list[dict], bool]:
    """Labeled validation micrographs when there are any and training left them out (``split_held_out``;
    held out: True), else every labeled micrograph (held out: False)."""
    mics = [m for m in load_labeled_micrographs(data_dir) if len(m["labels"])]
    held_out = [m for m in mics if m["split"] == "val"] if split_held_out else []
    return (held_out, True) if held_out else (mics, False)


def calibrate_checkpoint(checkpoint: str | Path, data_dir: str | Path, expected_particles: float | None = None,
                         device: torch.device | str = "cpu", held_out_labels: list[dict] | None = None,
                         split_held_out: bool = True) -> Calibration:
    """Fit the calibration of ``checkpoint`` and store it in the file: on ``held_out_labels`` (labeled micrographs
    whose ``labels`` were held out of training and whose ``exclude`` labels trained it, from dense training)
    or else on ``data_dir``'s labeled micrographs (``split_held_out``: whether training left extract's val
    split out, as patch training does; dense training crops every labeled micrograph)."""
    ckpt = load_checkpoint(checkpoint)
    with naming(checkpoint):
        record = preprocess_from_checkpoint(ckpt)
    if held_out_labels:
        mics, held_out = held_out_labels, True
    else:
        mics, held_out = calibration_micrographs(data_dir, split_held_out)
    if not mics:
        raise CryopickError(f"{data_dir}: no labeled micrographs kept by extract (a dataset of format ≥ 2 "
                            "is needed): cannot calibrate")
    with naming(checkpoint):
        model = model_from_checkpoint(ckpt)
    radius = record.diameter_A / 2 / record.pixel_size
    peaks, matched, n_labels = peak_scores(model, mics, record.patch_size // 2, radius, torch.device(device))
    n_known = sum(len(m["exclude"]) for m in mics if m.get("exclude") is not None)
    calibration = fit_calibration(peaks, matched, n_labels, len(mics), held_out, expected_particles, n_known)
    ckpt["calibration"] = calibration.to_dict()
    save_torch_atomic(checkpoint, ckpt)
    return calibration



def checkpoint_default_threshold(checkpoint: str | Path) -> float:
    """The cut ``pick`` makes with ``checkpoint`` when given no --threshold (``default_threshold``)."""
    data = load_checkpoint(checkpoint).get("calibration")
    with naming(checkpoint):
        return default_threshold(Calibration.from_dict(data) if data else None)


def held_out_metrics(model, held_out: list[dict], record, device: torch.device, prior: float) -> dict:
    """Dense training's validation: the held-out labels' peaks against every other peak, scored as pick scores.

    ``val_auc_pu`` is the probability that a held-out label's peak outscores another peak (a label no peak
    matched counts as scored below all); ``val_auc_pn`` corrects it for the particles among the other peaks
    (prior ``prior``, 0 when unknown); ``val_recall`` is the fraction of held-out labels with a peak ≥ 0.5;
    ``*_se`` are their standard errors (Hanley–McNeil): with 10–30 held-out labels, a few hundredths.
    """
    radius = record.diameter_A / 2 / record.pixel_size
    peaks, hits, n_labels = scored_peaks(model, held_out, record.patch_size // 2, radius, device)
    if n_labels == 0 or len(peaks) == 0:
        return {}
    matched, others = peaks[hits], np.sort(peaks[~hits])
    below = np.searchsorted(others, matched, side="left")
    ties = np.searchsorted(others, matched, side="right") - below
    wins = (below + 0.5 * ties).sum() / max(len(others), 1)
    auc = float(wins / n_labels)
    se = auc_standard_error(auc, n_labels, len(others))
    return {"val_auc_pu": auc, "val_auc_pn": pu_corrected_auc(auc, prior),
            "val_auc_pu_se": se, "val_auc_pn_se": se / (1 - prior),
            "val_recall": float((matched >= 0.5).sum() / n_labels), "val_n_positive": n_labels,
            "val_n_peaks": len(others)}


def calibrate_best(best_path: Path, data_dir: str | Path, expected_particles: float | None, device: torch.device,
                   quiet: bool, held_out: list[dict] | None = None, split_held_out: bool = True) -> None:
    """Train's last act: store pick's calibration in best.pt and say what it found; a failure leaves the raw
    scores and says what to do."""
    try:
        calibration = calibrate_checkpoint(best_path, data_dir, expected_particles, device, held_out,
                                           split_held_out)
    except CryopickError as exc:
        warn(f"pick calibration failed: {exc}. pick will write uncalibrated scores; choose a threshold "
             "(pick --expected-particles N prints the one giving N picks per micrograph)")
        return
    threshold, reason = default_cut(calibration)
    info(f"pick calibration: {calibration.describe()}; pick's default p ≥ {threshold:.3g} "
         f"({reason}) ↔ raw score {_fmt(calibration.raw_threshold(threshold))}", quiet)


def _fmt(value: float | None) -> str:
    return "never reached" if value is None else f"{value:.3g}"
