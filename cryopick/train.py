"""`cryopick train`: nnPU + Selective FixMatch with an EMA teacher.

One step (defaults from the design document):
- positives get the weak view only; unlabeled patches get a weak and a strong view;
- nnPU risk on the student's logits of weak positives and weak unlabeled (Kiryo et al. 2017);
- Selective FixMatch: the EMA teacher's weak-view pseudo-labels, kept where |p − 0.5|·2 ≥ τ, supervise the
  student's strong view of the *unlabeled* patches (``all``: positives too, as standard FixMatch; ``none``: off);
- entropy minimisation on the student's unlabeled logits;
- λ_cons ramps linearly over epochs 0–10, λ_ent over 10–20.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cryopick.augment import strong_augment, weak_augment
from cryopick.checkpoint import load_checkpoint, save_checkpoint
from cryopick.config import TrainConfig, dump_yaml, to_dict
from cryopick.config import validate as validate_config
from cryopick.data import PatchDataset, PUBatchSampler, SplitData, batch_composition
from cryopick.dataset import dataset_micrographs, load_dataset
from cryopick.device import autocast_factory, resolve_device
from cryopick.ema import EMATeacher
from cryopick.errors import CryopickError
from cryopick.evaluate import binary_metrics, pu_corrected_auc, roc_auc
from cryopick.fsutil import (
    check_output_dir,
    discard_dir,
    new_staging_dir,
    recover_replaced_dir,
    swap_in,
    write_text_atomic,
)
from cryopick.losses import consistency_loss, entropy_loss, nnpu_loss, prior_from_expected_particles, ramp
from cryopick.model import PatchClassifier
from cryopick.progress import console, info, progress_bar, warn
from cryopick.report import next_steps_train, train_summary
from cryopick.trainplan import (CostEstimate, epoch_line, first_epoch_best_warning, forwards_per_step,
                                threshold_report, validation_budget, validation_subset)

METRIC_COLUMNS = [
    "epoch", "step", "lr", "loss", "pu_loss", "loss_pos", "loss_neg", "defit_rate", "consistency_loss",
    "entropy_loss", "lambda_cons", "lambda_ent", "mask_rate", "pseudo_positive_rate", "samples_per_s",
    "val_auc_pu", "val_auc_pn", "val_precision", "val_recall", "val_f1",
    "val_true_auc", "val_true_precision", "val_true_recall", "val_true_f1", "prior",
    "val_n_positive", "val_n_unlabeled", "val_est_precision", "val_recall90_score", "val_patch_f1_threshold",
    "val_patch_f1",
]


@dataclass
class TrainResult:
    exp_dir: Path
    best_metric: float
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False


# ---------------------------------------------------------------------------------------------
# set-up helpers


def positive_radius_px(config: TrainConfig, dataset: PatchDataset) -> float:
    """The positive tolerance in binned px: the weak crop shift, so training and the prior agree."""
    return config.data.max_shift * dataset.record.diameter_binned_px


def resolve_prior(config: TrainConfig, dataset: PatchDataset) -> float:
    """π from ``loss.expected_particles`` (fraction of centres within the positive radius) or ``loss.prior``."""
    if config.loss.expected_particles is not None:
        if dataset.mean_binned_area <= 0:
            raise CryopickError("the dataset does not record micrograph sizes; give loss.prior instead")
        return prior_from_expected_particles(config.loss.expected_particles, positive_radius_px(config, dataset),
                                             dataset.mean_binned_area)
    if not 0 < config.loss.prior < 1:
        raise CryopickError(f"loss.prior must be in (0, 1), got {config.loss.prior}")
    return config.loss.prior


def select_unlabeled(split: SplitData, config: TrainConfig, quiet: bool) -> SplitData:
    """Unlabeled patches for training, by ``data.unlabeled_from``.

    Positives come from a few labelled micrographs. Unlabeled patches from *other* micrographs differ from
    them in defocus, ice and contrast as well as in content, so a PU classifier can learn "which micrograph"
    instead of "which particle" (scores then shift from micrograph to micrograph). Drawing U only from the
    labelled micrographs removes that shortcut; every micrograph is still picked.
    """
    if config.data.unlabeled_from == "all":
        return split
    if config.data.unlabeled_from != "labeled":
        raise CryopickError(f"data.unlabeled_from must be labeled or all, got {config.data.unlabeled_from}")
    chosen = split.unlabeled_from_labelled_micrographs()
    if len(chosen.unlabeled) == 0:
        warn("no unlabeled patches on the labelled micrographs; using every micrograph's")
        return split
    info(f"unlabeled patches from the labelled micrographs: {len(chosen.unlabeled)} of {len(split.unlabeled)}", quiet)
    return chosen


def lr_at(step: int, total: int, warmup: int, base: float, scheduler: str) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if scheduler == "none":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    o = config.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True)
    raise CryopickError(f"optim.name must be adamw or sgd, got {o.name}")


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


# ---------------------------------------------------------------------------------------------
# one step


def to_input(patches: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = patches.float().unsqueeze(1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class Views:
    """The augmented inputs of one step: weak positives, weak unlabeled, strong views (or None)."""

    pos_weak: torch.Tensor
    unl_weak: torch.Tensor
    strong: torch.Tensor | None


def make_views(xp: torch.Tensor, xu: torch.Tensor, config: TrainConfig, shift_px: float,
               gen: torch.Generator) -> Views:
    """Weak views for all; strong views for unlabeled (``selective``) or for all (``all``); none for ``none``."""
    aug = config.augment
    weak = dict(max_shift=shift_px, rotate_degrees=aug.rotate_degrees, rot90=aug.rot90, flips=aug.flips, generator=gen)
    mode = config.loss.consistency
    strong = None
    if mode != "none" and config.loss.lambda_cons > 0:
        strong = strong_augment(xu if mode == "selective" else torch.cat([xp, xu]), aug, shift_px, generator=gen)
    return Views(weak_augment(xp, **weak), weak_augment(xu, **weak), strong)


def step_loss(student, teacher_model, views: Views, config: TrainConfig, prior: float, epoch_f: float,
              autocast) -> tuple[torch.Tensor, dict]:
    """Loss of one P:U batch and the values to log (all floats except the loss)."""
    n_p, n_u = len(views.pos_weak), len(views.unl_weak)
    parts = [views.pos_weak, views.unl_weak] + ([views.strong] if views.strong is not None else [])
    with autocast():
        logits = student(torch.cat(parts)).float()  # one forward: BatchNorm sees the whole batch
    lp, lu = logits[:n_p], logits[n_p:n_p + n_u]
    pu = nnpu_loss(lp, lu, prior, beta=config.loss.nnpu_beta, gamma=config.loss.nnpu_gamma,
                   defitting=config.loss.defitting, balanced_prior=config.loss.balanced_prior)
    lam_c = config.loss.lambda_cons * ramp(epoch_f, *config.loss.cons_ramp_epochs)
    lam_e = config.loss.lambda_ent * ramp(epoch_f, *config.loss.ent_ramp_epochs)
    loss = pu.loss
    zero = torch.zeros((), device=logits.device)
    cons_value, mask_rate, pseudo_pos = zero, zero, zero
    if views.strong is not None:
        weak_views = views.unl_weak if config.loss.consistency == "selective" else torch.cat(parts[:2])
        with torch.no_grad(), autocast():
            t_logits = teacher_model(weak_views).float()
        cons = consistency_loss(logits[n_p + n_u:], t_logits, config.loss.consistency_threshold)
        loss = loss + lam_c * cons.loss
        cons_value, mask_rate, pseudo_pos = cons.loss.detach(), cons.mask_rate, cons.pseudo_positive_rate
    ent = entropy_loss(lu)
    if lam_e > 0:
        loss = loss + lam_e * ent
    # device tensors, summed over the epoch and read once at its end: no host sync per value per step
    logs = {
        "pu_loss": pu.risk, "loss_pos": pu.positive_risk, "loss_neg": pu.negative_risk,
        "defit_rate": float(pu.defitting), "consistency_loss": cons_value, "entropy_loss": ent.detach(),
        "lambda_cons": lam_c, "lambda_ent": lam_e, "mask_rate": mask_rate, "pseudo_positive_rate": pseudo_pos,
        "loss": loss.detach(),
    }
    return loss, logs


def optimisation_step(loss: torch.Tensor, optimizer, teacher, model) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if teacher:
        teacher.update(model)


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def predict(model: torch.nn.Module, patches: torch.Tensor, device: torch.device, autocast,
            batch: int = 256, channels_last: bool = False) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(patches), batch):
        x = to_input(patches[start:start + batch].to(device), channels_last)
        with autocast():
            out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def validate(model, split: SplitData, prior: float, radius_original_px: float, device, autocast,
             max_patches: int, channels_last: bool, threshold: float = 0.5) -> dict:
    """PU metrics (positives vs unlabeled), the PU-corrected AUC, and true metrics when truth is known."""
    if len(split.positive) == 0 or len(split.unlabeled) == 0:
        return {}
    n_u = min(len(split.unlabeled), max_patches)
    unl = split.unlabeled[:n_u]
    p_pos = predict(model, split.positive, device, autocast, channels_last=channels_last)
    p_unl = predict(model, unl, device, autocast, channels_last=channels_last)
    scores = np.concatenate([p_pos, p_unl])
    labels = np.concatenate([np.ones(len(p_pos)), np.zeros(len(p_unl))])
    m = binary_metrics(scores, labels, threshold)
    out = {"val_auc_pu": m["auc"], "val_auc_pn": pu_corrected_auc(m["auc"], prior),
           "val_precision": m["precision"], "val_recall": m["recall"], "val_f1": m["f1"]}
    td = split.unlabeled_truth_distance[:n_u].cpu().numpy()
    true_u = None
    if len(td) and np.isfinite(td).any():
        true_u = (td <= radius_original_px).astype(float)
        t = binary_metrics(scores, np.concatenate([np.ones(len(p_pos)), true_u]), threshold)
        out.update({"val_true_auc": t["auc"], "val_true_precision": t["precision"],
                    "val_true_recall": t["recall"], "val_true_f1": t["f1"]})
    out.update(threshold_report(p_pos, p_unl, prior, true_u, threshold))
    return out


def measure_speed(model: torch.nn.Module, config: TrainConfig, data: SplitData, val: SplitData, n_p: int, n_u: int,
                  shift_px: float, prior: float, autocast, channels_last: bool, device: torch.device,
                  steps: int = 2) -> tuple[float, float]:
    """(training samples/s, held-out patches/s), timed on real steps of a throwaway copy of the model after one
    warm-up step; the run's model, optimiser and random streams are left exactly as they were."""
    probe = copy.deepcopy(model)
    teacher = EMATeacher(probe, config.model.ema_decay) if config.model.use_ema else None
    optimizer = make_optimizer(probe, config)
    gen = torch.Generator(device=device).manual_seed(0)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        probe.train()
        elapsed = 0.0
        for i in range(steps + 1):
            sync()
            t0 = time.perf_counter()
            ip, iu = torch.randint(len(data.positive), (n_p,)), torch.randint(len(data.unlabeled), (n_u,))
            xp = to_input(data.positive[ip.to(data.positive.device)].to(device), channels_last)
            xu = to_input(data.unlabeled[iu.to(data.unlabeled.device)].to(device), channels_last)
            views = make_views(xp, xu, config, shift_px, gen)
            loss, _ = step_loss(probe, teacher.module if teacher else probe, views, config, prior,
                                config.train.epochs / 2, autocast)
            optimisation_step(loss, optimizer, teacher, probe)
            sync()
            elapsed += (time.perf_counter() - t0) if i else 0.0  # step 0 warms up allocators and kernels
        patches = val.unlabeled[:128] if len(val.unlabeled) else data.unlabeled[:128]
        sync()
        t0 = time.perf_counter()
        predict(probe, patches, device, autocast, channels_last=channels_last)
        sync()
        val_elapsed = time.perf_counter() - t0
    return steps * (n_p + n_u) / max(elapsed, 1e-9), len(patches) / max(val_elapsed, 1e-9)


