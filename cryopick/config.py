"""Typed configuration: dataclasses with the design document's defaults, YAML files, CLI overrides.

Every command resolves its configuration as: dataclass defaults < YAML file < CLI overrides, and
saves the resolved configuration next to its output.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cryopick.errors import CryopickError


@dataclass
class ExtractConfig:
    diameter: float = 0.0  # particle diameter, Å (required)
    bin: int | None = None  # integer bin factor; default chosen from the diameter
    target_pixel_size: float | None = None  # Å/px after binning (alternative to bin)
    pixel_size: float | None = None  # Å/px of the input micrographs, overrides the headers/STAR
    patch_size: int = 128  # binned pixels
    unlabeled_per_micrograph: int | None = None  # default: dense sampling, see extract.default_unlabeled_count
    val_fraction: float = 0.2  # fraction of micrographs held out for validation
    chunk_size: int = 2048  # patches per .pt chunk
    workers: int = 1
    seed: int = 0
    overwrite: bool = False
    strict: bool = False
    coord_scale: float = 1.0  # multiply input coordinates (e.g. Topaz tables written in binned pixels)


@dataclass
class DataConfig:
    data_dir: str = ""
    batch_size: int = 32
    batch_ratio: list[int] = field(default_factory=lambda: [1, 4])  # P : U in each batch
    max_shift: float = 0.125  # crop shift of weak augmentation = positive tolerance, fraction of the diameter
    unlabeled_from: str = "labelled"  # labelled: U only from micrographs with labels (no micrograph bias) | all


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet8 (small, CPU) | resnet18 | resnet34 | resnet50
    dropout: float = 0.3
    output_stride: int = 8  # binned pixels between score-map samples
    use_ema: bool = True
    ema_decay: float = 0.999


@dataclass
class LossConfig:
    prior: float = 0.3  # π, fraction of unlabeled patches that are positive
    expected_particles: float | None = None  # particles per micrograph; sets π when given
    nnpu_beta: float = 0.0  # Kiryo's β: negative risk below −β triggers defitting
    nnpu_gamma: float = 1.0  # Kiryo's γ: step size of the defitting step
    defitting: bool = True  # gradient ascent on −γ·(negative risk) when it drops below −β
    balanced_prior: float | None = None  # π' of imbalanced nnPU (Su et al. 2021); None = plain Kiryo nnPU
    consistency: str = "selective"  # selective | all | none
    consistency_threshold: float = 0.95  # τ on conf = |p − 0.5|·2
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
    channels_last: bool = True
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


@dataclass
class PickConfig:
    threshold: float = 0.5  # probability
    radius: float | None = None  # NMS radius, Å; default: half the particle diameter from training
    radius_px: float | None = None  # NMS radius in original micrograph pixels (overrides radius)
    suffix: str = "cryopick"
    edge: float = 0.0  # original px: drop picks closer than this to a micrograph edge (half the extraction box)
    max_picks: int | None = None
    expected: float | None = None  # particles per micrograph: report the threshold giving that many
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
    workers: int = 2  # background threads reading and preprocessing the next micrographs
    amp: bool = True  # bf16 autocast on CUDA


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, YAML, dotted overrides


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls: type, data: dict | None, where: str = "config") -> Any:
    """Build dataclass ``cls`` from nested ``data``; unknown keys are an error naming the key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data.pop(f.name)
        ftype = hints[f.name]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise CryopickError(f"{where}: '{f.name}' must be a mapping, got {value!r}")
            value = from_dict(ftype, value, f"{where}.{f.name}")
        else:
            value = _coerce(value, ftype, f"{where}.{f.name}")
        kwargs[f.name] = value
    if data:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise CryopickError(f"{where}: unknown key(s) {', '.join(sorted(data))} (known: {known})")
    return cls(**kwargs)


def _coerce(value: Any, ftype: Any, where: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(ftype)
    args = [a for a in typing.get_args(ftype) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _coerce(value, args[0], where)
    try:
        if ftype is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if ftype is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if ftype is float:
            return float(value)
        if ftype is str:
            return str(value)
        if origin is list:
            (inner,) = typing.get_args(ftype)
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            return [_coerce(v, inner, where) for v in value]
    except (TypeError, ValueError):
        raise CryopickError(f"{where}: {value!r} is not a valid {getattr(ftype, '__name__', ftype)}") from None
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CryopickError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise CryopickError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CryopickError(f"{path}: a config file must be a mapping of sections")
    return data


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``loss.prior``) in nested ``data``; ``None`` values are ignored."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CryopickError(f"override {dotted}: '{key}' is not a section")
        node[leaf] = value
    return out


def resolve(cls: type, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
            base: dict | None = None) -> Any:
    """Defaults < ``base`` < YAML file < overrides, validated into dataclass ``cls``."""
    data = dict(base or {})
    if yaml_path:
        data = _deep_merge(data, load_yaml(yaml_path))
    data = apply_overrides(data, overrides or {})
    return from_dict(cls, data, str(yaml_path) if yaml_path else "config")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_yaml(obj: Any) -> str:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return yaml.safe_dump(data, sort_keys=False)
