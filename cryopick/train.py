"""`cryopick train`: from an extracted dataset to checkpoints/{best,last}.pt, config.yaml and metrics.csv.

``train()`` reads top to bottom: check the experiment directory, ``build_run`` (device, data, prior, model,
optimiser, sampler), then epochs of ``run_epoch`` (training steps, see ``cryopick.trainstep``) and
``end_epoch`` (validation, see ``cryopick.validation``; best/last checkpoints; early stopping), then pick's
calibration of best.pt. Where the loop is lives in ``TrainState``, saved in every checkpoint, so Ctrl-C or
SIGTERM leaves a run that ``--resume`` continues exactly (``cryopick.runtime``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# numpy before torch: torch's C init imports numpy and swallows a Ctrl-C/SIGTERM that lands there, leaving a
# half-imported numpy instead of a clean interrupt
import numpy  # noqa: F401
import torch

from cryopick.calibrate_model import calibrate_best, held_out_metrics
from cryopick.checkpoint import load_checkpoint, save_checkpoint
from cryopick.config import TrainConfig, dump_yaml, from_dict, to_dict
from cryopick.config import validate as validate_config
from cryopick.crops import dense_sampler
from cryopick.data import PatchDataset, PUBatchSampler, SplitData, batch_composition
from cryopick.dataset import dataset_fingerprint, dataset_micrographs, load_dataset
from cryopick.device import autocast_factory, resolve_device, to_input
from cryopick.device import channels_last as to_channels_last
from cryopick.ema import EMATeacher
from cryopick.errors import CryopickError
from cryopick.fsutil import (
    check_output_dir,
    discard_dir,
    new_staging_dir,
    recover_replaced_dir,
    swap_in,
    write_text_atomic,
)
from cryopick.inference import context_pad
from cryopick.model import PatchClassifier
from cryopick.progress import info, progress_bar, warn
from cryopick.report import next_steps_train, train_summary
from cryopick.runtime import (
    Distributed,
    StopRequest,
    is_main_process,
    load_rng_state_dict,
    rng_restore,
    rng_snapshot,
    rng_state_dict,
)
from cryopick.trainlog import MetricsLog
from cryopick.trainplan import (
    epoch_line,
    first_epoch_best_warning,
    forwards_per_step,
    resume_differences,
    validation_budget,
    validation_subset,
)
from cryopick.trainstep import (
    announce_cost,
    dense_step_loss,
    lr_at,
    make_optimizer,
    make_views,
    optimisation_step,
    resolve_prior,
    step_loss,
)
from cryopick.validation import positive_radius_px, validate


@dataclass
class TrainResult:
    exp_dir: Path
    best_metric: float
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint (``training_state["loop"]`` and ``["history"]``)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch

    def loop_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "history"}

    @classmethod
    def from_saved(cls, loop: dict, history: list[dict]) -> TrainState:
        return cls(**loop, history=list(history))


@dataclass
class Run:
    """What one training run works with, built once by ``build_run`` before the first epoch."""

    config: TrainConfig
    exp_dir: Path
    dist: Distributed
    device: torch.device
    dataset: PatchDataset
    prior: float
    shift_px: float  # the positive radius in binned px, also the weak view's shift
    channels_last: bool
    autocast: Callable
    model: PatchClassifier
    teacher: EMATeacher | None
    optimizer: torch.optim.Optimizer
    train_data: SplitData
    val_data: SplitData
    val_budget: int
    sampler: PUBatchSampler
    gen: torch.Generator  # the augmentation stream
    held_out: list[dict] = field(default_factory=list)  # dense: labeled micrographs with their held-out labels
    dataset_fingerprint: str = ""  # dataset.dataset_fingerprint: what --resume checks the dataset's content by
    ddp_model: torch.nn.Module | None = None
    forward: torch.nn.Module | None = None  # ddp_model, compiled where asked
    rng_snapshot: tuple | None = None  # the random streams at the start of the step in flight

    @property
    def last_path(self) -> Path:
        return self.exp_dir / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.exp_dir / "checkpoints" / "best.pt"

    @property
    def total_steps(self) -> int:
        return self.sampler.steps_per_epoch * self.config.train.epochs

    @property
    def warmup_steps(self) -> int:
        return int(self.config.optim.warmup_epochs * self.sampler.steps_per_epoch)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The EMA teacher where there is one (what pick uses), else the student."""
        return self.teacher.module if self.teacher else self.model

    def save(self, path: Path, state: TrainState, metrics: dict) -> None:
        save_checkpoint(path, model_spec=self.model.spec, model_state=self.model.state_dict(),
                        ema_state=self.teacher.module.state_dict() if self.teacher else None,
                        config=to_dict(self.config), preprocess=self.dataset.record.to_dict(), metrics=metrics,
                        epoch=state.epoch, step=state.global_step, training_state=self.training_state(state))

    def training_state(self, state: TrainState) -> dict:
        return {
            "loop": state.loop_dict(),
            "history": state.history,
            "optimizer": self.optimizer.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher else None,
            **rng_state_dict(self.gen),
            "prior": self.prior,
            "dataset": {"fingerprint": self.dataset_fingerprint},
        }


