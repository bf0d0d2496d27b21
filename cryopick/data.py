"""Training data in memory: the train/val splits of a loaded dataset, and P:U batch sampling from them.

Reading and writing the dataset on disk is ``cryopick.dataset``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from cryopick.errors import CryopickError
from cryopick.preprocessing import PreprocessRecord


@dataclass
class SplitData:
    """One split's patches and, per patch, what extract recorded about it."""

    positive: torch.Tensor  # (n_p, P, P) float16
    unlabeled: torch.Tensor  # (n_u, P, P) float16
    unlabeled_truth_distance: torch.Tensor  # (n_u,) original px to the nearest true particle; NaN when unknown
    positive_micrograph: torch.Tensor | None = None  # (n_p,) micrograph index; None when unknown
    unlabeled_micrograph: torch.Tensor | None = None  # (n_u,)

    def to(self, device: torch.device) -> "SplitData":
        return SplitData(self.positive.to(device), self.unlabeled.to(device), self.unlabeled_truth_distance.to(device),
                         self.positive_micrograph, self.unlabeled_micrograph)

    def unlabeled_from_labeled_micrographs(self) -> "SplitData":
        """Only the unlabeled patches of micrographs that also gave positives (unchanged when unknown)."""
        if self.positive_micrograph is None or self.unlabeled_micrograph is None:
            return self
        keep = torch.isin(self.unlabeled_micrograph, torch.unique(self.positive_micrograph))
        idx = keep.nonzero()[:, 0]
        return SplitData(self.positive, self.unlabeled[idx.to(self.unlabeled.device)],
                         self.unlabeled_truth_distance[idx.to(self.unlabeled_truth_distance.device)],
                         self.positive_micrograph, self.unlabeled_micrograph[idx])


@dataclass
class PatchDataset:
    """A loaded dataset: both splits and the preprocessing they were cut with."""

    train: SplitData
    val: SplitData
    record: PreprocessRecord
    has_truth: bool
    mean_binned_area: float  # binned px² per micrograph, for the prior from expected particles
    source: Path


def batch_composition(batch_size: int, ratio: list[int]) -> tuple[int, int]:
    """(positives, unlabeled) per batch: ``batch_size`` patches split by the P:U ratio."""
    if len(ratio) != 2 or min(ratio) <= 0:
        raise CryopickError(f"data.batch_ratio must be two positive numbers P U, got {ratio}")
    n_p = max(1, int(round(batch_size * ratio[0] / (ratio[0] + ratio[1]))))
    n_u = batch_size - n_p
    if n_u < 1:
        raise CryopickError(f"batch size {batch_size} is too small for P:U = {ratio[0]}:{ratio[1]}")
    return n_p, n_u


class PUBatchSampler:
    """Index batches: an epoch is one pass over the larger of the two sets (by default), so every
    positive is seen at least once per epoch; positives are cycled through fresh permutations.

    The order depends only on (seed, epoch), so a resumed run can skip to any step of an epoch.
    Under DDP each rank takes every ``world``-th batch.
    """

    def __init__(self, n_pos: int, n_unl: int, n_p: int, n_u: int, seed: int, steps_per_epoch: int | None = None,
                 rank: int = 0, world: int = 1):
        if n_pos == 0 or n_unl == 0:
            raise CryopickError(f"training needs positives and unlabeled patches (have {n_pos} and {n_unl})")
        self.n_pos, self.n_unl, self.n_p, self.n_u = n_pos, n_unl, n_p, n_u
        self.seed, self.rank, self.world = seed, rank, world
        default = math.ceil(max(n_pos / n_p, n_unl / n_u))
        self.global_steps = max(world, steps_per_epoch or default)
        self.steps_per_epoch = self.global_steps // world

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        pos = self._stream(self.n_pos, self.n_p * self.global_steps, g)
        unl = self._stream(self.n_unl, self.n_u * self.global_steps, g)
        for step in range(self.rank, self.steps_per_epoch * self.world, self.world):
            yield pos[step * self.n_p:(step + 1) * self.n_p], unl[step * self.n_u:(step + 1) * self.n_u]

    @staticmethod
    def _stream(n: int, length: int, g: torch.Generator) -> torch.Tensor:
        reps = math.ceil(length / n)
        return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:length]
