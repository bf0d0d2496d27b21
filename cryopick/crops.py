"""Dense training data: random crops of the binned labeled micrographs, each with a target map.

A crop of C×C binned pixels gives the network's (C/OS)×(C/OS) logit map; map sample ``(i, j)`` is centred on
crop pixel ``(i·OS, j·OS)``, exactly as in pick's map of a whole micrograph (``cryopick.inference``). Its
target is *positive* when a label lies within the positive radius of that centre, *unlabeled* otherwise, so
every forward pass gives C²/OS² PU samples instead of one (Topaz trains the same way on whole micrographs).

Crops come from the reflect-padded micrographs (the padding pick uses), centred either near a random label
(the batch's positive share of ``data.batch_ratio``: 1 of 5 crops by default) or uniformly. Flips and 90°
turns transform the crop and its labels together, so targets stay exact; the crop position itself is the
shift augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cryopick.config import TrainConfig
from cryopick.dataset import load_labeled_micrographs, reflect_pad
from cryopick.errors import CryopickError


@dataclass
class CropSource:
    """One labeled micrograph, padded, with its labels in padded binned px (x, y)."""

    name: str
    padded: torch.Tensor  # (H + 2·pad, W + 2·pad) float16
    labels: np.ndarray  # (n, 2) float64, padded binned px
    pad: int


def crop_sources(micrographs: list[dict], pad: int) -> list[CropSource]:
    """The labeled micrographs (``cryopick.dataset.load_labeled_micrographs`` entries) as crop sources."""
    sources = []
    for mic in micrographs:
        labels = mic["labels"].numpy().reshape(-1, 2).astype(np.float64)
        if not len(labels):
            continue
        scale_y, scale_x = (float(v) for v in mic["scales"])
        binned = mic["binned"].float()
        padded = reflect_pad(binned[None, None], pad)[0, 0].to(torch.float16)
        sources.append(CropSource(mic["name"], padded, labels / [scale_x, scale_y] + pad, pad))
    return sources


def hold_out_labels(micrographs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) copies of the labeled micrographs: on each, ``round(fraction·n)`` labels chosen at
    random (seeded), at most n − 1, are held out. Held-out labels are unlabeled to training (still valid PU
    data, they simply carry no label) and measure how the model scores particles it was not shown; the
    held-out copies list the training labels as ``exclude``."""
    rng = np.random.default_rng([seed, 7])
    train, held = [], []
    for mic in micrographs:
        labels = mic["labels"].reshape(-1, 2)
        n = len(labels)
        k = min(int(round(fraction * n)), max(n - 1, 0))
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:k]] = True
        keep = torch.from_numpy(mask)
        train.append({**mic, "labels": labels[~keep]})
        if k:
            held.append({**mic, "labels": labels[keep], "exclude": labels[~keep]})
    return train, held


def target_map(labels: np.ndarray, size: int, stride: int, radius: float) -> np.ndarray:
    """(size/stride)² bool map: samples (centred on crop px ``(i·stride, j·stride)``) within ``radius`` of a label
    given as crop px (x, y)."""
    n = size // stride
    if not len(labels):
        return np.zeros((n, n), dtype=bool)
    grid = np.arange(n, dtype=np.float64) * stride
    dy = grid[None, :, None] - labels[:, 1, None, None]
    dx = grid[None, None, :] - labels[:, 0, None, None]
    return ((dy * dy + dx * dx) <= radius * radius).any(axis=0)


def dihedral(crop: torch.Tensor, labels: np.ndarray, code: int) -> tuple[torch.Tensor, np.ndarray]:
    """One of the 8 flips/turns (``code`` bits: flip x, flip y, transpose) of a square crop and its labels."""
    size = crop.shape[-1]
    labels = labels.copy()
    if code & 1:
        crop, labels[:, 0] = crop.flip(-1), (size - 1) - labels[:, 0]
    if code & 2:
        crop, labels[:, 1] = crop.flip(-2), (size - 1) - labels[:, 1]
    if code & 4:
        crop, labels = crop.transpose(-1, -2), labels[:, ::-1].copy()
    return crop, labels