# ---------------------------------------------------------------------------------------------
# set-up


def select_unlabeled(split: SplitData, config: TrainConfig, quiet: bool) -> SplitData:
    """Unlabeled patches for training, by ``data.unlabeled_from``.

    Positives come from a few labeled micrographs. Unlabeled patches from *other* micrographs differ from
    them in defocus, ice and contrast as well as in content, so a PU classifier can learn "which micrograph"
    instead of "which particle" (scores then shift from micrograph to micrograph). Drawing U only from the
    labeled micrographs removes that shortcut; every micrograph is still picked.
    """
    if config.data.unlabeled_from == "all":
        return split
    if config.data.unlabeled_from != "labeled":
        raise CryopickError(f"data.unlabeled_from must be labeled or all, got {config.data.unlabeled_from}")
    chosen = split.unlabeled_from_labeled_micrographs()
    if len(chosen.unlabeled) == 0:
        warn("no unlabeled patches on the labeled micrographs; using every micrograph's")
        return split
    info(f"unlabeled patches from the labeled micrographs: {len(chosen.unlabeled)} of {len(split.unlabeled)}", quiet)
    return chosen


def _on(data: SplitData, device: torch.device) -> SplitData:
    """Patches on the GPU once, not copied there every step or epoch; on the CPU they stay where they are."""
    return data.to(device) if device.type == "cuda" else data


def _count_note(config: TrainConfig) -> str:
    if config.loss.expected_particles is None or config.data.mode != "dense":
        return ""
    return f" (your count, {config.loss.expected_particles:g} per micrograph, calibrates the picks)"


def _data_note(dataset, sampler, held_out: list[dict], mode: str) -> str:
    """What trains and what is held out: labels and micrographs (dense) or patches (patches)."""
    if mode == "dense":
        n_train = sum(len(source.labels) for source in sampler.sources)
        n_held = sum(len(m["labels"]) for m in held_out)
        return (f"{len(sampler.sources)} labeled micrographs, {n_train} training labels + {n_held} held out "
                "(dense crops; extract's patches unused)")
    return (f"{len(dataset.train.positive)} positive / {len(dataset.train.unlabeled)} unlabeled patches (train), "
            f"{len(dataset.val.positive)} / {len(dataset.val.unlabeled)} (val)")


def build_run(config: TrainConfig, exp_dir: Path, quiet: bool) -> Run:
    """Device and ranks, the dataset and its prior, the model, teacher and optimiser, the P:U sampler."""
    dist = Distributed(resolve_device(config.train.device))
    device = dist.device
    torch.manual_seed(config.train.seed + dist.rank)
    dataset = load_dataset(config.data.data_dir)
    prior = resolve_prior(config, dataset)
    shift_px = positive_radius_px(config.data.max_shift, dataset.record)
    on_cuda = device.type == "cuda"
    channels_last = config.train.channels_last  # faster on CUDA and on CPUs (oneDNN) alike
    model = PatchClassifier(config.model.backbone, config.model.dropout, config.model.output_stride).to(device)
    model = to_channels_last(model, channels_last)
    teacher = EMATeacher(model, config.model.ema_decay) if config.model.use_ema else None
    optimizer = make_optimizer(model, config)
    train_data = dataset.train  # dense training cuts its own crops: the patches are not trained on, nor moved
    if config.data.mode == "patches":
        train_data = _on(select_unlabeled(dataset.train, config, quiet or not dist.main), device)
    n_p, n_u = batch_composition(config.data.batch_size, config.data.batch_ratio)
    if config.data.mode == "dense":
        context = context_pad(model, dataset.record.patch_size)
        if context:
            info(f"{config.model.backbone} sees more than a patch: each {dataset.record.patch_size}-px crop carries "
                 f"{context} binned px of context on every side, as in pick", quiet or not dist.main)
        sampler, held_out = dense_sampler(dataset.source, dataset.record.patch_size, model.output_stride, shift_px,
                                          (n_p, n_u), config, dist.rank, dist.world, context)
    else:
        held_out = []
        sampler = PUBatchSampler(len(train_data.positive), len(train_data.unlabeled), n_p, n_u, config.train.seed,
                                 config.train.steps_per_epoch, dist.rank, dist.world)
    info(f"dataset {dataset.source}: {_data_note(dataset, sampler, held_out, config.data.mode)}; prior π = "
         f"{prior:.4g}{_count_note(config)}; positive radius {shift_px:.1f} binned px; device {device}",
         quiet or not dist.main)
    per_step = forwards_per_step(n_p, n_u, config.loss.consistency, config.loss.lambda_cons, config.data.mode)
    val_budget = validation_budget(sampler.steps_per_epoch, per_step, config.train.val_budget,
                                   config.train.val_max_patches)
    gen = torch.Generator(device=device).manual_seed(config.train.seed * 7919 + dist.rank)
    return Run(config, exp_dir, dist, device, dataset, prior, shift_px, channels_last,
               autocast_factory(config.train.amp and on_cuda), model, teacher, optimizer, train_data,
               _on(validation_subset(dataset.val, val_budget), device), val_budget, sampler, gen, held_out,
               dataset_fingerprint=dataset_fingerprint(config.data.data_dir))


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
    main_rank = is_main_process()
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
    if not result.interrupted and is_main_process() and not best.is_file():
        raise CryopickError(f"training wrote no checkpoint ({best} is missing)")
    return result