def announce_cost(model, config: TrainConfig, data: SplitData, val: SplitData, val_available: int, sampler,
                  epochs_left: int, measure_args: dict) -> CostEstimate:
    """Measure the speed and print the plan and cost lines before training starts."""
    rate, val_rate = measure_speed(model, config, data, val, sampler.n_p, sampler.n_u, **measure_args)
    est = CostEstimate(config.model.backbone, str(measure_args["device"]), sampler.steps_per_epoch, epochs_left,
                       sampler.n_p + sampler.n_u, len(val.positive) + len(val.unlabeled), val_available,
                       rate, val_rate)
    info(est.plan_line())
    info(f"[bold]{est.cost_line()}[/bold]")
    return est


# ---------------------------------------------------------------------------------------------
# logging


class MetricsLog:
    """metrics.csv (rewritten atomically each epoch), TensorBoard when installed, a rich line per epoch."""

    def __init__(self, exp_dir: Path, history: list[dict], quiet: bool, enabled: bool):
        self.path, self.history, self.quiet, self.enabled = exp_dir / "metrics.csv", history, quiet, enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(exp_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, row: dict) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in self.history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        write_text_atomic(self.path, buf.getvalue())
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    group = "val" if key.startswith("val_") else "train"
                    self.tb.add_scalar(f"{group}/{key.removeprefix('val_')}", value, row["epoch"])
            self.tb.flush()
        if not self.quiet:
            keys = ["loss", "loss_pos", "loss_neg", "consistency_loss", "mask_rate", "pseudo_positive_rate",
                    "val_auc_pu", "val_auc_pn", "val_f1", "val_true_auc", "val_true_f1", "samples_per_s"]
            text = "  ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), float))
            console.print(f"  metrics: {text}", highlight=False)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# the command


