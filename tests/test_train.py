import contextlib
import csv
import json
import math
import os
import signal

import pytest
import torch
from helpers import small_dataset

from cryopick.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from cryopick.config import TrainConfig, resolve
from cryopick.data import PUBatchSampler, batch_composition
from cryopick.dataset import load_dataset
from cryopick.errors import CryopickError
from cryopick.train import train
from cryopick.trainstep import lr_at, resolve_prior
from cryopick.validation import positive_radius_px


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return small_dataset(tmp_path_factory.mktemp("trainset"), truth=True)


def _config(dataset_dir, out, **over):
    base = {"data.data_dir": str(dataset_dir), "train.output_root": str(out), "train.exp_name": "run",
            "model.backbone": "resnet8", "train.epochs": 3, "train.steps_per_epoch": 3, "train.device": "cpu",
            "optim.lr": 3e-3, "optim.warmup_epochs": 0.0, "loss.cons_ramp_epochs": [0.0, 1.0]}
    base.update(over)
    return resolve(TrainConfig, None, base)


def test_running_out_of_memory_says_which_setting_to_lower(dataset_dir, tmp_path, monkeypatch):
    import cryopick.train as tr

    def allocate(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 65536000000 bytes")

    monkeypatch.setattr(tr, "_train_run", allocate)
    with pytest.raises(CryopickError, match=r"out of memory with --batch-size 32 \(resnet8 on cpu\): lower"):
        train(_config(dataset_dir, tmp_path), quiet=True)
    monkeypatch.setattr(tr, "_train_run", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors stay what they are
        train(_config(dataset_dir, tmp_path), quiet=True)


def test_batch_composition_follows_ratio():
    assert batch_composition(32, [1, 4]) == (6, 26)
    assert batch_composition(10, [1, 1]) == (5, 5)
    with pytest.raises(CryopickError):
        batch_composition(1, [1, 4])


def test_sampler_every_positive_each_epoch_and_deterministic():
    s = PUBatchSampler(n_pos=10, n_unl=100, n_p=3, n_u=12, seed=1)
    assert s.steps_per_epoch == math.ceil(100 / 12)
    batches = list(s.epoch(0))
    assert set(torch.cat([p for p, _ in batches]).tolist()) == set(range(10))
    assert all(len(p) == 3 and len(u) == 12 for p, u in batches)
    again = list(PUBatchSampler(10, 100, 3, 12, seed=1).epoch(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    ranks = [list(PUBatchSampler(10, 100, 3, 12, seed=1, rank=r, world=2).epoch(0)) for r in (0, 1)]
    assert torch.equal(ranks[1][0][0], batches[1][0])  # rank 1 takes every other batch


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0, "cosine") == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 1.0, "cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, "cosine") == pytest.approx(0.0)


def test_prior_from_expected_particles_uses_the_positive_radius(dataset_dir, tmp_path):
    cfg = _config(dataset_dir, tmp_path, **{"loss.expected_particles": 20.0, "data.mode": "patches"})
    ds = load_dataset(dataset_dir)
    r = positive_radius_px(cfg.data.max_shift, ds.record)
    assert r == pytest.approx(0.125 * 80.0)  # max_shift × diameter (80 binned px)
    assert resolve_prior(cfg, ds) == pytest.approx(20 * math.pi * r**2 / (384 * 384))
    assert resolve_prior(_config(dataset_dir, tmp_path), ds) == 0.0  # dense: balanced P vs U
    assert resolve_prior(_config(dataset_dir, tmp_path, **{"data.mode": "patches"}), ds) == 0.3


def test_dense_training_leaves_the_count_to_the_calibration(dataset_dir, tmp_path):
    ds = load_dataset(dataset_dir)
    counted = _config(dataset_dir, tmp_path, **{"loss.expected_particles": 20.0})
    assert resolve_prior(counted, ds) == 0.0  # the same π-free risk as without a count
    assert resolve_prior(_config(dataset_dir, tmp_path, **{"loss.expected_particles": 20.0, "loss.prior": 0.05}),
                         ds) == 0.05  # an explicit π still trains nnPU with it
    train(_config(dataset_dir, tmp_path / "a"), quiet=True)
    train(_config(dataset_dir, tmp_path / "b", **{"loss.expected_particles": 20.0}), quiet=True)
    plain, given = (load_checkpoint(tmp_path / d / "run" / "checkpoints" / "best.pt") for d in "ab")
    assert given["training_state"]["prior"] == 0.0
    assert all(torch.equal(plain["ema_state"][k], given["ema_state"][k]) for k in plain["ema_state"])
    assert given["calibration"]["count_given"] and given["calibration"]["particles_per_micrograph"] == 20.0


@pytest.mark.parametrize("mode", ["dense", "patches"])
def test_training_lowers_the_loss_and_writes_everything(dataset_dir, tmp_path, mode):
    cfg = _config(dataset_dir, tmp_path, **{"train.epochs": 4, "data.mode": mode})
    result = train(cfg, quiet=True)
    exp = tmp_path / "run"
    assert (exp / "config.yaml").exists() and (exp / "checkpoints" / "best.pt").exists()
    rows = list(csv.DictReader((exp / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    for key in ("loss_pos", "loss_neg", "pu_loss", "consistency_loss", "entropy_loss", "mask_rate",
                "pseudo_positive_rate", "lr", "samples_per_s", "val_auc_pu", "val_auc_pn", "val_recall") \
            + (("val_n_peaks", "val_auc_pn_se") if mode == "dense" else ("val_true_auc",)):
        assert rows[-1][key] != "", key
    if mode == "dense":  # the standard error of an AUC from a handful of held-out labels: a few hundredths
        assert 0.005 < float(rows[-1]["val_auc_pn_se"]) < 0.3
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert 0 <= float(rows[-1]["mask_rate"]) <= 1
    assert result.epochs_run == 4

    ckpt = load_checkpoint(exp / "checkpoints" / "last.pt")
    assert ckpt["model_spec"]["backbone"] == "resnet8" and ckpt["config"]["data"]["mode"] == mode
    # no count given: dense training is the balanced P-vs-U limit (π = 0), patches use the design's π = 0.3
    assert ckpt["training_state"]["prior"] == (0.0 if mode == "dense" else 0.3)
    assert preprocess_from_checkpoint(ckpt).diameter_A == 160.0
    model = model_from_checkpoint(ckpt)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 128, 128)).shape == (2,)
    # the EMA teacher is what pick uses, and it differs from the student
    assert any(not torch.equal(ckpt["ema_state"][k], ckpt["model_state"][k]) for k in ckpt["model_state"]
               if ckpt["model_state"][k].is_floating_point())


def _interrupt_at(monkeypatch, n_step):
    """Send a real SIGINT (Ctrl-C) in the middle of step ``n_step``."""
    import cryopick.train as tr

    real, calls = tr.optimisation_step, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n_step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "optimisation_step", interrupting)
    return lambda: monkeypatch.setattr(tr, "optimisation_step", real)


@pytest.mark.parametrize("mode", ["dense", "patches"])
def test_ctrl_c_mid_epoch_then_resume_matches_an_uninterrupted_run(dataset_dir, tmp_path, monkeypatch, mode):
    train(_config(dataset_dir, tmp_path / "a", **{"train.epochs": 2, "data.mode": mode}), quiet=True)
    cfg = _config(dataset_dir, tmp_path / "b", **{"train.epochs": 2, "data.mode": mode})
    restore = _interrupt_at(monkeypatch, 5)  # 3 steps per epoch: the 2nd step of epoch 1
    result = train(cfg, quiet=True)
    assert result.interrupted
    ckpt = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    # the step in flight is completed, then the state is saved at that step boundary
    assert (ckpt["training_state"]["loop"]["epoch"], ckpt["training_state"]["loop"]["step_in_epoch"]) == (1, 2)
    restore()
    result = train(cfg, resume=True, quiet=True)
    assert result.epochs_run == 2 and not result.interrupted and len(result.history) == 2
    a = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")["model_state"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_existing_run_needs_resume_or_overwrite(dataset_dir, tmp_path):
    cfg = _config(dataset_dir, tmp_path, **{"train.epochs": 1})
    train(cfg, quiet=True)
    with pytest.raises(CryopickError, match="--resume"):
        train(cfg, quiet=True)


def test_resume_refuses_other_settings_and_another_dataset(dataset_dir, tmp_path):
    import shutil

    cfg = _config(dataset_dir, tmp_path, **{"train.epochs": 1, "train.steps_per_epoch": 1})
    train(cfg, quiet=True)
    other = _config(dataset_dir, tmp_path, **{"train.epochs": 1, "train.steps_per_epoch": 1, "optim.lr": 0.1,
                                              "loss.prior": 0.2})
    with pytest.raises(CryopickError, match=r"last\.pt was trained with other settings \(loss\.prior: None → 0\.2; "
                                            r"optim\.lr: 0\.003 → 0\.1\)"):
        train(other, resume=True, quiet=True)
    other_data = tmp_path / "other"
    shutil.copytree(dataset_dir, other_data)
    manifest = json.loads((other_data / "manifest.json").read_text())
    (other_data / "manifest.json").write_text(json.dumps({**manifest, "n_outside": 99}))  # another extraction
    with pytest.raises(CryopickError, match=r"other settings \(dataset fingerprint: "):
        train(_config(other_data, tmp_path, **{"train.epochs": 1, "train.steps_per_epoch": 1}), resume=True,
              quiet=True)
    copy = tmp_path / "copy"  # the same dataset moved: resumes; so does another device
    shutil.copytree(dataset_dir, copy)
    same = _config(copy, tmp_path, **{"train.epochs": 1, "train.steps_per_epoch": 1, "train.device": "auto"})
    assert train(same, resume=True, quiet=True).epochs_run == 1
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, "training_state": {**ckpt["training_state"], "loop": "abc"}}, last)
    with pytest.raises(CryopickError, match=r"the training state in .*last\.pt is damaged"):
        train(same, resume=True, quiet=True)


@pytest.mark.parametrize("mode", ["all", "none"])
def test_consistency_modes_run(dataset_dir, tmp_path, mode):
    cfg = _config(dataset_dir, tmp_path, **{"train.epochs": 1, "loss.consistency": mode, "model.use_ema": False})
    result = train(cfg, quiet=True)
    row = result.history[-1]
    assert (row["consistency_loss"] == 0.0) == (mode == "none") or row["mask_rate"] == 0.0


@pytest.mark.parametrize("mode, fraction, strong", [("selective", 0.25, 4), ("all", 0.25, 5), ("selective", 1.0, 16)])
def test_patch_step_gives_strong_views_and_the_teacher_pass_to_the_chosen_patches(mode, fraction, strong):
    from cryopick.model import PatchClassifier
    from cryopick.trainstep import make_views, step_loss

    cfg = resolve(TrainConfig, None, {"loss.consistency": mode, "loss.consistency_fraction": fraction})
    xp, xu = torch.randn(4, 1, 64, 64), torch.randn(16, 1, 64, 64)
    views = make_views(xp, xu, cfg, 2.0, torch.Generator().manual_seed(0))
    assert len(views.strong) == strong and len(views.chosen) == strong
    sizes = []
    teacher = PatchClassifier("resnet8", 0.0).eval()
    teacher.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    _, logs = step_loss(PatchClassifier("resnet8", 0.0), teacher, views, cfg, 0.3, 5.0, contextlib.nullcontext)
    assert sizes == [strong] and math.isfinite(float(logs["consistency_loss"]))


def test_training_is_deterministic(dataset_dir, tmp_path):
    a = train(_config(dataset_dir, tmp_path / "a", **{"train.epochs": 1}), quiet=True).history[-1]
    b = train(_config(dataset_dir, tmp_path / "b", **{"train.epochs": 1}), quiet=True).history[-1]
    assert a["loss"] == b["loss"] and a["val_auc_pu"] == b["val_auc_pu"]


def test_torchrun_ddp_on_cpu_trains_with_the_same_command(dataset_dir, tmp_path):
    """Two gloo processes; rank 0 validates and writes, the sampler splits the batches."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "cryopick", "train", "--data-dir", str(dataset_dir), "--exp-name", "ddp", "--output-root",
           str(tmp_path), "--backbone", "resnet8", "--epochs", "1", "--steps-per-epoch", "4", "--device", "cpu", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "ddp" / "metrics.csv").open()))
    assert len(rows) == 1 and int(rows[0]["step"]) == 2  # 4 global batches, 2 per rank
    assert load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["epoch"] == 1


def test_dense_training_needs_the_labeled_micrographs(dataset_dir, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(dataset_dir, copy)
    (copy / "labeled_micrographs.pt").unlink()  # as in a dataset from an older extract
    with pytest.raises(CryopickError, match="extract again, or train with --mode patches"):
        train(_config(copy, tmp_path / "out"), quiet=True)
    assert train(_config(copy, tmp_path / "out", **{"data.mode": "patches", "train.epochs": 1}), quiet=True).epochs_run


def test_dense_training_holds_out_labels_and_calibrates_on_them(dataset_dir, tmp_path):
    """Every labeled micrograph trains (both splits); a fifth of each one's labels is held out, judged every
    epoch and used by the calibration, which adds the training labels back to the particle count."""
    result = train(_config(dataset_dir, tmp_path, **{"train.epochs": 2}), quiet=True)
    row = result.history[-1]
    from cryopick.crops import hold_out_labels
    from cryopick.dataset import load_labeled_micrographs

    mics = [m for m in load_labeled_micrographs(dataset_dir) if len(m["labels"])]
    assert {m["split"] for m in mics} == {"train", "val"}
    _, held = hold_out_labels(mics, 0.2, 0)
    assert row["val_n_positive"] == sum(len(m["labels"]) for m in held) > 0
    assert 0.0 <= row["val_auc_pu"] <= 1.0 and row["val_auc_pn"] == row["val_auc_pu"]  # π = 0
    calibration = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt").get("calibration")
    if calibration is not None:  # a model this short may not calibrate; then pick warns (tested elsewhere)
        assert calibration["held_out"] and calibration["n_labels"] == row["val_n_positive"]
        n_known = sum(len(m["exclude"]) for m in held)
        assert calibration["particles_per_micrograph"] * len(held) >= n_known


def test_deep_backbones_train_with_context_around_each_crop(dataset_dir, tmp_path):
    """ResNet-18 sees 483 px per sample: its crops carry pick's 248-px context (half the receptive field, on the
    stride grid; targets on the central 128 px only); ResNet-8 (115 px) needs none."""
    from cryopick.inference import context_pad
    from cryopick.model import PatchClassifier

    assert context_pad(PatchClassifier("resnet8"), 128) == 0
    assert context_pad(PatchClassifier("resnet18"), 128) == 248
    cfg = _config(dataset_dir, tmp_path, **{"model.backbone": "resnet18", "data.batch_size": 2, "train.epochs": 1,
                                            "train.steps_per_epoch": 1})
    result = train(cfg, quiet=True)
    assert result.epochs_run == 1 and math.isfinite(result.history[0]["loss"])


def _track(rows: list[dict]) -> tuple[list[int], int]:
    """Epochs saved as best.pt by train's rule, and the epoch kept at the end."""
    from types import SimpleNamespace

    from cryopick.train import TrainState, _track_best

    saved: list[int] = []
    run = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(monitor="auc_pn", early_stopping_patience=5)),
                          best_path="best.pt", save=lambda path, state, row: saved.append(row["epoch"]))
    state = TrainState()
    for row in rows:
        _track_best(run, state, row)
        state.history.append(row)
    return saved, state.best_epoch