def _train_in(config: TrainConfig, exp_dir: Path, resume: bool, quiet: bool) -> TrainResult:
    """The training run, writing the experiment into ``exp_dir``; running out of memory is a user error."""
    try:
        return _train_run(config, exp_dir, resume, quiet)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise CryopickError(f"out of memory with --batch-size {config.data.batch_size} ({config.model.backbone} on "
                            f"{config.train.device}): lower --batch-size, or train a smaller --backbone") from None


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA and CPU allocation failures (RuntimeError subclasses or texts) and Python's MemoryError."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _train_run(config: TrainConfig, exp_dir: Path, resume: bool, quiet: bool) -> TrainResult:
    run = build_run(config, exp_dir, quiet)
    state = TrainState()
    if resume:
        state = _restore(run)
        info(f"resuming from {run.last_path}: epoch {state.epoch}, step {state.step_in_epoch}", quiet)
    if run.dist.main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(exp_dir / "config.yaml", dump_yaml(config))
    run.ddp_model = run.dist.wrap(run.model)
    run.forward = torch.compile(run.ddp_model) if config.train.compile else run.ddp_model
    log = MetricsLog(exp_dir, state.history, quiet, run.dist.main)  # appends each epoch's row to state.history
    if run.dist.main and not quiet and state.epoch < config.train.epochs:
        dataset = run.dataset
        announce_cost(run.model, config, run.train_data, run.val_data,
                      len(dataset.val.positive) + len(dataset.val.unlabeled), run.sampler,
                      config.train.epochs - state.epoch,
                      dict(shift_px=run.shift_px, prior=run.prior, autocast=run.autocast,
                           channels_last=run.channels_last, device=run.device),
                      sum(len(m["labels"]) for m in run.held_out) if config.data.mode == "dense" else None)
    interrupted = _run_epochs(run, state, log, quiet)
    if not interrupted:
        _finish(run, state, quiet)
    return TrainResult(exp_dir, state.best, state.best_epoch, state.epoch, state.history, interrupted)


def _run_epochs(run: Run, state: TrainState, log: MetricsLog, quiet: bool) -> bool:
    """Epochs until the last one or early stopping; True when interrupted (the state is then in last.pt)."""
    stop_request = StopRequest()
    try:
        with progress_bar(quiet or not run.dist.main, extra="loss {task.fields[loss]:.4f}") as progress:
            done = state.epoch * run.sampler.steps_per_epoch + state.step_in_epoch
            task = progress.add_task("train", total=run.total_steps, loss=float("nan"), completed=done)
            while state.epoch < run.config.train.epochs:
                row = run_epoch(run, state, lambda loss: progress.update(task, advance=1, **loss), stop_request)
                if end_epoch(run, state, row, log, quiet):
                    break
    except KeyboardInterrupt:
        if run.rng_snapshot is not None and not stop_request.requested:
            rng_restore(run.gen, run.rng_snapshot)  # a hard stop inside a step: redo that step on resume
        if run.dist.main:
            run.save(run.last_path, state, state.history[-1] if state.history else {})
        return True
    finally:
        stop_request.close()
        log.close()
        run.dist.close()
    return False