def experiment_dir(config: TrainConfig) -> Path:
    name = config.train.exp_name
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CryopickError(f"experiment name '{name}' must be a plain directory name")
    return Path(config.train.output_root) / name


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> TrainResult:
    """Train a picker; writes config.yaml, metrics.csv, checkpoints/{best,last}.pt under the experiment dir.

    ``overwrite`` of an existing run trains in a hidden sibling directory that replaces the old run only
    when training completes: a failed or interrupted run leaves the old one exactly as it was.
    """
    validate_config(config)
    exp_dir = experiment_dir(config)
    check_output_dir(exp_dir, "--output-root/--exp-name")
    main_rank = int(os.environ.get("RANK", "0") or 0) == 0
    if main_rank:
        recover_replaced_dir(exp_dir)
    last_path = exp_dir / "checkpoints" / "last.pt"
    if resume and overwrite:
        raise CryopickError("give --resume (continue the run) or --overwrite (start over), not both")
    if last_path.exists() and not (resume or overwrite):
        raise CryopickError(f"{exp_dir} already holds a training run; use --resume to continue it or --overwrite")
    if resume and not last_path.exists():
        raise CryopickError(f"--resume: no checkpoint at {last_path}")
    if not (overwrite and main_rank and exp_dir.is_dir() and any(exp_dir.iterdir())):
        result = _check_complete(_train_in(config, exp_dir, resume, quiet))
        if result.interrupted and main_rank:
            warn(f"interrupted: state saved to {last_path}; continue with --resume")
        return result
    stage = new_staging_dir(exp_dir)
    try:
        result = _train_in(config, stage, False, quiet)
        if not result.interrupted:
            _check_complete(result)
    except BaseException:
        discard_dir(stage)
        raise
    if result.interrupted:
        discard_dir(stage)
        warn(f"the new run was discarded; {exp_dir} still holds the previous run, unchanged")
        return dataclasses.replace(result, exp_dir=exp_dir)
    swap_in(stage, exp_dir)
    return dataclasses.replace(result, exp_dir=exp_dir)


