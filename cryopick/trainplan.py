"""What a training run will cost and what each epoch means, in words a user can act on.

- the validation budget: held-out patches scored per epoch, capped relative to the epoch's training work so
  validation never dominates a CPU run (deterministic, stratified, every positive kept where possible);
- the cost line printed before training (steps, samples, validation patches, measured speed, time);
- held-out score statistics (recall, estimated precision, the score 90% of held-out particles reach) and the
  plain line printed after each epoch.

Held-out patches are scored at the labeled centre, while pick keeps the local maxima of a dense score map, which
score higher (for particles and background alike): patch-level thresholds are diagnostics, not pick settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryopick.data import SplitData
from cryopick.metrics import best_f1_index, f1_curve

VAL_MIN_PATCHES = 512  # below this, held-out AUC/recall are too noisy to pick the best epoch by
MIN_POSITIVES_FOR_THRESHOLD = 10  # fewer held-out positives: no score quantile or best-F1 threshold


# ---------------------------------------------------------------------------------------------
# validation budget


def forwards_per_step(n_p: int, n_u: int, consistency: str, lambda_cons: float, mode: str = "patches") -> int:
    """Patches (or crops) through the network in one training step: weak, strong and the teacher's views."""
    views = n_p + n_u
    if consistency != "none" and lambda_cons > 0:
        # a dense crop mixes labeled and unlabeled samples: every crop gets a strong view
        strong = n_u if consistency == "selective" and mode != "dense" else n_p + n_u
        views += 2 * strong  # the student's strong view and the teacher's weak view of the same patches
    return views


def validation_budget(steps_per_epoch: int, per_step: int, fraction: float, max_patches: int) -> int:
    """Held-out patches scored per epoch: ``fraction`` of the epoch's training forward passes (at least
    VAL_MIN_PATCHES), never more than ``max_patches``; ``fraction`` ≤ 0 means no budget, only the cap."""
    if fraction <= 0:
        return max_patches
    return min(max_patches, max(VAL_MIN_PATCHES, int(fraction * steps_per_epoch * per_step)))


def spread_indices(n: int, k: int) -> np.ndarray:
    """``k`` of ``range(n)`` evenly spread (deterministic). Patches are stored micrograph by micrograph, so this
    takes every micrograph's share in proportion: a subsample stratified by micrograph."""
    k = max(0, min(n, k))
    return (np.arange(k) * n) // k if k else np.zeros(0, dtype=np.int64)


