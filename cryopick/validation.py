"""Patch-level scoring of a classifier: the positive radius, probabilities on held-out patches, and their PU
and true metrics. Used by train's per-epoch validation and by ``cryopick evaluate --data-dir``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryopick.checkpoint import load_checkpoint, model_from_checkpoint
from cryopick.data import SplitData
from cryopick.dataset import load_dataset
from cryopick.device import autocast_factory, resolve_device, to_input
from cryopick.errors import CryopickError, naming
from cryopick.metrics import binary_metrics, pu_corrected_auc
from cryopick.preprocessing import PreprocessRecord
from cryopick.progress import warn
from cryopick.trainplan import threshold_report


def positive_radius_px(max_shift: float, record: PreprocessRecord) -> float:
    """The positive tolerance in binned px: the weak crop shift (``data.max_shift`` diameters), so training's
    augmentation, the prior from an expected particle count and the true labels of held-out patches agree."""
    return max_shift * record.diameter_binned_px


@torch.no_grad()
def predict(model: torch.nn.Module, patches: torch.Tensor, device: torch.device, autocast,
            batch: int = 256, channels_last: bool = False) -> np.ndarray:
    """Sigmoid probabilities of ``patches`` (N, H, W), in batches, in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(patches), batch):
        x = to_input(patches[start:start + batch].to(device), channels_last)
        with autocast():
            out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def validate(model, split: SplitData, prior: float, radius_original_px: float, device, autocast,
             channels_last: bool, threshold: float = 0.5) -> dict:
    """PU metrics (positives vs unlabeled), the PU-corrected AUC, and true metrics when truth is known.

    Every patch of ``split`` is scored: train passes its budgeted subset (``trainplan.validation_subset``).
    """
    if len(split.positive) == 0 or len(split.unlabeled) == 0:
        return {}
    p_pos = predict(model, split.positive, device, autocast, channels_last=channels_last)
    p_unl = predict(model, split.unlabeled, device, autocast, channels_last=channels_last)
    scores = np.concatenate([p_pos, p_unl])
    labels = np.concatenate([np.ones(len(p_pos)), np.zeros(len(p_unl))])
    m = binary_metrics(scores, labels, threshold)
    out = {"val_auc_pu": m["auc"], "val_auc_pn": pu_corrected_auc(m["auc"], prior),
           "val_precision": m["precision"], "val_recall": m["recall"], "val_f1": m["f1"]}
    td = split.unlabeled_truth_distance.cpu().numpy()
    true_u = None
    if len(td) and np.isfinite(td).any():
        true_u = (td <= radius_original_px).astype(float)
        t = binary_metrics(scores, np.concatenate([np.ones(len(p_pos)), true_u]), threshold)
        out.update({"val_true_auc": t["auc"], "val_true_precision": t["precision"],
                    "val_true_recall": t["recall"], "val_true_f1": t["f1"]})
    out.update(threshold_report(p_pos, p_unl, prior, true_u, threshold))
    return out


def _prior_and_shift(ckpt: dict, prior: float | None) -> tuple[float, float]:
    """The class prior the run trained with (``prior`` overrides it) and its positive radius (data.max_shift)."""
    try:
        cfg = ckpt["config"]
        pi = prior if prior is not None else (ckpt.get("training_state") or {}).get("prior")
        pi = float(pi if pi is not None else (cfg["loss"].get("prior") or 0.0))
        return pi, float(cfg["data"]["max_shift"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CryopickError(f"its training config is incomplete ({type(exc).__name__}: {exc})") from None


def evaluate_patches(checkpoint: str | Path, data_dir: str | Path, split: str = "val", threshold: float = 0.5,
                     device: str = "auto", prior: float | None = None) -> dict:
    """Patch-level metrics of a checkpoint's EMA teacher on an extracted dataset (AUC, precision, recall, F1).

    Positives vs unlabeled give the PU metrics and the PU-corrected AUC; a dataset extracted with
    ``--truth`` also gives the true metrics (unlabeled patches labeled by the ground truth), on the
    same footing as the design document's table.
    """
    if not 0.0 <= threshold <= 1.0:
        raise CryopickError(f"--threshold in patch-level mode is a probability, 0 ≤ value ≤ 1; got {threshold:g}")
    ckpt = load_checkpoint(checkpoint)
    dataset = load_dataset(data_dir)
    if split not in ("train", "val", "all"):
        raise CryopickError(f"split must be train, val or all, got {split}")
    parts = [dataset.train, dataset.val] if split == "all" else [getattr(dataset, split)]
    data = SplitData(torch.cat([p.positive for p in parts]), torch.cat([p.unlabeled for p in parts]),
                     torch.cat([p.unlabeled_truth_distance for p in parts]))
    dev = resolve_device(device)
    with naming(checkpoint):
        model = model_from_checkpoint(ckpt).to(dev)
        pi, max_shift = _prior_and_shift(ckpt, prior)
    if split != "train" and (ckpt.get("config") or {}).get("data", {}).get("mode") == "dense":
        warn(f"{checkpoint} was trained densely on every labeled micrograph, extract's val split included: "
             "these patch metrics are not held out (train's own validation holds out labels instead)")
    radius = positive_radius_px(max_shift, dataset.record) * dataset.record.bin_factor
    metrics = validate(model, data, pi, radius, dev, autocast_factory(dev.type == "cuda"),
                       channels_last=False, threshold=threshold)
    metrics.update({"n_positive": len(data.positive), "n_unlabeled": len(data.unlabeled), "prior": pi,
                    "split": split, "threshold": threshold})
    return metrics
