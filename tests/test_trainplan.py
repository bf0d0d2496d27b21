"""Training's cost line, validation budget, held-out threshold and per-epoch line: values, not presence."""

import math
import re

import numpy as np
import pytest
import torch
from helpers import plain as _plain
from helpers import small_dataset

from cryopick.config import TrainConfig, resolve
from cryopick.data import SplitData
from cryopick.train import summary_lines, train
from cryopick.trainplan import (
    VAL_MIN_PATCHES,
    CostEstimate,
    epoch_line,
    first_epoch_best_warning,
    format_duration,
    forwards_per_step,
    spread_indices,
    threshold_report,
    validation_budget,
    validation_subset,
)


def test_forward_passes_per_step_count_every_view():
    assert forwards_per_step(6, 26, "selective", 1.0) == 6 + 26 + 2 * 26  # weak P+U, strong U, teacher U
    assert forwards_per_step(6, 26, "all", 1.0) == 32 + 2 * 32
    assert forwards_per_step(6, 26, "none", 1.0) == 32
    assert forwards_per_step(6, 26, "selective", 0.0) == 32


def test_validation_budget_is_a_share_of_training_work():
    # the dev set: 77 steps × 84 forward passes; a quarter is 1617 of its 4041 held-out patches
    assert validation_budget(77, 84, 0.25, 20000) == 1617
    assert validation_budget(25, 84, 0.25, 20000) == 525
    assert validation_budget(3, 84, 0.25, 20000) == VAL_MIN_PATCHES  # never fewer than this
    assert validation_budget(10_000, 84, 0.25, 20000) == 20000  # val_max_patches still caps
    assert validation_budget(3, 84, 0.0, 7000) == 7000  # budget off