def run_epoch(run: Run, state: TrainState, advance: Callable[[dict], None], stop_request: StopRequest) -> dict:
    """The steps of epoch ``state.epoch`` from ``state.step_in_epoch`` on; returns the epoch's mean logs."""
    config = run.config
    sums: dict[str, float] = {}
    n_steps, t0, n_samples = 0, time.perf_counter(), 0
    run.ddp_model.train()
    for step, (a, b) in enumerate(run.sampler.epoch(state.epoch)):
        if step < state.step_in_epoch:
            continue
        logs, n = _train_step(run, state, step, a, b)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        n_steps += 1
        n_samples += n
        show = n_steps % config.train.log_every == 1 or config.train.log_every <= 1
        advance({"loss": float(logs["loss"])} if show else {})
        if stop_request.requested:
            raise KeyboardInterrupt
    row = {"epoch": state.epoch, "step": state.global_step, "prior": run.prior}
    row.update({k: float(v) / max(1, n_steps) for k, v in sums.items()})
    row["samples_per_s"] = n_samples * run.dist.world / max(1e-9, time.perf_counter() - t0)
    return row


def _train_step(run: Run, state: TrainState, step: int, a: torch.Tensor, b: torch.Tensor) -> tuple[dict, int]:
    """One optimisation step on the sampler's batch: positive and unlabeled patch indices, or (dense) crops and
    their target maps; (its logs, its number of network inputs)."""
    config = run.config
    lr = lr_at(state.global_step, run.total_steps, run.warmup_steps, config.optim.lr, config.optim.scheduler)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    epoch_f = state.epoch + step / run.sampler.steps_per_epoch
    run.rng_snapshot = rng_snapshot(run.gen)  # Ctrl-C mid-step rewinds to here, so resume is exact
    teacher_model = run.teacher.module if run.teacher else run.model
    if config.data.mode == "dense":
        crops = to_input(a.to(run.device), run.channels_last)
        loss, logs = dense_step_loss(run.forward, teacher_model, crops, b.to(run.device), config, run.prior,
                                     epoch_f, run.autocast, run.gen)
        n_inputs = len(crops)
    else:
        data = run.train_data
        xp = to_input(data.positive[a.to(data.positive.device)].to(run.device), run.channels_last)
        xu = to_input(data.unlabeled[b.to(data.unlabeled.device)].to(run.device), run.channels_last)
        views = make_views(xp, xu, config, run.shift_px, run.gen)
        loss, logs = step_loss(run.forward, teacher_model, views, config, run.prior, epoch_f, run.autocast)
        n_inputs = len(xp) + len(xu)
    optimisation_step(loss, run.optimizer, run.teacher, run.model)
    state.step_in_epoch = step + 1
    state.global_step += 1
    logs["lr"] = lr
    return logs, n_inputs


def end_epoch(run: Run, state: TrainState, row: dict, log: MetricsLog, quiet: bool) -> bool:
    """Validate, log, save best.pt/last.pt (rank 0); True when early stopping ends the run."""
    config = run.config
    state.epoch, state.step_in_epoch = state.epoch + 1, 0
    stop = False
    if run.dist.main:
        row.update(_validate(run))
        stop = _track_best(run, state, row)
        info(epoch_line(row, config.train.epochs, config.train.monitor, state.best, state.best_epoch), quiet)
        log.log(row)
        run.save(run.last_path, state, row)
    stop = run.dist.broadcast_flag(stop)
    if stop:
        info(f"early stopping: no improvement of {config.train.monitor} for "
             f"{config.train.early_stopping_patience} epochs", quiet or not run.dist.main)
    return stop


def _validate(run: Run) -> dict:
    """The epoch's held-out metrics: held-out labels' peaks (dense) or held-out micrographs' patches."""
    if run.config.data.mode == "dense":
        return held_out_metrics(run.eval_model, run.held_out, run.dataset.record, run.device, run.prior)
    return validate(run.eval_model, run.val_data, run.prior, run.shift_px * run.dataset.record.bin_factor,
                    run.device, run.autocast, run.channels_last)


def _finish(run: Run, state: TrainState, quiet: bool) -> None:
    """After the last epoch: best.pt exists and holds pick's calibration; warn about a first-epoch best."""
    if run.dist.main and not run.best_path.exists() and run.last_path.exists():
        run.save(run.best_path, state, state.history[-1] if state.history else {})
    if run.dist.main and run.best_path.exists():
        calibrate_best(run.best_path, run.config.data.data_dir, run.config.loss.expected_particles, run.device,
                       quiet, run.held_out, split_held_out=run.config.data.mode != "dense")
    warning = first_epoch_best_warning(state.best_epoch, state.epoch, run.config.train.monitor)
    validated = any("val_recall" in row for row in state.history)  # else "best" is the lowest training loss
    if run.dist.main and warning and validated:
        warn(warning)


