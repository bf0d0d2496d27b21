"""Choosing the torch device, the same way for train and pick (torchrun-aware)."""

from __future__ import annotations

import os

import torch

from cryopick.errors import CryopickError
from cryopick.progress import warn


def resolve_device(name: str, environ=os.environ) -> torch.device:
    """``auto``: the GPU of this torchrun rank (``LOCAL_RANK``) when CUDA works, else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{int(environ.get('LOCAL_RANK', 0) or 0)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        warn(f"device {name} was asked for but CUDA is not available; running on the CPU (slow)")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CryopickError(f"unknown device '{name}' (auto, cpu, cuda or cuda:N)") from None
