"""Dense training data: target maps, flips/turns with their labels, held-out labels, the crop sampler."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cryopick.crops import CropSampler, crop_sources, dihedral, hold_out_labels, target_map
from cryopick.model import PatchClassifier


def test_target_map_marks_samples_within_the_radius():
    # samples at crop px 0, 8, 16, 24 (stride 8, crop 32); one label at (x=9, y=17), radius 3
    t = target_map(np.array([[9.0, 17.0]]), 32, 8, 3.0)
    assert t.shape == (4, 4)
    assert t.sum() == 1 and t[2, 1]  # sample (row 2, col 1) is at (x=8, y=16): distance √2 ≤ 3
    t = target_map(np.array([[12.0, 12.0]]), 32, 8, 6.0)  # 4 samples at distance √32 ≈ 5.66
    assert t.sum() == 4 and t[1:3, 1:3].all()
    assert not target_map(np.zeros((0, 2)), 32, 8, 6.0).any()


@pytest.mark.parametrize("code", range(8))
def test_dihedral_moves_labels_with_the_image(code):
    crop = torch.zeros(16, 16)
    crop[3, 11] = 1.0  # row 3, column 11: label (x=11, y=3)
    out, labels = dihedral(crop, np.array([[11.0, 3.0]]), code)
    x, y = labels[0]
    assert out[int(y), int(x)] == 1.0 and out.sum() == 1.0


def test_held_out_labels_are_a_seeded_fifth_of_each_micrograph():
    mics = [{"name": "a", "labels": torch.arange(20.0).reshape(10, 2)},
            {"name": "b", "labels": torch.ones(1, 2)}]
    train, held = hold_out_labels(mics, 0.2, seed=3)
    assert [len(m["labels"]) for m in train] == [8, 1]  # a single label is never held out
    assert len(held) == 1 and len(held[0]["labels"]) == 2 and len(held[0]["exclude"]) == 8
    together = torch.cat([train[0]["labels"], held[0]["labels"]])
    assert sorted(together[:, 0].tolist()) == sorted(mics[0]["labels"][:, 0].tolist())
    again = hold_out_labels(mics, 0.2, seed=3)[1]
    assert torch.equal(again[0]["labels"], held[0]["labels"])


def _sources():
    image = torch.randn(200, 300)
    labels = torch.tensor([[50.0, 40.0], [150.0, 120.0], [250.0, 160.0]])  # original px (x, y); scales 1
    mic = {"name": "m", "binned": image.half(), "scales": torch.tensor([1.0, 1.0], dtype=torch.float64),
           "shape": torch.tensor([200, 300]), "labels": labels}
    return crop_sources([mic], pad=32), image


def test_crop_sampler_is_deterministic_and_exact():
    sources, image = _sources()
    sampler = CropSampler(sources, 64, 8, 4.0, n_p=2, n_u=6, seed=1, steps_per_epoch=3, dihedral_augment=False)
    batches = list(sampler.epoch(0))
    assert len(batches) == 3
    crops, targets = batches[0]
    assert crops.shape == (8, 64, 64) and targets.shape == (8, 8, 8) and targets.dtype == torch.bool
    assert targets[:2].flatten(1).any(1).all()  # the n_p centred crops hold a label within the sample grid
    again = list(sampler.epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not torch.equal(list(sampler.epoch(1))[0][0], crops)
    # a crop is the padded micrograph's pixels: find it back in the (reflect-)padded image
    padded = sources[0].padded.float()
    for crop in crops:
        hits = [(t, left) for t in range(padded.shape[0] - 63) for left in range(padded.shape[1] - 63)
                if torch.equal(padded[t:t + 64, left:left + 64], crop.float())]
        assert hits


def test_crop_sampler_targets_are_where_the_model_map_samples_lie():
    """Sample (i, j) of the model's map of a crop is centred on crop px (8i, 8j): targets use the same grid."""
    sources, _ = _sources()
    sampler = CropSampler(sources, 64, 8, 4.0, n_p=4, n_u=0 + 1, seed=0, steps_per_epoch=1)
    crops, targets = next(iter(sampler.epoch(0)))
    model = PatchClassifier("resnet8", 0.0).eval()
    with torch.no_grad():
        maps = model(crops.float()[:, None], dense=True)
    assert maps.shape == targets.shape


