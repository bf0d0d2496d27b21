"""The torch device and how models run on it, the same way for train and pick: device choice (torchrun-aware),
bf16 autocast (CUDA only) and channels-last memory."""

from __future__ import annotations

import os
from typing import Callable, ContextManager, TypeVar

import torch

from cryopick.errors import CryopickError
from cryopick.progress import warn

T = TypeVar("T", torch.Tensor, torch.nn.Module)


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
        device = torch.device(name)
    except RuntimeError:
        raise CryopickError(f"unknown device '{name}' (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CryopickError(f"device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1} (CUDA_VISIBLE_DEVICES renumbers them)")
    return device


def autocast_factory(bf16: bool) -> Callable[[], ContextManager]:
    """A context-manager factory: bf16 autocast on CUDA, or a disabled one."""
    if bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def channels_last(x: T, enabled: bool) -> T:
    """A model or an NCHW batch in channels-last memory when ``enabled`` (faster convolutions on CUDA and on CPUs)."""
    if not enabled:
        return x
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


def to_input(patches: torch.Tensor, enabled: bool) -> torch.Tensor:
    """A batch of (N, H, W) patches as the model's float (N, 1, H, W) input, channels-last when ``enabled``."""
    return channels_last(patches.float().unsqueeze(1), enabled)