def _check_complete(result: TrainResult) -> TrainResult:
    """Success means a best checkpoint exists; an interrupted run reports itself instead."""
    best = result.exp_dir / "checkpoints" / "best.pt"
    if not result.interrupted and int(os.environ.get("RANK", "0") or 0) == 0 and not best.is_file():
        raise CryopickError(f"training wrote no checkpoint ({best} is missing)")
    return result


def _train_in(config: TrainConfig, exp_dir: Path, resume: bool, quiet: bool) -> TrainResult:
    """The training loop, writing the experiment into ``exp_dir``."""
    ckpt_dir = exp_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    device = resolve_device(config.train.device)
    dist = Distributed(device)
    device = dist.device
    torch.manual_seed(config.train.seed + dist.rank)
    dataset = load_dataset(config.data.data_dir)
    prior = resolve_prior(config, dataset)
    shift_px = positive_radius_px(config, dataset)
    radius_original = shift_px * dataset.record.bin_factor
    info(f"dataset {dataset.source}: {len(dataset.train.positive)} positive / {len(dataset.train.unlabeled)} "
         f"unlabeled (train), {len(dataset.val.positive)} / {len(dataset.val.unlabeled)} (val); prior π = {prior:.4g}; "
         f"positive radius {shift_px:.1f} binned px; device {device}", quiet or not dist.main)

    on_cuda = device.type == "cuda"
    channels_last = config.train.channels_last and on_cuda
    amp = config.train.amp and on_cuda

    autocast = autocast_factory(amp)

    model = PatchClassifier(config.model.backbone, config.model.dropout, config.model.output_stride).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = EMATeacher(model, config.model.ema_decay) if config.model.use_ema else None
    optimizer = make_optimizer(model, config)
    train_data = select_unlabeled(dataset.train, config, quiet or not dist.main)
    train_data = train_data.to(device) if on_cuda else train_data
    n_p, n_u = batch_composition(config.data.batch_size, config.data.batch_ratio)
    sampler = PUBatchSampler(len(train_data.positive), len(train_data.unlabeled), n_p, n_u, config.train.seed,
                             config.train.steps_per_epoch, dist.rank, dist.world)
    total_steps = sampler.steps_per_epoch * config.train.epochs
    per_step = forwards_per_step(n_p, n_u, config.loss.consistency, config.loss.lambda_cons)
    val_budget = validation_budget(sampler.steps_per_epoch, per_step, config.train.val_budget,
                                   config.train.val_max_patches)
    val_data = validation_subset(dataset.val, val_budget)
    warmup = int(config.optim.warmup_epochs * sampler.steps_per_epoch)
    gen = torch.Generator(device=device).manual_seed(config.train.seed * 7919 + dist.rank)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": -math.inf, "best_epoch": -1,
             "bad_epochs": 0, "history": []}
    if resume:
        state = _restore(last_path, model, teacher, optimizer, gen, device)
        info(f"resuming from {last_path}: epoch {state['epoch']}, step {state['step_in_epoch']}", quiet)
    if dist.main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(exp_dir / "config.yaml", dump_yaml(config))
    ddp_model = dist.wrap(model)
    forward = torch.compile(ddp_model) if config.train.compile else ddp_model
    teacher_model = teacher.module if teacher else model
    log = MetricsLog(exp_dir, state["history"], quiet, dist.main)
    if dist.main and not quiet and state["epoch"] < config.train.epochs:
        announce_cost(model, config, train_data, val_data, len(dataset.val.positive) + len(dataset.val.unlabeled),
                      sampler, config.train.epochs - state["epoch"],
                      dict(shift_px=shift_px, prior=prior, autocast=autocast, channels_last=channels_last,
                           device=device))

    def save(path: Path, metrics: dict) -> None:
        save_checkpoint(path, model_spec=model.spec, model_state=model.state_dict(),
                        ema_state=teacher.module.state_dict() if teacher else None, config=to_dict(config),
                        preprocess=dataset.record.to_dict(), metrics=metrics, epoch=state["epoch"],
                        step=state["global_step"], training_state=_training_state(state, optimizer, teacher, gen,
                                                                                   prior))

    interrupted = False
    rng_snapshot = None
    stop_request = StopRequest()
    try:
        with progress_bar(quiet or not dist.main, extra="loss {task.fields[loss]:.4f}") as progress:
            task = progress.add_task("train", total=total_steps, loss=float("nan"),
                                     completed=state["epoch"] * sampler.steps_per_epoch + state["step_in_epoch"])
            while state["epoch"] < config.train.epochs:
                epoch = state["epoch"]
                sums: dict[str, float] = {}
                n_steps, t0, n_samples = 0, time.perf_counter(), 0
                ddp_model.train()
                for step, (ip, iu) in enumerate(sampler.epoch(epoch)):
                    if step < state["step_in_epoch"]:
                        continue
                    xp = to_input(train_data.positive[ip.to(train_data.positive.device)].to(device), channels_last)
                    xu = to_input(train_data.unlabeled[iu.to(train_data.unlabeled.device)].to(device), channels_last)
                    lr = lr_at(state["global_step"], total_steps, warmup, config.optim.lr, config.optim.scheduler)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    epoch_f = epoch + step / sampler.steps_per_epoch
                    rng_snapshot = _rng_snapshot(gen)  # Ctrl-C mid-step rewinds to here, so resume is exact
                    views = make_views(xp, xu, config, shift_px, gen)
                    loss, logs = step_loss(forward, teacher_model, views, config, prior, epoch_f, autocast)
                    optimisation_step(loss, optimizer, teacher, model)
                    state["step_in_epoch"] = step + 1
                    state["global_step"] += 1
                    logs["lr"] = lr
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n_steps += 1
                    n_samples += len(xp) + len(xu)
                    if n_steps % config.train.log_every == 1 or config.train.log_every <= 1:
                        progress.update(task, advance=1, loss=float(logs["loss"]))
                    else:
                        progress.update(task, advance=1)
                    if stop_request.requested:
                        raise KeyboardInterrupt
                row = {"epoch": epoch, "step": state["global_step"], "prior": prior}
                row.update({k: float(v) / max(1, n_steps) for k, v in sums.items()})
                row["samples_per_s"] = n_samples * dist.world / max(1e-9, time.perf_counter() - t0)
                state["epoch"], state["step_in_epoch"] = epoch + 1, 0
                stop = False
                if dist.main:
                    eval_model = teacher.module if teacher else model
                    row.update(validate(eval_model, val_data, prior, radius_original, device, autocast,
                                        val_budget, channels_last))
                    stop = _track_best(state, row, config, save, best_path)
                    info(epoch_line(row, config.train.epochs, config.train.monitor, state["best"],
                                    state["best_epoch"]), quiet)
                    log.log(row)
                    save(last_path, row)
                stop = dist.broadcast_flag(stop)
                if stop:
                    info(f"early stopping: no improvement of {config.train.monitor} for "
                         f"{config.train.early_stopping_patience} epochs", quiet or not dist.main)
                    break
    except KeyboardInterrupt:
        interrupted = True
        if rng_snapshot is not None and not stop_request.requested:
            _rng_restore(gen, rng_snapshot)  # a hard stop inside a step: redo that step on resume
        if dist.main:
            save(last_path, state["history"][-1] if state["history"] else {})
    finally:
        stop_request.close()
        log.close()
        dist.close()
    if dist.main and not best_path.exists() and last_path.exists() and not interrupted:
        save(best_path, state["history"][-1] if state["history"] else {})
    if dist.main and best_path.exists() and not interrupted:
        calibrate_best(best_path, config, device, quiet)
    warning = first_epoch_best_warning(state["best_epoch"], state["epoch"], config.train.monitor)
    validated = any("val_recall" in row for row in state["history"])  # else "best" is the lowest training loss
    if dist.main and warning and validated and not interrupted:
        warn(warning)
    return TrainResult(exp_dir, state["best"], state["best_epoch"], state["epoch"], state["history"], interrupted)