@pytest.mark.parametrize("margin", [0, 16])
def test_targets_mark_the_labels_inside_the_crop_whatever_the_margin_and_flip(margin):
    """A micrograph that is 1 exactly at its labels: every positive target sample has a 1 within the radius of
    its centre (crop px (m + 8j, m + 8i)), and every label inside the central crop lights a positive sample."""
    image = torch.zeros(200, 300)
    labels = torch.tensor([[50.0, 40.0], [150.0, 120.0], [250.0, 160.0], [120.0, 60.0]])
    for x, y in labels.long():
        image[y, x] = 1.0
    mic = {"name": "m", "binned": image.half(), "scales": torch.tensor([1.0, 1.0], dtype=torch.float64),
           "shape": torch.tensor([200, 300]), "labels": labels}
    sampler = CropSampler(crop_sources([mic], pad=32 + margin), 64, 8, 5.0, n_p=6, n_u=6, seed=2, steps_per_epoch=2,
                          margin=margin)
    for crops, targets in sampler.epoch(0):
        assert crops.shape[-1] == 64 + 2 * margin and targets.shape[-1] == 8
        for crop, target in zip(crops.float(), targets):
            ys, xs = torch.nonzero(crop == 1.0, as_tuple=True)
            for i, j in torch.nonzero(target):
                d = torch.hypot((xs - (margin + 8 * j)).float(), (ys - (margin + 8 * i)).float())
                assert len(d) and d.min() <= 5.0
            inside = (xs >= margin) & (xs <= margin + 56) & (ys >= margin) & (ys <= margin + 56)
            assert int(target.sum()) >= int(inside.sum())  # each such label is ≤ 5.66 px from a sample


def test_dense_step_uses_the_central_map_only():
    from cryopick.config import TrainConfig
    from cryopick.trainstep import dense_step_loss

    cfg = TrainConfig()
    cfg.loss.consistency = "none"
    model = PatchClassifier("resnet8", 0.0)
    crops = torch.randn(2, 1, 96, 96)
    targets = torch.zeros(2, 8, 8, dtype=torch.bool)
    targets[0, 4, 4] = True
    _, logs = dense_step_loss(model, model, crops, targets, cfg, 0.0, 0.0, contextlib.nullcontext, torch.Generator())
    maps = model(crops, dense=True)[:, 2:10, 2:10]  # 12×12 map of a 96-px crop; its central 8×8
    # π = 0, π' = 0.5: half the positives' and half the unlabeled samples' mean BCE
    expected = 0.5 * F.softplus(-maps[0, 4, 4]) + 0.5 * F.softplus(maps[targets.logical_not()]).mean()
    assert float(logs["pu_loss"]) == pytest.approx(float(expected.detach()), abs=1e-5)


class _Recorder(torch.nn.Module):
    """A model that records the batch size of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x, dense=False):
        self.sizes.append(len(x))
        return self.model(x, dense=dense)


def test_consistency_crops_are_that_share_of_the_batch_drawn_by_the_generator():
    from cryopick.trainstep import consistency_crops

    assert consistency_crops(32, 1.0, "cpu", torch.Generator()).tolist() == list(range(32))
    chosen = consistency_crops(32, 0.25, "cpu", torch.Generator().manual_seed(3))
    assert len(chosen) == 8 and len(set(chosen.tolist())) == 8 and 0 <= int(chosen.min()) <= int(chosen.max()) < 32
    assert chosen.tolist() == consistency_crops(32, 0.25, "cpu", torch.Generator().manual_seed(3)).tolist()
    assert len(consistency_crops(5, 0.01, "cpu", torch.Generator())) == 1  # at least one
    assert len(consistency_crops(5, 0.5, "cpu", torch.Generator())) == 3  # ceil


@pytest.mark.parametrize("fraction, strong", [(1.0, 8), (0.25, 2)])
def test_dense_step_gives_strong_views_and_the_teacher_pass_to_the_chosen_crops_only(fraction, strong):
    from cryopick.config import TrainConfig
    from cryopick.trainstep import dense_step_loss

    cfg = TrainConfig()
    cfg.loss.consistency_fraction = fraction
    student, teacher = _Recorder(PatchClassifier("resnet8", 0.0)), _Recorder(PatchClassifier("resnet8", 0.0))
    crops, targets = torch.randn(8, 1, 64, 64), torch.zeros(8, 8, 8, dtype=torch.bool)
    targets[0, 4, 4] = True
    _, logs = dense_step_loss(student, teacher, crops, targets, cfg, 0.0, 5.0, contextlib.nullcontext,
                              torch.Generator().manual_seed(0))
    assert student.sizes == [8 + strong] and teacher.sizes == [strong]
    assert 0.0 <= float(logs["mask_rate"]) <= 1.0 and float(logs["lambda_cons"]) > 0
