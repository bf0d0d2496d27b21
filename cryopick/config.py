"""Typed configuration: each command's settings dataclass with its defaults, and the rules that validate them.

Every command resolves its configuration as: dataclass defaults < YAML file < CLI overrides, and
saves the resolved configuration next to its output (YAML and dict handling: cryopick.yamlconfig).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cryopick.errors import CryopickError
from cryopick.yamlconfig import apply_overrides, deep_merge, dump_yaml, from_dict, load_yaml, to_dict

__all__ = ["ExtractConfig", "DataConfig", "ModelConfig", "LossConfig", "AugmentConfig", "OptimConfig",
           "TrainLoopConfig", "TrainConfig", "PickConfig", "EvaluateConfig", "resolve", "validate", "option_name",
           "Rule", "RULES", "MONITORS", "dump_yaml", "from_dict", "load_yaml", "to_dict"]


@dataclass
class ExtractConfig:
    diameter: float = 0.0  # particle diameter, Å (required)
    bin: int | None = None  # integer bin factor; default chosen from the diameter
    target_pixel_size: float | None = None  # Å/px after binning (alternative to bin)
    pixel_size: float | None = None  # Å/px of the input micrographs, overrides the headers/STAR
    patch_size: int = 128  # binned pixels
    unlabeled_per_micrograph: int | None = None  # default: dense sampling, see extract.default_unlabeled_count
    val_fraction: float = 0.2  # fraction of micrographs in the val split (held out by train --mode patches)
    chunk_size: int = 2048  # patches per .pt chunk
    workers: int = 1
    seed: int = 0
    overwrite: bool = False
    strict: bool = False
    coord_scale: float = 1.0  # multiply input coordinates (e.g. Topaz tables written in binned pixels)
    cs_flip_y: bool = True  # cryoSPARC .cs labels: y from its lower-left origin (off: picks made on flipped micrographs)
    labeled_only: bool = False  # only micrographs with labels: all that dense training reads (patches: no val of others)


@dataclass
class DataConfig:
    data_dir: str = ""
    batch_size: int = 32
    batch_ratio: list[int] = field(default_factory=lambda: [1, 4])  # P : U per batch (dense: crops near a label : any)
    max_shift: float = 0.125  # crop shift of weak augmentation = positive tolerance, fraction of the diameter
    mode: str = "dense"  # dense: every score-map sample of random labeled-micrograph crops | patches: one per patch
    holdout_labels: float = 0.2  # dense: fraction of each micrograph's labels kept out of training (validation)
    unlabeled_from: str = "labeled"  # patches: U only from micrographs with labels (no micrograph bias) | all

    RENAMED_VALUES: ClassVar[dict] = {"unlabeled_from": {"labelled": "labeled"}}  # older configs spelled it British


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet8 (small, CPU) | resnet18 | resnet34 | resnet50
    dropout: float = 0.3
    output_stride: int = 8  # binned pixels between score-map samples
    use_ema: bool = True
    ema_decay: float = 0.999


@dataclass
class LossConfig:
    prior: float | None = None  # π, fraction of unlabeled samples that are particles; None: 0 dense, 0.3 patches
    expected_particles: float | None = None  # particles per micrograph: calibrates pick (patches: also sets π)
    nnpu_beta: float = 0.0  # Kiryo's β: negative risk below −β triggers defitting
    nnpu_gamma: float = 1.0  # Kiryo's γ: step size of the defitting step
    defitting: bool = True  # gradient ascent on −γ·(negative risk) when it drops below −β
    balanced_prior: float | None = None  # π' of imbalanced nnPU (Su et al. 2021); None: 0.5 dense, plain nnPU patches
    consistency: str = "selective"  # selective | all | none
    consistency_threshold: float = 0.95  # τ on conf = |p − 0.5|·2
    # share of a batch's crops (dense; patches: of those the consistency covers) given a strong view and a
    # teacher pass: a quarter halves a step's cost, and at equal time the extra steps win (benchmarks/RESULTS.md)
    consistency_fraction: float = 0.25
    lambda_cons: float = 1.0
    cons_ramp_epochs: list[float] = field(default_factory=lambda: [0.0, 10.0])
    lambda_ent: float = 0.01
    ent_ramp_epochs: list[float] = field(default_factory=lambda: [10.0, 20.0])


@dataclass
class AugmentConfig:
    rotate_degrees: float = 10.0
    rot90: bool = True
    flips: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: float = 0.5  # 0–1
    cutout: float = 0.25  # side of the cut square, fraction of the patch
    noise_std: float = 0.3  # Gaussian noise σ relative to the normalised image
    contrast: float = 0.3  # contrast factor range ±
    mixup: float = 0.0  # Beta(α, α) mixup among unlabeled strong views; 0 = off


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"  # cosine | none
    warmup_epochs: float = 1.0


@dataclass
class TrainLoopConfig:
    epochs: int = 50
    steps_per_epoch: int | None = None  # default: one pass over the larger of P and U (P cycled)
    early_stopping_patience: int = 10
    monitor: str = "auc_pn"  # validation metric for best checkpoint and early stopping
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # channels-last memory: faster convolutions on CUDA and on CPUs
    compile: bool = False
    seed: int = 0
    output_root: str = "experiments"
    exp_name: str = "cryopick"
    log_every: int = 50
    val_max_patches: int = 20000  # held-out patches scored per epoch, at most
    val_budget: float = 0.25  # and at most this fraction of an epoch's training forward passes (min 512; 0 = off)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)


# pick's default cut on the calibrated P(particle | peak) (cryopick.calibrate.default_cut: this, or half a
# mixture calibration's estimated best F1 where that is lower). The cut that maximises F1 on a calibrated
# posterior is half the best F1 (Lipton et al. 2014), 0.40–0.48 for models worth picking with (best F1
# 0.8–0.95); the estimated counts err low more often than high (labels are the clearest particles), so the
# posterior does too: 0.4 reached 0.95 × the best F1 on all 20 stored models where 0.5 did on 17
# (benchmarks/RESULTS.md)
DEFAULT_THRESHOLD = 0.4


@dataclass
class PickConfig:
    # calibrated probability; None: the model's default (cryopick.calibrate.default_threshold): DEFAULT_THRESHOLD,
    # or half a mixture calibration's estimated best F1 where that is lower
    threshold: float | None = None
    radius: float | None = None  # NMS radius, Å; default: half the particle diameter from training
    radius_px: float | None = None  # NMS radius in original micrograph pixels (overrides radius)
    suffix: str = "cryopick"
    edge: float = 0.0  # original px: drop picks closer than this to a micrograph edge (half the extraction box)
    max_picks: int | None = None
    expected_particles: float | None = None  # particles per micrograph: report the threshold giving that many
    shard: str | None = None  # "i/n"
    preview: int = 0
    device: str = "auto"
    batch_size: int = 4
    tile_size: int = 2048  # binned px: largest input edge scored at once (bigger micrographs are tiled)
    overwrite: bool = False
    pixel_size: float | None = None  # Å/px of the micrographs, overrides the STAR/headers
    write_box: bool = False
    write_topaz: bool = False
    write_particles: bool = False
    write_cryosparc: bool = False  # particles_<suffix>.cs (cryoSPARC location fields)
    workers: int = 2  # background threads reading and preprocessing the next micrographs
    amp: bool = True  # bf16 autocast on CUDA

    RENAMED_KEYS: ClassVar[dict] = {"expected": "expected_particles"}  # pick's --expected before the rename


@dataclass
class EvaluateConfig:
    radius_px: float | None = None  # match radius, original micrograph px
    diameter: float | None = None  # Å
    pixel_size: float | None = None  # Å/px
    threshold: float | None = None  # score threshold for precision/recall/F1
    method: str = "hungarian"  # hungarian | greedy
    coord_scale: float = 1.0
    split: str = "val"  # patch-level mode: val | train | all
    device: str = "auto"

    RENAMED_KEYS: ClassVar[dict] = {"radius": "radius_px"}  # evaluate's --radius before the rename


def resolve(cls: type, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
            base: dict | None = None) -> Any:
    """Defaults < ``base`` < YAML file < overrides, validated into dataclass ``cls``."""
    data = dict(base or {})
    if yaml_path:
        data = deep_merge(data, load_yaml(yaml_path))
    where = str(yaml_path) if yaml_path else "config"
    data = apply_overrides(data, overrides or {}, where)
    config = from_dict(cls, data, where)
    validate(config)
    return config


# ---------------------------------------------------------------------------------------------
# validation: every numeric key finite and in range, every enumerated key one of its choices.
# Library entry points call validate() before any work or write; resolve() calls it too.


@dataclass(frozen=True)
class Rule:
    """Accepted values of one key: a numeric range, or a set of choices, or a pattern (strings)."""

    cli: str | None = None  # the CLI option that sets it, named in messages
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is refused
    high_open: bool = False
    integer: bool = False
    optional: bool = False  # None allowed
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # regular expression a string must match fully
    describe: str = ""  # the accepted values in words, for patterns

    def accepted(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.pattern is not None:
            return self.describe
        kind = "an integer" if self.integer else "a number"
        lo = None if self.low is None else f"{_num(self.low)} {'<' if self.low_open else '≤'} "
        hi = None if self.high is None else f" {'<' if self.high_open else '≤'} {_num(self.high)}"
        if lo and hi:
            return f"{kind} with {lo}value{hi}"
        if lo:
            return f"{kind} {'>' if self.low_open else '≥'} {_num(self.low)}"
        if hi:
            return f"{kind} {'<' if self.high_open else '≤'} {_num(self.high)}"
        return f"a finite {kind.split()[-1]}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _r(cli=None, low=None, high=None, **kw) -> Rule:
    return Rule(cli=cli, low=low, high=high, **kw)


DEVICE = dict(pattern=r"auto|cpu|mps|cuda(:\d+)?", describe="auto, cpu, cuda or cuda:N")
_METRICS = ("auc_pn", "auc_pu", "precision", "recall", "f1", "true_auc", "true_precision", "true_recall", "true_f1")
MONITORS = _METRICS + tuple(f"val_{m}" for m in _METRICS)

RULES: dict[type, dict[str, Rule]] = {
    ExtractConfig: {
        "diameter": _r("--diameter", 0, 1e5, low_open=True),
        "bin": _r("--bin", 1, 1000, integer=True, optional=True),
        "target_pixel_size": _r("--target-pixel-size", 0, 1e4, low_open=True, optional=True),
        "pixel_size": _r("--pixel-size", 0, 1e4, low_open=True, optional=True),
        "patch_size": _r(None, 16, 1024, integer=True),
        "unlabeled_per_micrograph": _r("--unlabeled-per-micrograph", 1, 1e6, integer=True, optional=True),
        "val_fraction": _r("--val-fraction", 0, 1, high_open=True),
        "chunk_size": _r("--chunk-size", 1, 1e6, integer=True),
        "workers": _r("--workers", 1, 1024, integer=True),
        "seed": _r("--seed", 0, 2**32 - 1, integer=True),
        "coord_scale": _r("--coord-scale", 0, 1e4, low_open=True),
    },
    DataConfig: {
        "batch_size": _r("--batch-size", 2, 1e5, integer=True),
        "max_shift": _r(None, 0, 0.5),
        "unlabeled_from": _r(None, choices=("labeled", "all")),
        "mode": _r("--mode", choices=("dense", "patches")),
        "holdout_labels": _r(None, 0, 0.9),
    },
    ModelConfig: {
        "backbone": _r("--backbone"),  # choices from cryopick.model, checked in _check_model
        "dropout": _r(None, 0, 1, high_open=True),
        "output_stride": _r(None, choices=("4", "8", "16", "32"), integer=True),  # the strides model.py builds
        "ema_decay": _r(None, 0, 1, high_open=True),
    },
    LossConfig: {
        "prior": _r("--prior", 0, 1, high_open=True, optional=True),
        "expected_particles": _r("--expected-particles", 0, 1e7, low_open=True, optional=True),
        "nnpu_beta": _r(None, 0, 1e3),
        "nnpu_gamma": _r(None, 0, 1e3),
        "balanced_prior": _r("--balanced-prior", 0, 1, low_open=True, high_open=True, optional=True),
        "consistency": _r("--consistency", choices=("selective", "all", "none")),
        "consistency_threshold": _r(None, 0, 1),
        "consistency_fraction": _r(None, 0, 1, low_open=True),
        "lambda_cons": _r(None, 0, 1e3),
        "lambda_ent": _r(None, 0, 1e3),
    },
    AugmentConfig: {
        "rotate_degrees": _r(None, 0, 180),
        "randaugment_ops": _r(None, 0, 20, integer=True),
        "randaugment_magnitude": _r(None, 0, 1),
        "cutout": _r(None, 0, 1),
        "noise_std": _r(None, 0, 100),
        "contrast": _r(None, 0, 1),
        "mixup": _r(None, 0, 100),
    },
    OptimConfig: {
        "name": _r(None, choices=("adamw", "sgd")),
        "lr": _r("--lr", 0, 10, low_open=True),
        "weight_decay": _r(None, 0, 10),
        "momentum": _r(None, 0, 1, high_open=True),
        "scheduler": _r(None, choices=("cosine", "none")),
        "warmup_epochs": _r(None, 0, 1e6),
    },
    TrainLoopConfig: {
        "epochs": _r("--epochs", 1, 1e6, integer=True),
        "steps_per_epoch": _r("--steps-per-epoch", 1, 1e9, integer=True, optional=True),
        "early_stopping_patience": _r(None, 1, 1e6, integer=True),
        "monitor": _r(None, choices=MONITORS),
        "device": _r("--device", **DEVICE),
        "seed": _r("--seed", 0, 2**32 - 1, integer=True),
        "output_root": _r("--output-root", pattern=r"(?s).+", describe="a directory"),
        "exp_name": _r("--exp-name", pattern=r"(?!\.\.?$)[^/\\]+", describe="a plain directory name"),
        "log_every": _r(None, 1, 1e9, integer=True),
        "val_max_patches": _r(None, 1, 1e9, integer=True),
        "val_budget": _r(None, 0, 100),
    },
    PickConfig: {
        "threshold": _r("--threshold", 0, 1, optional=True),
        "radius": _r("--radius", 0, 1e5, low_open=True, optional=True),
        "radius_px": _r("--radius-px", 0, 1e6, low_open=True, optional=True),
        "suffix": _r("--suffix", pattern=r"[A-Za-z0-9._-]+", describe="letters, digits, '.', '_' and '-'"),
        "edge": _r("--edge", 0, 1e6),
        "max_picks": _r("--max-picks", 1, 1e9, integer=True, optional=True),
        "expected_particles": _r("--expected-particles", 0, 1e7, low_open=True, optional=True),
        "shard": _r("--shard", optional=True, pattern=r"\s*\d+\s*/\s*\d+\s*", describe="i/n, e.g. 0/4"),
        "preview": _r("--preview", 0, 1e6, integer=True),
        "device": _r("--device", **DEVICE),
        "batch_size": _r("--batch-size", 1, 1e4, integer=True),
        "tile_size": _r("--tile-size", 64, 1e6, integer=True),
        "pixel_size": _r("--pixel-size", 0, 1e4, low_open=True, optional=True),
        "workers": _r("--workers", 0, 1024, integer=True),
    },
    EvaluateConfig: {
        "radius_px": _r("--radius-px", 0, 1e6, low_open=True, optional=True),
        "diameter": _r("--diameter", 0, 1e5, low_open=True, optional=True),
        "pixel_size": _r("--pixel-size", 0, 1e4, low_open=True, optional=True),
        "threshold": _r("--threshold", optional=True),  # on the picks' own scale: Topaz scores are log-odds
        "method": _r("--method", choices=("hungarian", "greedy")),
        "coord_scale": _r("--coord-scale", 0, 1e4, low_open=True),
        "split": _r("--split", choices=("val", "train", "all")),
        "device": _r("--device", **DEVICE),
    },
}


def option_name(rule: Rule | None, key: str) -> str:
    """``--val-fraction (config key val_fraction)``, or ``config key loss.nnpu_beta`` for config-only keys."""
    return f"{rule.cli} (config key {key})" if rule and rule.cli else f"config key {key}"


def validate(config: Any, where: str = "") -> None:
    """Raise CryopickError naming the option, the config key and the accepted range for the first bad value.

    Keys without a rule still get type and finiteness checks, so keys added later are never unchecked.
    """
    rules = RULES.get(type(config), {})
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        key = f"{where}.{f.name}" if where else f.name
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key)
            continue
        _check_value(value, hints[f.name], rules.get(f.name), key)
    for check in _CROSS_CHECKS.get(type(config), ()):
        check(config, where)


def _check_value(value: Any, ftype: Any, rule: Rule | None, key: str) -> None:
    name = option_name(rule, key)
    args = [a for a in typing.get_args(ftype) if a is not type(None)]
    optional = type(None) in typing.get_args(ftype)
    base = args[0] if optional and len(args) == 1 else ftype
    if value is None:
        if optional or (rule and rule.optional):
            return
        raise CryopickError(f"{name} must be given")
    if typing.get_origin(base) is list:
        (inner,) = typing.get_args(base)
        if not isinstance(value, (list, tuple)):
            raise CryopickError(f"{name} = {value!r}: expected a list")
        for item in value:
            _check_value(item, inner, None, key)
        return
    if base is bool:
        if not isinstance(value, bool):
            raise CryopickError(f"{name} = {value!r}: expected true or false")
        return
    if base in (int, float):
        _check_number(value, base, rule, name)
    elif base is str:
        _check_text(value, rule, name)


def _check_number(value: Any, base: type, rule: Rule | None, name: str) -> None:
    expected = rule.accepted() if rule else f"a finite {base.__name__}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise CryopickError(f"{name} = {value!r}: expected {expected}")
    if (base is int or (rule and rule.integer)) and float(value) != int(value):
        raise CryopickError(f"{name} = {value!r}: expected {expected}")
    if rule is None:
        return
    if rule.choices is not None and _num(value) not in rule.choices:
        raise CryopickError(f"{name} = {value!r}: expected {expected}")
    too_low = rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low))
    too_high = rule.high is not None and (value > rule.high or (rule.high_open and value == rule.high))
    if too_low or too_high:
        raise CryopickError(f"{name} = {value!r} is out of range: expected {expected}")


def _check_text(value: Any, rule: Rule | None, name: str) -> None:
    if not isinstance(value, str):
        raise CryopickError(f"{name} = {value!r}: expected text")
    if rule is None:
        return
    if rule.choices is not None and value not in rule.choices:
        raise CryopickError(f"{name} = {value!r}: expected {rule.accepted()}")
    if rule.pattern is not None and not re.fullmatch(rule.pattern, value):
        raise CryopickError(f"{name} = {value!r}: expected {rule.accepted()}")


def _check_extract(config: ExtractConfig, where: str) -> None:
    if config.bin is not None and config.target_pixel_size is not None:
        raise CryopickError("give either --bin (config key bin) or --target-pixel-size (config key "
                            "target_pixel_size), not both")
    if config.patch_size % 2:
        raise CryopickError(f"config key patch_size = {config.patch_size}: expected an even number of pixels")


def _check_train(config: TrainConfig, where: str) -> None:
    from cryopick.model import BACKBONES  # torch: only when a training config is checked

    if config.model.backbone not in BACKBONES:
        raise CryopickError(f"--backbone (config key model.backbone) = {config.model.backbone!r}: expected one of "
                            f"{', '.join(BACKBONES)}")
    ratio = config.data.batch_ratio
    if len(ratio) != 2 or min(ratio) < 1:
        raise CryopickError(f"config key data.batch_ratio = {ratio}: expected two integers ≥ 1 (P, U)")
    n_p = max(1, int(round(config.data.batch_size * ratio[0] / sum(ratio))))
    if config.data.batch_size - n_p < 1:
        raise CryopickError(f"--batch-size (config key data.batch_size) = {config.data.batch_size} is too small for "
                            f"P:U = {ratio[0]}:{ratio[1]}: expected at least {n_p + 1}")
    for key in ("cons_ramp_epochs", "ent_ramp_epochs"):
        ramp = getattr(config.loss, key)
        if len(ramp) != 2 or not 0 <= ramp[0] <= ramp[1]:
            raise CryopickError(f"config key loss.{key} = {ramp}: expected [start, end] epochs with 0 ≤ start ≤ end")


def _check_pick(config: PickConfig, where: str) -> None:
    if config.shard is not None:
        index, count = (int(v) for v in config.shard.split("/"))
        if count < 1 or index >= count:
            raise CryopickError(f"--shard (config key shard) = {config.shard!r}: expected i/n with 0 ≤ i < n")


_CROSS_CHECKS: dict[type, tuple] = {
    ExtractConfig: (_check_extract,),
    TrainConfig: (_check_train,),
    PickConfig: (_check_pick,),
}