def summary_lines(result: TrainResult, config: TrainConfig) -> list[str]:
    """The end-of-training summary and the pick command to run next with this run's best checkpoint."""
    best_row = next((r for r in result.history if r.get("epoch") == result.best_epoch), {})
    lines = [train_summary(config.train.monitor, result.best_metric, result.best_epoch, result.epochs_run,
                           result.exp_dir, best_row.get("val_recall"), best_row.get("val_recall90_score"))]
    return lines + next_steps_train(result.exp_dir / "checkpoints" / "best.pt",
                                    dataset_micrographs(config.data.data_dir))


def calibrate_best(best_path: Path, config: TrainConfig, device: torch.device, quiet: bool) -> None:
    """Store pick's calibration in best.pt (see cryopick.calibrate); a failure leaves the raw scores."""
    from cryopick.calibrate_model import calibrate_checkpoint  # imports pick, which train does not need

    try:
        calibration = calibrate_checkpoint(best_path, config.data.data_dir, config.loss.expected_particles, device)
    except CryopickError as exc:
        warn(f"pick calibration failed: {exc}. pick will write uncalibrated scores; choose a threshold "
             "(pick --expected-particles N prints the one giving N picks per micrograph) or retrain with "
             "--expected-particles N")
        return
    info(f"pick calibration: {calibration.describe()}; p = 0.5 ↔ raw score "
         f"{_fmt(calibration.raw_threshold(0.5))}", quiet)


