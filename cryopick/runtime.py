"""The training process around the loop: torchrun ranks (``Distributed``), the stop request on Ctrl-C/SIGTERM
(``StopRequest``), and snapshots of the random streams so a stopped run resumes exactly."""

from __future__ import annotations

import os
import signal
import threading

import torch

from cryopick.progress import warn


def is_main_process(environ=os.environ) -> bool:
    """True on torchrun's rank 0, and in a plain (non-distributed) run."""
    return int(environ.get("RANK", "0") or 0) == 0


class Distributed:
    """torchrun support: rank/world from the environment, DDP wrapping, rank-0-only side effects."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        self.device = device
        if self.active and not torch.distributed.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if device.type == "cuda":
                torch.cuda.set_device(local)
                self.device = torch.device("cuda", local)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.active:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.broadcast(t, 0)
        return bool(t.item())

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class StopRequest:
    """Ctrl-C or SIGTERM (cluster schedulers) asks to stop after the current step, so the saved state is
    exactly a step boundary; a second signal stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        warn("stopping after this step and saving a resumable state (press Ctrl-C again to stop at once)")

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def rng_snapshot(gen: torch.Generator) -> tuple:
    """The augmentation generator's and torch's global (CPU, CUDA) random states, in memory."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return gen.get_state(), torch.get_rng_state(), cuda


def rng_restore(gen: torch.Generator, snapshot: tuple) -> None:
    gen_state, cpu_state, cuda_states = snapshot
    gen.set_state(gen_state)
    torch.set_rng_state(cpu_state)
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)


def rng_state_dict(gen: torch.Generator) -> dict:
    """The random states as stored in a checkpoint's training state."""
    gen_state, cpu_state, cuda_states = rng_snapshot(gen)
    return {"generator": gen_state, "torch_rng": cpu_state, "cuda_rng": cuda_states}


def load_rng_state_dict(gen: torch.Generator, state: dict) -> None:
    """Restore what ``rng_state_dict`` stored (CUDA states only where CUDA is available)."""
    gen.set_state(state["generator"].cpu() if gen.device.type == "cpu" else state["generator"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