def test_best_checkpoint_keeps_a_later_epoch_within_the_metrics_noise():
    """With a standard error (dense training's held-out labels) a later epoch within it of the best is kept;
    without one, only strict improvements count."""
    values = [0.90, 0.96, 0.93, 0.85, 0.92]
    noisy = [{"epoch": k, "val_auc_pn": v, "val_auc_pn_se": 0.05} for k, v in enumerate(values)]
    assert _track(noisy) == ([0, 1, 2, 4], 4)  # 0.85 < 0.96 − 0.05: not kept
    exact = [{"epoch": k, "val_auc_pn": v} for k, v in enumerate(values)]
    assert _track(exact) == ([0, 1], 1)


@pytest.mark.parametrize("mode", ["dense", "patches"])
def test_patch_level_evaluation_of_a_trained_checkpoint(dataset_dir, tmp_path, capsys, mode):
    from cryopick.validation import evaluate_patches

    result = train(_config(dataset_dir, tmp_path, **{"train.epochs": 1, "data.mode": mode}), quiet=True)
    capsys.readouterr()
    metrics = evaluate_patches(result.exp_dir / "checkpoints" / "best.pt", dataset_dir, "val", 0.5, "cpu")
    dataset = load_dataset(dataset_dir)
    assert (metrics["n_positive"], metrics["n_unlabeled"]) == (len(dataset.val.positive), len(dataset.val.unlabeled))
    assert 0.0 <= metrics["val_auc_pu"] <= 1.0 and 0.0 <= metrics["val_true_auc"] <= 1.0  # the set has truth
    assert metrics["prior"] == (0.0 if mode == "dense" else 0.3) and metrics["split"] == "val"
    # dense training crops every labeled micrograph, the val split's too: its metrics are not held out
    assert ("not held out" in " ".join(capsys.readouterr().err.split())) == (mode == "dense")