def _fmt(value: float | None) -> str:
    return "never reached" if value is None else f"{value:.3g}"


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


def _rng_snapshot(gen: torch.Generator) -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return gen.get_state(), torch.get_rng_state(), cuda


def _rng_restore(gen: torch.Generator, snapshot: tuple) -> None:
    gen_state, cpu_state, cuda_states = snapshot
    gen.set_state(gen_state)
    torch.set_rng_state(cpu_state)
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)


def _track_best(state: dict, row: dict, config: TrainConfig, save, best_path: Path) -> bool:
    """Save best.pt on improvement of the monitored metric; True when early stopping should stop."""
    key = config.train.monitor
    value = row.get(key, row.get(f"val_{key}"))
    if value is None or not math.isfinite(value):
        value = -row.get("loss", math.inf)  # no validation data: lowest training loss is best
    if value > state["best"]:
        state["best"], state["best_epoch"], state["bad_epochs"] = value, row["epoch"], 0
        save(best_path, row)
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= config.train.early_stopping_patience


def _training_state(state: dict, optimizer, teacher, gen: torch.Generator, prior: float) -> dict:
    return {
        "loop": {k: v for k, v in state.items() if k != "history"},
        "history": state["history"],
        "optimizer": optimizer.state_dict(),
        "teacher": teacher.state_dict() if teacher else None,
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "prior": prior,
    }


