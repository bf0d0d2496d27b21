"""Checkpoints: plain dicts of tensors and primitives, loadable with ``weights_only=True``.

A checkpoint records everything ``pick`` needs: model spec and weights (student and EMA teacher),
the resolved training config, the dataset's preprocessing record, the code version and metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cryopick import __version__
from cryopick.errors import CryopickError
from cryopick.fsutil import load_torch_weights, save_torch_atomic
from cryopick.model import PatchClassifier, build_model
from cryopick.preprocessing import PreprocessRecord

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, *, model_spec: dict, model_state: dict, ema_state: dict | None,
                    config: dict, preprocess: dict, metrics: dict | None = None, epoch: int = 0,
                    step: int = 0, training_state: dict | None = None) -> None:
    """Write atomically; ``training_state`` (optimizer, scheduler, RNG) makes ``--resume`` exact."""
    payload = {
        "format": "cryopick-checkpoint",
        "format_version": CHECKPOINT_FORMAT,
        "cryopick_version": __version__,
        "model_spec": dict(model_spec),
        "model_state": model_state,
        "ema_state": ema_state,
        "config": config,
        "preprocess": dict(preprocess),
        "metrics": metrics or {},
        "epoch": int(epoch),
        "step": int(step),
        "training_state": training_state,
    }
    save_torch_atomic(path, payload)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint; a clear error for missing, corrupt or foreign files."""
    path = Path(path)
    if path.is_dir():
        raise CryopickError(f"{path}: is a directory; give the checkpoint file (e.g. {path / 'checkpoints' / 'best.pt'})"
                            if (path / "checkpoints").is_dir() else f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CryopickError(f"{path}: checkpoint not found")
    ckpt = load_torch_weights(path, "cryopick checkpoint", map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "cryopick-checkpoint":
        raise CryopickError(f"{path}: not a cryopick checkpoint")
    missing = [k for k in ("model_spec", "model_state", "preprocess") if not ckpt.get(k)]
    if missing:
        what = "its preprocessing record (binning, pixel size, diameter)" if missing == ["preprocess"] else \
            ", ".join(missing)
        raise CryopickError(f"{path}: the checkpoint lacks {what}, so it cannot be used; train again to get a "
                            "complete checkpoint")
    version = ckpt.get("format_version")
    if version != CHECKPOINT_FORMAT:
        raise CryopickError(
            f"{path}: checkpoint format {version} is not supported by cryopick {__version__} "
            f"(reads format {CHECKPOINT_FORMAT}); retrain or use the cryopick version that wrote it "
            f"({ckpt.get('cryopick_version', 'unknown')})"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> PatchClassifier:
    """The network in eval mode, with the EMA teacher's weights when present (what training evaluated)."""
    spec = ckpt["model_spec"]
    try:
        model = build_model(spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise CryopickError(f"checkpoint model spec {spec} is not usable ({exc})") from None
    state = ckpt["ema_state"] if (use_ema and ckpt.get("ema_state")) else ckpt["model_state"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__)[:200]
        raise CryopickError(f"checkpoint weights do not match its model spec {spec} ({detail})") from None
    broken = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise CryopickError(f"checkpoint weights hold NaN or infinite values ({broken[0]}"
                            + (f" and {len(broken) - 1} more" if len(broken) > 1 else "")
                            + "): training diverged; train again (e.g. with a lower --lr)")
    return model.eval()


def preprocess_from_checkpoint(ckpt: dict) -> PreprocessRecord:
    return PreprocessRecord.from_dict(ckpt.get("preprocess"), remedy="use a checkpoint written by cryopick train")