def validation_subset(split: SplitData, budget: int) -> SplitData:
    """At most ``budget`` held-out patches: every positive while they fit in half of it, unlabeled the rest."""
    n_pos, n_unl = len(split.positive), len(split.unlabeled)
    if n_pos + n_unl <= budget:
        return split
    keep_unl = min(n_unl, budget - min(n_pos, budget // 2))
    keep_pos = min(n_pos, budget - keep_unl)
    ip, iu = torch.from_numpy(spread_indices(n_pos, keep_pos)), torch.from_numpy(spread_indices(n_unl, keep_unl))

    def pick(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[idx.to(t.device)]

    return SplitData(pick(split.positive, ip), pick(split.unlabeled, iu), pick(split.unlabeled_truth_distance, iu),
                     pick(split.positive_micrograph, ip), pick(split.unlabeled_micrograph, iu))


# ---------------------------------------------------------------------------------------------
# threshold from the held-out patches


def threshold_report(p_pos: np.ndarray, p_unl: np.ndarray, prior: float, true_unl: np.ndarray | None = None,
                     threshold: float = 0.5) -> dict:
    """Estimated precision at ``threshold``, the score 90% of held-out particles reach, and the patch-level
    threshold of best estimated F1 (a diagnostic: pick's peak scores run higher than patch scores).

    Without truth, labeled positives give recall(t) directly and the unlabeled patches, a fraction π of them
    positive, give precision(t) = π·recall(t) / P_U(score ≥ t) (clipped to 1): the precision among random patch
    centres if π is right. With truth (simulated data) both come from the true labels.
    """
    out: dict = {"val_n_positive": len(p_pos), "val_n_unlabeled": len(p_unl)}
    if len(p_pos) == 0 or len(p_unl) == 0:
        return out
    grid = np.round(np.arange(0.02, 0.99, 0.01), 2)
    if true_unl is not None:
        scores = np.concatenate([p_pos, p_unl])
        labels = np.concatenate([np.ones(len(p_pos), bool), np.asarray(true_unl, bool)])
        hits = _at_least(scores[labels], grid)
        picked = _at_least(scores, grid)
        recall = hits / max(int(labels.sum()), 1)
        precision = np.where(picked > 0, hits / np.maximum(picked, 1), np.nan)
    else:
        recall = _at_least(p_pos, grid) / len(p_pos)
        above = _at_least(p_unl, grid) / len(p_unl)
        precision = np.where(above > 0, np.minimum(1.0, prior * recall / np.maximum(above, 1e-12)), np.nan)
    at = int(np.argmin(np.abs(grid - threshold)))
    out["val_est_precision"] = float(precision[at])
    if len(p_pos) >= MIN_POSITIVES_FOR_THRESHOLD:
        out["val_recall90_score"] = float(np.quantile(p_pos, 0.1, method="lower"))
        f1 = f1_curve(precision, recall)
        best = best_f1_index(precision, recall)
        if best is not None and f1[best] > 0:
            out["val_patch_f1_threshold"] = float(grid[best])
            out["val_patch_f1"] = float(f1[best])
    return out


def _at_least(scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """How many ``scores`` reach each threshold of the ascending ``grid``."""
    return len(scores) - np.searchsorted(np.sort(scores), grid, side="left")


# ---------------------------------------------------------------------------------------------
# the lines printed


def format_duration(seconds: float) -> str:
    """Seconds as a person reads them: '40 s', '3 min', '1.5 h'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class CostEstimate:
    """The arithmetic behind the line printed before training."""

    backbone: str
    device: str
    steps_per_epoch: int
    epochs: int  # epochs still to run
    batch_size: int
    val_patches: int
    val_available: int
    samples_per_s: float  # training patches per second (batch_size per step), measured
    val_patches_per_s: float  # held-out patches scored per second, measured
    held_out_labels: int | None = None  # dense training: validation scores these held-out labels' micrographs

    @property
    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.batch_size

    @property
    def train_seconds_per_epoch(self) -> float:
        return self.samples_per_epoch / self.samples_per_s if self.samples_per_s > 0 else math.inf

    @property
    def val_seconds_per_epoch(self) -> float:
        if self.held_out_labels is not None:
            return 0.0  # dense validation picks the held-out labels' micrographs: not measured beforehand
        if self.val_patches == 0:
            return 0.0
        return self.val_patches / self.val_patches_per_s if self.val_patches_per_s > 0 else math.inf

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds_per_epoch + self.val_seconds_per_epoch

    @property
    def total_seconds(self) -> float:
        return self.epochs * self.seconds_per_epoch

    @property
    def _unit(self) -> str:
        return "crops" if self.held_out_labels is not None else "samples"

    def plan_line(self) -> str:
        if self.held_out_labels is not None:
            val = f"{self.held_out_labels} held-out labels (data.holdout_labels) judged by dense picking every epoch"
        else:
            val = (f"{self.val_patches} held-out patches scored per epoch"
                   + (f" (of {self.val_available}; train.val_budget)" if self.val_patches < self.val_available
                      else ""))
        return (f"training plan: {self.steps_per_epoch} steps/epoch × {self.epochs} epochs, "
                f"{self.samples_per_epoch} {self._unit}/epoch; {val}")

    def cost_line(self) -> str:
        return (f"{self.backbone} on {self.device}: {self.steps_per_epoch} steps/epoch × {self.epochs} epochs, "
                f"~{self.samples_per_s:.{0 if self.samples_per_s >= 10 else 1}f} {self._unit}/s → "
                f"~{format_duration(self.seconds_per_epoch)}/epoch, "
                f"~{format_duration(self.total_seconds)} total "
                + ("(plus picking the held-out labels' micrographs each epoch; " if self.held_out_labels is not None
                   else f"(validation ~{format_duration(self.val_seconds_per_epoch)}/epoch; ")
                + "early stopping may end sooner)")


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) and math.isfinite(value) else "–"


def epoch_line(row: dict, epochs: int, monitor: str, best_value: float, best_epoch: int) -> str:
    """One plain line: held-out recall and precision at 0.5 (patches) or how the held-out labels' peaks rank
    (dense), the score 90% of held-out particles reach, the best epoch so far."""
    head = f"epoch {row['epoch'] + 1}/{epochs}:"
    if "val_n_peaks" in row:  # dense training: held-out labels among the peaks of their micrographs
        parts = [f"held-out labels outscore {_fmt(row.get('val_auc_pu'))} of the other peaks "
                 f"({row['val_n_positive']} labels, {row['val_n_peaks']} peaks), "
                 f"recall {_fmt(row.get('val_recall'))} at raw p ≥ 0.5"]
    elif "val_recall" not in row:
        return (f"{head} no held-out labels, so no held-out metrics (best = lowest training loss): dense "
                "training holds out a fifth of each micrograph's labels, none of one with fewer than 3; "
                "--mode patches needs a labeled micrograph in extract's val split")
    else:
        precision = (f"precision {_fmt(row['val_true_precision'])} (true labels)" if "val_true_precision" in row
                     else f"est. precision {_fmt(row.get('val_est_precision'))}")
        parts = [f"held-out recall {_fmt(row['val_recall'])} of {row.get('val_n_positive')} labeled particles, "
                 f"{precision} at p ≥ 0.5"]
        if "val_recall90_score" in row:
            parts.append(f"90% of them score ≥ {row['val_recall90_score']:.2f}")
    if math.isfinite(best_value):
        mark = " (this one)" if best_epoch == row["epoch"] else ""
        parts.append(f"best so far: epoch {best_epoch + 1}{mark}, {monitor} {best_value:.3f}")
    return "  ".join([head, "; ".join(parts)])


def first_epoch_best_warning(best_epoch: int, epochs_run: int, monitor: str) -> str | None:
    """A warning when the first epoch stayed the best of several: later epochs did not help."""
    if best_epoch != 0 or epochs_run < 3:
        return None
    return (f"the best {monitor} was at the first epoch of {epochs_run}: the held-out score got worse as training "
            "went on. Likely too few or too similar held-out labels to judge by, or overfitting the few labels "
            "(with --mode patches also a class prior far off: --expected-particles N). Try: a lower --lr, more "
            "hand-picked micrographs; compare the pick previews of best.pt and last.pt.")


# settings that change how a run executes but not what it computes; every other key must match on --resume.
# The dataset is compared by content (resume_differences' ``saved_data``), not by its path.
RESUME_FREE_KEYS = frozenset({"train.device", "train.amp", "train.channels_last", "train.compile", "train.log_every",
                              "train.output_root", "train.exp_name", "data.data_dir"})


def resume_differences(saved: dict, current: dict, saved_data: dict, current_data: dict) -> list[str]:
    """The settings (``key: saved → now``) in which a resumed run would differ from the run in last.pt:
    resolved configs (nested dicts) and what identifies the dataset (its preprocessing record and
    fingerprint; a key the saved run lacks, from an older cryopick, is not compared)."""
    old, new = _flatten(saved), _flatten(current)
    diffs = [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
             if key not in RESUME_FREE_KEYS and old.get(key) != new.get(key)]
    diffs += [f"dataset {key}: {saved_data[key]!r} → {current_data.get(key)!r}"
              for key in sorted(saved_data) if saved_data[key] != current_data.get(key)]
    return diffs


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