def _restore(path: Path, model, teacher, optimizer, gen: torch.Generator, device) -> dict:
    ckpt = load_checkpoint(path, map_location=device)
    ts = ckpt.get("training_state")
    if not ts:
        raise CryopickError(f"{path}: holds no training state to resume from")
    saved = ckpt.get("model_spec", {})
    if saved != model.spec:
        raise CryopickError(f"--resume: {path} was trained with model {saved}, this run's config gives {model.spec}; "
                            "resume with the same --backbone/model settings, or start over with --overwrite")
    try:
        model.load_state_dict(ckpt["model_state"])
        if teacher and ts.get("teacher"):
            teacher.load_state_dict(ts["teacher"])
        optimizer.load_state_dict(ts["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CryopickError(f"--resume: {path} does not match this run's model or optimizer ({first}); "
                            "resume with the same settings, or start over with --overwrite") from None
    gen.set_state(ts["generator"].cpu() if gen.device.type == "cpu" else ts["generator"])
    torch.set_rng_state(ts["torch_rng"].cpu())
    if ts.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ts["cuda_rng"]])
    state = dict(ts["loop"])
    state["history"] = list(ts["history"])
    return state


def evaluate_patches(checkpoint: str | Path, data_dir: str | Path, split: str = "val", threshold: float = 0.5,
                     device: str = "auto", prior: float | None = None) -> dict:
    """Patch-level metrics of a checkpoint's EMA teacher on an extracted dataset (AUC, precision, recall, F1).

    Positives vs unlabeled give the PU metrics and the PU-corrected AUC; a dataset extracted with
    ``--truth`` also gives the true metrics (unlabeled patches labelled by the ground truth), on the
    same footing as the design document's table.
    """
    from cryopick.checkpoint import model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    dataset = load_dataset(data_dir)
    if split not in ("train", "val", "all"):
        raise CryopickError(f"split must be train, val or all, got {split}")
    parts = [dataset.train, dataset.val] if split == "all" else [getattr(dataset, split)]
    data = SplitData(torch.cat([p.positive for p in parts]), torch.cat([p.unlabeled for p in parts]),
                     torch.cat([p.unlabeled_truth_distance for p in parts]))
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    cfg = ckpt["config"]
    pi = prior if prior is not None else float(ckpt.get("training_state", {}).get("prior") or cfg["loss"]["prior"])
    radius = cfg["data"]["max_shift"] * dataset.record.diameter_binned_px * dataset.record.bin_factor
    autocast = autocast_factory(dev.type == "cuda")
    metrics = validate(model, data, pi, radius, dev, autocast, max_patches=len(data.unlabeled),
                       channels_last=False, threshold=threshold)
    metrics.update({"n_positive": len(data.positive), "n_unlabeled": len(data.unlabeled), "prior": pi,
                    "split": split, "threshold": threshold})
    return metrics
