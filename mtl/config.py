"""One config object for every command: defaults <- YAML file <- ``key.sub=value`` overrides.

Merging and validation happen here and only here, so a misspelled key or an out-of-range value fails on the
login node, naming the key, before anything is packed, trained or queued.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtl.errors import MtlError
from mtl.tasks import load_plugins, task_names, tasks


class ConfigError(MtlError, ValueError):
    """A config key is unknown, mistyped or out of range; the message names it."""


# --------------------------------------------------------------------------------------------- sections


@dataclass
class AugmentConfig:
    """Clip-level augmentation: one random draw per clip, applied to all of its frames."""

    hflip: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    brightness: float = 0.2
    contrast: float = 0.2


@dataclass
class DataConfig:
    shards: str = "shards/synth"  # a directory holding manifest.json, as written by `mtl pack`
    train_split: str = "train"
    val_split: str = "val"
    clip_len: int = 16  # T, frames per training clip
    batch_size: int = 4  # clips per rank per micro-step
    eval_batch_size: int = 8
    num_workers: int = 2
    image_size: int = 112
    shuffle_buffer: int = 64  # samples held for shuffling, per worker
    mean: tuple[float, float, float] | None = None  # None: the backbone's own (timm pretrained_cfg)
    std: tuple[float, float, float] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TemporalConfig:
    dim: int = 256
    heads: int = 8
    layers: int = 6
    ff_mult: int = 4
    dropout: float = 0.2
    max_len: int = 256


@dataclass
class MaskConfig:
    mode: Literal["token", "feature", "none"] = "token"  # token: whole frames; feature: elements (paper code)
    prob: float = 0.3


@dataclass
class ModelConfig:
    backbone: str = "vit_base_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    pretrained: bool = False  # from the timm hub, where one is reachable
    pretrained_file: str | None = None  # local timm or safetensors state dict; wins over `pretrained`
    # avg: mean of the patch tokens; cls: the class token; flatten: all patch tokens in order, concatenated, so the
    # frame feature keeps where on the aligned face each cue is (much faster to learn from scratch)
    pool: Literal["avg", "cls", "flatten"] = "avg"
    freeze_backbone: bool = False
    grad_checkpointing: bool = False
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)


@dataclass
class TasksConfig:
    plugins: list[str] = field(default_factory=list)  # modules imported first, to register more tasks (mtl.tasks)


def _task_weights() -> dict[str, float]:
    return {name: 1.0 for name in task_names()}


@dataclass
class LossConfig:
    weights: dict[str, float] = field(default_factory=_task_weights)  # task -> weight; 1.0 for a task not given
    focal_gamma: float = 2.0
    expr_alpha: Literal["auto", "none"] | list[float] = "auto"  # auto: from the manifest's class counts
    au_alpha: Literal["auto", "none"] | list[float] = "auto"  # auto: from the manifest's AU positive counts


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    backbone_lr_scale: float = 0.1  # backbone lr = lr * this
    layer_decay: float = 0.75  # per ViT block below the top, multiplies the backbone lr
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01  # cosine ends at lr * this


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 10_000  # optimizer steps
    grad_accum: int = 1
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    eval_every: int = 1000
    ckpt_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    resume: str = "auto"  # auto | never | a checkpoint directory
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    seed: int = 0
    progress: bool = True


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "mtl"
    run_name: str | None = None
    run_id: str | None = None  # continue this existing run (set by `mtl submit`, which creates it up front)
    parent_run_id: str | None = None  # create the run as a child of this one (sweeps)
    enabled: bool = True


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # None: one per GPU
    cpus_per_task: int = 8
    mem_gb: int | None = None
    partition: str | None = None
    time_min: int = 60
    signal_delay_s: int = 90
    folder: str = "runs/slurm/%j"
    max_requeue: int = 3


@dataclass
class Config:
    tasks: TasksConfig = field(default_factory=TasksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# ------------------------------------------------------------------------------------------------ ranges

_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.clip_len": (1, None),
    "data.batch_size": (1, None),
    "data.eval_batch_size": (1, None),
    "data.num_workers": (0, None),
    "data.image_size": (16, None),
    "data.shuffle_buffer": (1, None),
    "data.augment.brightness": (0, 1),
    "data.augment.contrast": (0, 1),
    "model.temporal.dim": (1, None),
    "model.temporal.heads": (1, None),
    "model.temporal.layers": (0, None),
    "model.temporal.ff_mult": (1, None),
    "model.temporal.dropout": (0, 1),
    "model.temporal.max_len": (1, None),
    "model.mask.prob": (0, 1),
    "loss.focal_gamma": (0, None),
    "optim.lr": (0, None),
    "optim.weight_decay": (0, None),
    "optim.backbone_lr_scale": (0, None),
    "optim.layer_decay": (0, 1),
    "optim.warmup_steps": (0, None),
    "optim.min_lr_ratio": (0, 1),
    "train.max_steps": (1, None),
    "train.grad_accum": (1, None),
    "train.grad_clip": (0, None),
    "train.zero_stage": (0, 3),
    "train.eval_every": (1, None),
    "train.ckpt_every": (1, None),
    "train.keep_last": (1, None),
    "train.log_every": (1, None),
    "train.max_bad_steps": (1, None),
    "slurm.nodes": (1, None),
    "slurm.gpus_per_node": (0, None),
    "slurm.tasks_per_node": (1, None),
    "slurm.cpus_per_task": (1, None),
    "slurm.time_min": (1, None),
    "slurm.signal_delay_s": (0, None),
    "slurm.max_requeue": (0, None),
}


def _check_tasks(cfg: Config) -> None:
    """Register the plugins' tasks, then check what names tasks: ``loss.weights`` and the class-weight lists."""
    try:
        load_plugins(cfg.tasks.plugins)
    except MtlError as exc:
        raise ConfigError(str(exc)) from None
    names = task_names()
    weights: dict[str, float] = {}
    for name, value in cfg.loss.weights.items():
        if name not in names:
            raise ConfigError(f"unknown task 'loss.weights.{name}' (registered tasks: {', '.join(names)})")
        weights[name] = _coerce(value, float, f"loss.weights.{name}")
        if weights[name] < 0:
            raise ConfigError(f"loss.weights.{name}: expected a value >= 0, got {weights[name]}")
    cfg.loss.weights = {name: weights.get(name, 1.0) for name in names}
    for task in tasks():
        attr = getattr(task, "alpha_key", None)
        if attr is None:
            continue
        if not hasattr(cfg.loss, attr):
            raise ConfigError(f"task {task.name}: its class weights key loss.{attr} is not a loss setting")
        val = getattr(cfg.loss, attr)
        if isinstance(val, list) and (len(val) != task.width or any(not 0 <= a for a in val)):
            raise ConfigError(
                f"loss.{attr}: expected 'auto', 'none' or a list of {task.width} non-negative numbers, got {val}"
            )