def test_validation_subset_keeps_every_positive_and_spreads_over_micrographs():
    n_pos, n_unl = 41, 4000
    split = SplitData(torch.arange(n_pos).float().view(-1, 1, 1), torch.arange(n_unl).float().view(-1, 1, 1),
                      torch.arange(n_unl).float(), torch.zeros(n_pos, dtype=torch.long),
                      torch.arange(n_unl) // 1000)  # four micrographs of 1000 unlabeled patches each
    sub = validation_subset(split, 600)
    assert len(sub.positive) == 41 and len(sub.unlabeled) == 559
    per_mic = torch.bincount(sub.unlabeled_micrograph, minlength=4).tolist()
    assert max(per_mic) - min(per_mic) <= 1  # stratified: each micrograph its share
    assert torch.equal(sub.unlabeled[:, 0, 0], sub.unlabeled_truth_distance)  # rows stay aligned
    assert torch.equal(validation_subset(split, 600).unlabeled, sub.unlabeled)  # deterministic
    many = validation_subset(SplitData(torch.zeros(900, 1, 1), torch.zeros(900, 1, 1), torch.zeros(900)), 600)
    assert (len(many.positive), len(many.unlabeled)) == (300, 300)  # positives get at most half
    assert validation_subset(split, 10_000) is split
    assert spread_indices(10, 4).tolist() == [0, 2, 5, 7] and spread_indices(5, 0).tolist() == []


def test_threshold_report_pu_estimate_on_known_scores():
    p_pos = np.array([0.9] * 8 + [0.3] * 2)  # 10 held-out positives, recall 0.8 at 0.5
    p_unl = np.array([0.9] * 20 + [0.1] * 80)  # 20% of unlabeled above 0.5
    out = threshold_report(p_pos, p_unl, prior=0.2)
    assert out["val_n_positive"] == 10 and out["val_n_unlabeled"] == 100
    # precision = π·recall / P_U(score ≥ t) = 0.2 · 0.8 / 0.2
    assert out["val_est_precision"] == pytest.approx(0.8)
    # best F1: t in (0.3, 0.9] gives recall 0.8, precision 0.8; t ≤ 0.3 gives recall 1, precision 0.2/0.2=1 → F1 1
    assert 0.1 < out["val_patch_f1_threshold"] <= 0.3 and out["val_patch_f1"] == pytest.approx(1.0)
    assert out["val_recall90_score"] == 0.3  # the 10th percentile of the held-out positives' scores
    few = threshold_report(p_pos[:5], p_unl, prior=0.2)
    assert "val_patch_f1_threshold" not in few and "val_recall90_score" not in few and "val_est_precision" in few
    assert threshold_report(np.zeros(0), p_unl, 0.2) == {"val_n_positive": 0, "val_n_unlabeled": 100}


def test_threshold_report_with_truth_uses_true_labels():
    p_pos = np.full(10, 0.8)
    p_unl = np.array([0.8] * 5 + [0.6] * 5 + [0.1] * 90)
    true_unl = np.array([1] * 5 + [0] * 95)
    out = threshold_report(p_pos, p_unl, prior=0.5, true_unl=true_unl)
    assert out["val_est_precision"] == pytest.approx(15 / 20)  # at 0.5: 15 true of 20 picked
    assert 0.6 < out["val_patch_f1_threshold"] <= 0.8 and out["val_patch_f1"] == pytest.approx(1.0)


def test_cost_estimate_arithmetic_and_line():
    est = CostEstimate("resnet8", "cpu", steps_per_epoch=25, epochs=10, batch_size=32, val_patches=525,
                       val_available=4041, samples_per_s=80.0, val_patches_per_s=262.5)
    assert est.samples_per_epoch == 800
    assert est.train_seconds_per_epoch == pytest.approx(10.0)
    assert est.val_seconds_per_epoch == pytest.approx(2.0)
    assert est.total_seconds == pytest.approx(120.0)
    assert est.cost_line().startswith("resnet8 on cpu: 25 steps/epoch × 10 epochs, ~80 samples/s → ~12 s/epoch, "
                                      "~2 min total (validation ~2 s/epoch")
    assert est.plan_line() == ("training plan: 25 steps/epoch × 10 epochs, 800 samples/epoch; 525 held-out patches "
                               "scored per epoch (of 4041; train.val_budget)")
    assert [format_duration(s) for s in (0.2, 40, 89, 95, 3000, 5400, 9000)] == \
        ["1 s", "40 s", "89 s", "2 min", "50 min", "1.5 h", "2.5 h"]


def test_epoch_line_and_first_epoch_warning():
    row = {"epoch": 2, "val_recall": 0.625, "val_est_precision": 0.7, "val_n_positive": 41,
           "val_recall90_score": 0.31}
    assert epoch_line(row, 10, "auc_pn", 0.912, 2) == (
        "epoch 3/10:  held-out recall 0.62 of 41 labeled particles, est. precision 0.70 at p ≥ 0.5; "
        "90% of them score ≥ 0.31; best so far: epoch 3 (this one), auc_pn 0.912")
    truth = {"epoch": 0, "val_recall": 0.1, "val_n_positive": 16, "val_true_recall": 0.5, "val_true_precision": 0.9}
    assert epoch_line(truth, 5, "auc_pn", -math.inf, -1) == (
        "epoch 1/5:  held-out recall 0.10 of 16 labeled particles, precision 0.90 (true labels) at p ≥ 0.5")
    assert "no held-out metrics" in epoch_line({"epoch": 0}, 5, "auc_pn", 1.0, 0)
    assert "first epoch of 6" in first_epoch_best_warning(0, 6, "auc_pn")
    assert first_epoch_best_warning(3, 6, "auc_pn") is None and first_epoch_best_warning(0, 2, "auc_pn") is None


# ---------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("planset"))


def _config(dataset_dir, out, mode="dense"):
    return resolve(TrainConfig, None, {
        "data.data_dir": str(dataset_dir), "train.output_root": str(out), "train.exp_name": "run",
        "model.backbone": "resnet8", "train.epochs": 2, "train.steps_per_epoch": 3, "train.device": "cpu",
        "data.mode": mode})


@pytest.mark.parametrize("mode", ["dense", "patches"])
def test_cost_line_is_printed_and_measuring_leaves_the_run_unchanged(dataset_dir, tmp_path, capsys, mode):
    quiet = train(_config(dataset_dir, tmp_path / "q", mode), quiet=True).history
    result = train(_config(dataset_dir, tmp_path / "l", mode), quiet=False)
    loud = result.history
    err = _plain(capsys.readouterr().err)
    # the timing steps run on a copy with its own random streams: the run itself is bit-identical
    assert [r["loss"] for r in quiet] == [r["loss"] for r in loud]
    assert [r["val_auc_pu"] for r in quiet] == [r["val_auc_pu"] for r in loud]
    if mode == "dense":
        plan = f"96 crops/epoch; {loud[0]['val_n_positive']} held-out labels (data.holdout_labels) judged by dense"
        epoch = "held-out labels outscore"
    else:
        plan = f"96 samples/epoch; {loud[0]['val_n_positive'] + loud[0]['val_n_unlabeled']} held-out patches"
        epoch = "held-out recall"
    assert f"training plan: 3 steps/epoch × 2 epochs, {plan}" in err
    unit = "crops" if mode == "dense" else "samples"
    m = re.search(rf"resnet8 on cpu: 3 steps/epoch × 2 epochs, ~([\d.]+) {unit}/s → ~(\d+) s/epoch, ~(\d+) s total", err)
    assert m, err  # below 10 samples/s (a loaded machine) the rate has one decimal
    rate, per_epoch, total = (float(v) for v in m.groups())
    assert rate > 0 and per_epoch >= 96 / rate * 0.5 and abs(total - 2 * per_epoch) <= 2
    assert f"epoch 1/2: {epoch}" in err and f"epoch 2/2: {epoch}" in err
    summary, command, _ = summary_lines(result, _config(dataset_dir, tmp_path / "l"))
    assert summary.startswith(f"best auc_pn {result.best_metric:.4f} at epoch {result.best_epoch + 1} of 2; ")
    mics = dataset_dir.parent / "sim" / "micrographs.star"  # recorded by extract in the manifest
    assert command == (f"next: cryopick pick {mics} --model {tmp_path / 'l' / 'run' / 'checkpoints' / 'best.pt'} "
                       "--out picks/ --preview 3")