def _track_best(run: Run, state: TrainState, row: dict) -> bool:
    """Save best.pt when the monitored metric reaches the best so far less its standard error; True when early
    stopping should stop.

    With a few held-out labels the metric's noise (``*_se``, dense training) exceeds its changes from epoch to
    epoch; a later, longer-trained model within that noise of the best is the better bet, so it is kept.
    """
    value = _monitored(run.config.train.monitor, row)
    noise = _monitored_se(run.config.train.monitor, row)
    peak = max([_monitored(run.config.train.monitor, r) for r in state.history] + [value])
    if value >= peak - noise and (value > state.best or noise > 0):
        state.best, state.best_epoch, state.bad_epochs = value, row["epoch"], 0
        run.save(run.best_path, state, row)
        return False
    state.bad_epochs += 1
    return state.bad_epochs >= run.config.train.early_stopping_patience


def _monitored(key: str, row: dict) -> float:
    value = row.get(key, row.get(f"val_{key}"))
    if value is None or not math.isfinite(value):
        return -row.get("loss", math.inf)  # no validation data: lowest training loss is best
    return value


def _monitored_se(key: str, row: dict) -> float:
    se = row.get(f"{key}_se", row.get(f"val_{key}_se"))
    return se if se is not None and math.isfinite(se) else 0.0


def _dataset_identity(run: Run) -> dict:
    """What ``--resume`` checks the dataset by: its preprocessing record and content fingerprint."""
    return {**run.dataset.record.to_dict(), "fingerprint": run.dataset_fingerprint}


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _saved_config(value) -> dict:
    """A checkpoint's config with older key names and values read as today's (as ``--config`` reads them)."""
    try:
        return to_dict(from_dict(TrainConfig, _mapping(value)))
    except CryopickError:
        return _mapping(value)


def _restore(run: Run) -> TrainState:
    """Model, teacher, optimiser and random streams from last.pt; the loop's state to continue from."""
    path, model = run.last_path, run.model
    ckpt = load_checkpoint(path, map_location=run.device)
    ts = ckpt.get("training_state")
    if not ts or not isinstance(ts, dict):
        raise CryopickError(f"{path}: holds no training state to resume from")
    saved_data = {**_mapping(ckpt.get("preprocess")), **_mapping(_mapping(ts).get("dataset"))}
    differences = resume_differences(_saved_config(ckpt.get("config")), to_dict(run.config), saved_data,
                                     _dataset_identity(run))
    if differences:
        shown = "; ".join(differences[:4]) + (f"; … {len(differences) - 4} more" if len(differences) > 4 else "")
        raise CryopickError(f"--resume: {path} was trained with other settings ({shown}); resume with the "
                            "same settings (its config.yaml), or start over with --overwrite")
    saved = ckpt.get("model_spec", {})
    if saved != model.spec:
        raise CryopickError(f"--resume: {path} was trained with model {saved}, this run's config gives {model.spec}; "
                            "resume with the same --backbone/model settings, or start over with --overwrite")
    try:
        model.load_state_dict(ckpt["model_state"])
        if run.teacher and ts.get("teacher"):
            run.teacher.load_state_dict(ts["teacher"])
        run.optimizer.load_state_dict(ts["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CryopickError(f"--resume: {path} does not match this run's model or optimizer ({first}); "
                            "resume with the same settings, or start over with --overwrite") from None
    try:
        load_rng_state_dict(run.gen, ts)
        return TrainState.from_saved(ts["loop"], ts["history"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CryopickError(f"--resume: the training state in {path} is damaged ({type(exc).__name__}: {exc}); "
                            "start over with --overwrite") from None


# ---------------------------------------------------------------------------------------------
# after training


def summary_lines(result: TrainResult, config: TrainConfig) -> list[str]:
    """The end-of-training summary and the pick command to run next with this run's best checkpoint."""
    best_row = next((r for r in result.history if r.get("epoch") == result.best_epoch), {})
    lines = [train_summary(config.train.monitor, result.best_metric, result.best_epoch, result.epochs_run,
                           result.exp_dir, best_row.get("val_recall"), best_row.get("val_recall90_score"))]
    return lines + next_steps_train(result.exp_dir / "checkpoints" / "best.pt",
                                    dataset_micrographs(config.data.data_dir))
