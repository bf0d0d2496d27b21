"""Exponential moving average of a model: the FixMatch/mean-teacher "teacher" and the evaluated model."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from cryopick.errors import CryopickError


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


class EMATeacher:
    """Teacher whose weights follow the student: ``t ← d·t + (1 − d)·s`` after every optimiser step.

    Parameters and floating-point buffers (BatchNorm running mean/var) are averaged; integer buffers
    (``num_batches_tracked``) are copied. The teacher is a deep copy of the student, kept in eval
    mode with ``requires_grad`` off. With ``warmup`` (default) the decay used at update ``n``
    (0-based) is ``min(decay, (1 + n)/(10 + n))``: 0.1, 0.18, 0.25, … so the teacher forgets the
    random initialisation within the first few hundred steps instead of ~1/(1 − decay) steps.

    ``state_dict()`` holds the teacher weights plus ``decay``, ``warmup`` and ``num_updates`` (to
    resume); the checkpoint's ``ema_state`` (loaded straight into a model) is ``teacher.module.state_dict()``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0 and math.isfinite(decay)):
            raise CryopickError(f"EMA decay must be in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.eval()
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        """Decay the next ``update`` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the teacher towards ``model`` (a DDP or compiled wrapper is unwrapped)."""
        student = unwrap_model(model)
        weight = 1.0 - self.current_decay()
        averaged, targets, copied, sources = [], [], [], []
        pairs = [*self._pairs(self.module.named_parameters(), student.named_parameters()),
                 *self._pairs(self.module.named_buffers(), student.named_buffers())]
        for teacher_t, student_t in pairs:
            if teacher_t.is_floating_point():
                averaged.append(teacher_t)
                targets.append(student_t.detach().to(teacher_t.device, teacher_t.dtype))
            else:
                copied.append(teacher_t)
                sources.append(student_t.to(teacher_t.device))
        # foreach kernels: one launch per group instead of one per tensor (hundreds for a ResNet-50)
        if averaged:
            torch._foreach_lerp_(averaged, targets, weight)
        if copied:
            torch._foreach_copy_(copied, sources)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay, "warmup": self.warmup,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"module", "decay", "num_updates"} - set(state)
        if missing:
            raise CryopickError(f"EMA state lacks {', '.join(sorted(missing))}")
        try:
            self.module.load_state_dict(state["module"])
        except RuntimeError as exc:
            raise CryopickError(f"EMA teacher weights do not match the model: {exc}") from None
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", self.warmup))
        self.num_updates = int(state["num_updates"])

    def to(self, device: torch.device | str) -> EMATeacher:
        self.module.to(device)
        return self

    @staticmethod
    def _pairs(teacher_items, student_items):
        teacher_items, student_items = list(teacher_items), dict(student_items)
        if len(teacher_items) != len(student_items):
            raise ValueError("EMA teacher and student have different structures")
        for name, teacher_t in teacher_items:
            if name not in student_items:
                raise ValueError(f"EMA teacher tensor {name} has no counterpart in the student")
            yield teacher_t, student_items[name]