class CropSampler:
    """Batches of (crops ``(B, C + 2m, C + 2m)`` float16, targets ``(B, C/OS, C/OS)`` bool) from the crop sources.

    With a ``margin`` m the network sees m px of micrograph around each C×C crop and its targets cover the
    central C×C only (the map's central C/OS samples). With pick's context (``cryopick.inference.context_pad``:
    half the receptive field for backbones that see more than a patch) every trained sample sees exactly the
    input its map sample sees in pick, reflected edges included. ResNet-8 gets none: its field fits the patch,
    so its crop's centre sample is exact and samples nearer the crop's border see the crop's zero padding.

    The crops of an epoch depend only on (seed, epoch, rank), so a resumed run regenerates the same steps;
    under DDP each rank draws its own crops.
    An epoch has ``steps_per_epoch`` steps; by default enough crops to cover the labeled micrographs' area
    ``coverage`` times.
    """

    def __init__(self, sources: list[CropSource], crop_size: int, stride: int, radius: float, n_p: int, n_u: int,
                 seed: int, steps_per_epoch: int | None = None, rank: int = 0, world: int = 1,
                 coverage: float = 4.0, dihedral_augment: bool = True, margin: int = 0):
        if not sources:
            raise CryopickError("dense training needs labeled micrographs (none in the dataset's train split)")
        if crop_size % stride or crop_size <= 0 or margin % stride or margin < 0:
            raise CryopickError(f"crop size {crop_size} and margin {margin} must be multiples of the output stride "
                                f"{stride}")
        self.margin = margin  # context around the crop fed to the network, outside the targets
        self.sources, self.size, self.stride, self.radius = sources, crop_size, stride, radius
        self.n_p, self.n_u = n_p, n_u  # crops centred near a label, crops placed uniformly
        self.seed, self.rank, self.world = seed, rank, world
        self.dihedral = dihedral_augment
        area = sum((s.padded.shape[0] - 2 * s.pad) * (s.padded.shape[1] - 2 * s.pad) for s in sources)
        default = math.ceil(coverage * area / crop_size**2 / (n_p + n_u))
        self.global_steps = max(world, steps_per_epoch or default)
        self.steps_per_epoch = self.global_steps // world

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        for _ in range(self.steps_per_epoch):
            plan = [self._draw(rng, centred=i < self.n_p) for i in range(self.n_p + self.n_u)]
            yield self._cut(plan)

    def _draw(self, rng: np.random.Generator, centred: bool) -> tuple[int, int, int, int]:
        """(source, top, left, dihedral code) of one crop."""
        k = int(rng.integers(len(self.sources)))
        src = self.sources[k]
        height, width = src.padded.shape
        if centred:
            cx, cy = src.labels[rng.integers(len(src.labels))] + rng.uniform(-0.4, 0.4, 2) * self.size
        else:
            cx = rng.uniform(src.pad, width - src.pad)
            cy = rng.uniform(src.pad, height - src.pad)
        m = self.margin
        left = int(np.clip(round(cx - self.size / 2), m, width - self.size - m))
        top = int(np.clip(round(cy - self.size / 2), m, height - self.size - m))
        code = int(rng.integers(8)) if self.dihedral else 0
        return k, top, left, code

    def _cut(self, plan: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        crops, targets = [], []
        m = self.margin
        for k, top, left, code in plan:
            src = self.sources[k]
            crop = src.padded[top - m:top + self.size + m, left - m:left + self.size + m]
            near = np.abs(src.labels - [left + self.size / 2, top + self.size / 2]).max(axis=1) \
                <= self.size / 2 + self.radius
            crop, labels = dihedral(crop, src.labels[near] - [left - m, top - m], code)  # about the big crop's centre
            crops.append(crop)
            targets.append(torch.from_numpy(target_map(labels - m, self.size, self.stride, self.radius)))
        return torch.stack(crops), torch.stack(targets)


def dense_sampler(data_dir, crop_size: int, stride: int, radius: float, batch: tuple[int, int], config: TrainConfig,
                  rank: int = 0, world: int = 1, margin: int = 0) -> tuple[CropSampler, list[dict]]:
    """The crop sampler over every labeled micrograph of the dataset (both of extract's splits: every
    micrograph's labels train) less the held-out labels, and those held-out labels (validation, calibration);
    a clear error when there is nothing to crop. ``batch``: (crops near a label, crops anywhere)."""
    mics = [m for m in load_labeled_micrographs(data_dir) if len(m["labels"])]
    training, held_out = hold_out_labels(mics, config.data.holdout_labels, config.train.seed)
    sources = crop_sources(training, crop_size // 2 + margin)
    if not sources:
        raise CryopickError(f"{data_dir}: no labeled micrographs (labeled_micrographs.pt, which dense training "
                            "crops; a single .pt file has none): give the directory extract wrote or run extract "
                            "again, or train with --mode patches")
    sampler = CropSampler(sources, crop_size, stride, radius, *batch, config.train.seed, config.train.steps_per_epoch,
                          rank, world, dihedral_augment=config.augment.flips, margin=margin)
    return sampler, held_out