def _cross_checks(cfg: Config) -> None:
    _check_tasks(cfg)
    lo, hi = cfg.data.augment.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.augment.crop_scale: expected 0 < low <= high <= 1, got {[lo, hi]}")
    if cfg.model.temporal.dim % cfg.model.temporal.heads:
        raise ConfigError(
            f"model.temporal.dim ({cfg.model.temporal.dim}) must be divisible by model.temporal.heads "
            f"({cfg.model.temporal.heads})"
        )
    if cfg.data.clip_len > cfg.model.temporal.max_len:
        raise ConfigError(
            f"data.clip_len ({cfg.data.clip_len}) exceeds model.temporal.max_len ({cfg.model.temporal.max_len})"
        )


# ------------------------------------------------------------------------------------------------ typing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise naming ``key`` and what it expects."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else "top level"
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys in {section}: {', '.join(sorted(valid))})")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", names)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp, full = data[f.name], hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {tp.__name__} keys, got {value!r}")
            kwargs[f.name] = _build(tp, value, f"{full}.")
        else:
            kwargs[f.name] = _coerce(value, tp, full)
            bounds = _RANGES.get(full)
            if bounds and kwargs[f.name] is not None:
                lo, hi = bounds
                v = kwargs[f.name]
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                    raise ConfigError(f"{full}: expected a value {want}, got {v}")
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------ merging


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict; values are read as YAML scalars or flow lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is set as a value and a section")
        node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The only way a Config is made from the outside world."""
    merged: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        merged = read_yaml(path)
        source = str(path)
    merged = deep_merge(merged, parse_overrides(overrides or []))
    try:
        return from_dict(merged)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a (possibly partial) nested dict against the defaults."""
    cfg = _build(Config, data, "")
    _cross_checks(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that round-trips through YAML and ``from_dict``."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.zero_stage": 2, ...}``, for MLflow params and for diffs between runs."""
    out: dict[str, Any] = {}
    for k, v in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
