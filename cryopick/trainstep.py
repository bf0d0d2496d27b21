"""One training step of `cryopick train` (nnPU + Selective FixMatch with an EMA teacher), the optimiser, the
learning-rate schedule, and the measured speed of a step.

One step (defaults from the design document):
- positives get the weak view only; unlabeled patches get a weak and a strong view;
- nnPU risk on the student's logits of weak positives and weak unlabeled (Kiryo et al. 2017);
- Selective FixMatch: the EMA teacher's weak-view pseudo-labels, kept where |p − 0.5|·2 ≥ τ, supervise the
  student's strong view of the *unlabeled* patches (``all``: positives too, as standard FixMatch; ``none``: off),
  on a random ``loss.consistency_fraction`` of them each step (a quarter: half the step's cost);
- entropy minimisation on the student's unlabeled logits;
- λ_cons ramps linearly over epochs 0–10, λ_ent over 10–20.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass

import torch

from cryopick.augment import GEOMETRIC_OPS, RANDAUGMENT_OPS, strong_augment, weak_augment
from cryopick.config import TrainConfig
from cryopick.data import PatchDataset, SplitData
from cryopick.device import to_input
from cryopick.ema import EMATeacher
from cryopick.errors import CryopickError
from cryopick.losses import consistency_loss, entropy_loss, nnpu_loss, prior_from_expected_particles, ramp
from cryopick.progress import info
from cryopick.trainplan import CostEstimate
from cryopick.validation import positive_radius_px, predict

PATCH_PRIOR = 0.3  # the design document's π for the patch classifier


def resolve_prior(config: TrainConfig, dataset: PatchDataset) -> float:
    """π of the PU risk. Patches: the fraction of centres within the positive radius that
    ``loss.expected_particles`` implies, else ``loss.prior``, else 0.3. Dense: ``loss.prior``, else 0 (the
    balanced positive-vs-unlabeled limit). Dense training leaves the count to the calibration: its π-free score ranks like the
    posterior, and the count's π gained nothing on six cases (benchmarks/RESULTS.md)."""
    dense = config.data.mode == "dense"
    if config.loss.expected_particles is not None and not dense:
        if dataset.mean_binned_area <= 0:
            raise CryopickError("the dataset does not record micrograph sizes; give loss.prior instead")
        radius = positive_radius_px(config.data.max_shift, dataset.record)
        return prior_from_expected_particles(config.loss.expected_particles, radius, dataset.mean_binned_area)
    prior = config.loss.prior
    if prior is None:
        return 0.0 if dense else PATCH_PRIOR
    if not 0 <= prior < 1 or (prior == 0 and balanced_prior(config) is None):
        raise CryopickError(f"loss.prior must be in (0, 1) (0 only with loss.balanced_prior), got {prior}")
    return prior


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
    chosen: torch.Tensor | None = None  # which of the consistency patches (U, or P then U) the strong views are


def make_views(xp: torch.Tensor, xu: torch.Tensor, config: TrainConfig, shift_px: float,
               gen: torch.Generator) -> Views:
    """Weak views for all; strong views for unlabeled (``selective``) or for all (``all``), on
    ``loss.consistency_fraction`` of them; none for ``none``."""
    aug = config.augment
    weak = dict(max_shift=shift_px, rotate_degrees=aug.rotate_degrees, rot90=aug.rot90, flips=aug.flips, generator=gen)
    mode = config.loss.consistency
    strong, chosen = None, None
    if mode != "none" and config.loss.lambda_cons > 0:
        base = xu if mode == "selective" else torch.cat([xp, xu])
        chosen = consistency_crops(len(base), config.loss.consistency_fraction, base.device, gen)
        strong = strong_augment(base[chosen], aug, shift_px, generator=gen)
    return Views(weak_augment(xp, **weak), weak_augment(xu, **weak), strong, chosen)


