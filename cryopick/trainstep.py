"""One training step of `cryopick train` (nnPU + Selective FixMatch with an EMA teacher), the optimiser, the
learning-rate schedule, and the measured speed of a step.

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
import math
import time
from dataclasses import dataclass

import torch

from cryopick.augment import strong_augment, weak_augment
from cryopick.config import TrainConfig
from cryopick.data import SplitData
from cryopick.device import to_input
from cryopick.ema import EMATeacher
from cryopick.errors import CryopickError
from cryopick.losses import consistency_loss, entropy_loss, nnpu_loss, ramp
from cryopick.progress import info
from cryopick.trainplan import CostEstimate
from cryopick.validation import predict


def lr_at(step: int, total: int, warmup: int, base: float, scheduler: str) -> float:
    """The learning rate of ``step``: linear warm-up, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if scheduler == "none":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; biases and norm weights (1-D parameters) get no weight decay."""
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