def step_loss(student, teacher_model, views: Views, config: TrainConfig, prior: float, epoch_f: float,
              autocast) -> tuple[torch.Tensor, dict]:
    """Loss of one P:U batch and the values to log (all floats except the loss)."""
    n_p, n_u = len(views.pos_weak), len(views.unl_weak)
    parts = [views.pos_weak, views.unl_weak] + ([views.strong] if views.strong is not None else [])
    with autocast():
        logits = student(torch.cat(parts)).float()  # one forward: BatchNorm sees the whole batch
    lp, lu = logits[:n_p], logits[n_p:n_p + n_u]
    cons = None
    if views.strong is not None:
        weak_views = views.unl_weak if config.loss.consistency == "selective" else torch.cat(parts[:2])
        if views.chosen is not None:
            weak_views = weak_views[views.chosen]
        with torch.no_grad(), autocast():
            t_logits = teacher_model(weak_views).float()
        cons = consistency_loss(logits[n_p + n_u:], t_logits, config.loss.consistency_threshold)
    return combine_losses(lp, lu, cons, config, prior, epoch_f)


def combine_losses(lp: torch.Tensor, lu: torch.Tensor, cons, config: TrainConfig, prior: float,
                   epoch_f: float) -> tuple[torch.Tensor, dict]:
    """PU risk of positive/unlabeled logits + λ_cons·consistency (``cons``, or None) + λ_ent·entropy of the
    unlabeled logits, with the epoch's ramps; and the values to log."""
    pu = nnpu_loss(lp, lu, prior, beta=config.loss.nnpu_beta, gamma=config.loss.nnpu_gamma,
                   defitting=config.loss.defitting, balanced_prior=balanced_prior(config))
    lam_c = config.loss.lambda_cons * ramp(epoch_f, *config.loss.cons_ramp_epochs)
    lam_e = config.loss.lambda_ent * ramp(epoch_f, *config.loss.ent_ramp_epochs)
    loss = pu.loss
    zero = torch.zeros((), device=lu.device)
    cons_value, mask_rate, pseudo_pos = zero, zero, zero
    if cons is not None:
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


PHOTOMETRIC_OPS = tuple(op for op in RANDAUGMENT_OPS if op not in GEOMETRIC_OPS)


def balanced_prior(config: TrainConfig) -> float | None:
    """π' of the PU risk: ``loss.balanced_prior``, else 0.5 for dense training and plain nnPU for patches."""
    if config.loss.balanced_prior is not None:
        return config.loss.balanced_prior
    return 0.5 if config.data.mode == "dense" else None


def aligned_strong_view(crops: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The strong view of dense training: photometric RandAugment, contrast, noise and cutout, no warp and no
    mixup, so its map samples lie where the weak view's do and the teacher's pseudo-labels apply sample by
    sample."""
    aug = dataclasses.replace(config.augment, rotate_degrees=0.0, rot90=False, flips=False)
    return strong_augment(crops, aug, 0.0, generator=gen, mix=False, ops=PHOTOMETRIC_OPS)


def dense_step_loss(student, teacher_model, crops: torch.Tensor, targets: torch.Tensor, config: TrainConfig,
                    prior: float, epoch_f: float, autocast, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Loss of one batch of crops whose map samples are PU samples (targets: True = within a label's radius).

    The same terms as ``step_loss``, sample by sample: the PU risk on the weak view's map; consistency of the
    strong view's map with the EMA teacher's confident weak-view samples (``selective``: only unlabeled
    samples, so a labeled particle never supervises a strong view; ``all``: every sample); entropy on the
    unlabeled samples.
    """
    n, mode = len(crops), config.loss.consistency
    strong = mode != "none" and config.loss.lambda_cons > 0
    chosen = consistency_crops(n, config.loss.consistency_fraction, crops.device, gen) if strong else None
    x = torch.cat([crops, aligned_strong_view(crops[chosen], config, gen)]) if strong else crops
    with autocast():
        maps = student(x, dense=True).float()  # one forward: BatchNorm sees both views
    maps = _central(maps, targets.shape[-1])  # a crop's context margin carries no targets
    weak, unlabeled = maps[:n], ~targets
    cons = None
    if strong:
        with torch.no_grad(), autocast():
            t_maps = _central(teacher_model(crops[chosen], dense=True).float(), targets.shape[-1])
        keep = unlabeled[chosen] if mode == "selective" else torch.ones_like(unlabeled[chosen])
        cons = consistency_loss(maps[n:][keep], t_maps[keep], config.loss.consistency_threshold)
    return combine_losses(weak[targets], weak[unlabeled], cons, config, prior, epoch_f)


def consistency_crops(n: int, fraction: float, device, gen: torch.Generator) -> torch.Tensor:
    """Indices of the ``ceil(fraction·n)`` crops (random, at least one) given a strong view and a teacher pass."""
    k = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    if k == n:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=gen, device=gen.device).to(device)[:k]


def _central(maps: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` × ``size`` samples of maps ``(N, H', W')``."""
    top, left = (maps.shape[-2] - size) // 2, (maps.shape[-1] - size) // 2
    return maps[..., top:top + size, left:left + size]


def optimisation_step(loss: torch.Tensor, optimizer, teacher, model) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if teacher:
        teacher.update(model)


def measure_speed(model: torch.nn.Module, config: TrainConfig, data: SplitData, val: SplitData, sampler,
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
        batches = (b for e in itertools.count() for b in sampler.epoch(e)) if config.data.mode == "dense" else None
        elapsed = 0.0
        for i in range(steps + 1):
            sync()
            t0 = time.perf_counter()
            teacher_model = teacher.module if teacher else probe
            if config.data.mode == "dense":
                crops, targets = next(batches)
                loss, _ = dense_step_loss(probe, teacher_model, to_input(crops.to(device), channels_last),
                                          targets.to(device), config, prior, config.train.epochs / 2, autocast, gen)
            else:
                ip = torch.randint(len(data.positive), (sampler.n_p,))
                iu = torch.randint(len(data.unlabeled), (sampler.n_u,))
                xp = to_input(data.positive[ip.to(data.positive.device)].to(device), channels_last)
                xu = to_input(data.unlabeled[iu.to(data.unlabeled.device)].to(device), channels_last)
                views = make_views(xp, xu, config, shift_px, gen)
                loss, _ = step_loss(probe, teacher_model, views, config, prior, config.train.epochs / 2, autocast)
            optimisation_step(loss, optimizer, teacher, probe)
            sync()
            elapsed += (time.perf_counter() - t0) if i else 0.0  # step 0 warms up allocators and kernels
        patches = val.unlabeled[:128] if len(val.unlabeled) else data.unlabeled[:128]
        sync()
        t0 = time.perf_counter()
        predict(probe, patches, device, autocast, channels_last=channels_last)
        sync()
        val_elapsed = time.perf_counter() - t0
    return steps * (sampler.n_p + sampler.n_u) / max(elapsed, 1e-9), len(patches) / max(val_elapsed, 1e-9)


def announce_cost(model, config: TrainConfig, data: SplitData, val: SplitData, val_available: int, sampler,
                  epochs_left: int, measure_args: dict, held_out_labels: int | None = None) -> CostEstimate:
    """Measure the speed and print the plan and cost lines before training starts."""
    rate, val_rate = measure_speed(model, config, data, val, sampler, **measure_args)
    est = CostEstimate(config.model.backbone, str(measure_args["device"]), sampler.steps_per_epoch, epochs_left,
                       sampler.n_p + sampler.n_u, len(val.positive) + len(val.unlabeled), val_available,
                       rate, val_rate, held_out_labels)
    info(est.plan_line())
    info(f"[bold]{est.cost_line()}[/bold]")
    return est
