"""One config object for every command: defaults <- YAML file <- ``key.sub=value`` overrides.

Merging and validation happen here and only here, so a misspelled key or an out-of-range value fails on the
login node, naming the key, before anything is packed, trained or queued.
"""

from __future__ import annotations

import contextlib
import difflib
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from mtl.errors import ConfigError, MtlError
from mtl.fields import Bool, Float, Int, Str
from mtl.naming import run_name
from mtl.tasks import LossOptions, Task, get_task, load_plugins, task_names, tasks


class _Section(BaseModel):
    """A config section: attribute access, unknown keys refused; ``replace`` makes changed copies."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------- sections


class AugmentConfig(_Section):
    """Clip-level augmentation: one random draw per clip, applied to all of its frames."""

    hflip: Bool = True
    crop_scale: tuple[Float, Float] = (0.8, 1.0)
    brightness: Float = Field(0.2, ge=0, le=1)
    contrast: Float = Field(0.2, ge=0, le=1)


class FeatureAugmentConfig(_Section):
    """Training on cached features only (evaluation reads them as stored)."""

    dropout: Float = Field(0.0, ge=0, le=1)  # each feature element zeroed with this probability (rest rescaled)
    jitter: Int = Field(0, ge=0)  # each frame reads the feature of a frame up to this far away (labels stay)


class DataConfig(_Section):
    shards: Str = "shards/synth"  # a directory holding manifest.json, as written by `mtl pack`
    # directories written by `mtl features` from data.shards: when set, the trunk and heads train on these cached
    # frame features (concatenated per frame, in this order) instead of on pixels; no backbone is built
    features: list[Str] = Field(default_factory=list)
    feature_augment: FeatureAugmentConfig = Field(default_factory=FeatureAugmentConfig)
    train_split: Str = "train"
    val_split: Str = "val"
    clip_len: Int = Field(16, ge=1)  # T, frames per training clip
    batch_size: Int = Field(4, ge=1)  # clips per rank per micro-step
    eval_batch_size: Int = Field(8, ge=1)
    num_workers: Int = Field(2, ge=0)
    image_size: Int = Field(112, ge=16)
    shuffle_buffer: Int = Field(64, ge=1)  # samples held for shuffling, per worker
    mean: tuple[Float, Float, Float] | None = None  # None: the backbone's own (timm pretrained_cfg)
    std: tuple[Float, Float, Float] | None = None
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class TemporalConfig(_Section):
    dim: Int = Field(256, ge=1)
    heads: Int = Field(8, ge=1)
    layers: Int = Field(6, ge=0)
    ff_mult: Int = Field(4, ge=1)
    dropout: Float = Field(0.2, ge=0, le=1)
    max_len: Int = Field(256, ge=1)


class MaskConfig(_Section):
    mode: Literal["token", "feature", "none"] = "token"  # token: whole frames; feature: elements (paper code)
    prob: Float = Field(0.3, ge=0, le=1)


class ModelConfig(_Section):
    backbone: Str = "vit_base_patch16_224"
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to timm.create_model
    pretrained: Bool = False  # from the timm hub, where one is reachable
    pretrained_file: Str | None = None  # local timm or safetensors state dict; wins over `pretrained`
    # avg: mean of the patch tokens; cls: the class token; flatten: all patch tokens in order, concatenated, so the
    # frame feature keeps where on the aligned face each cue is (much faster to learn from scratch)
    pool: Literal["avg", "cls", "flatten"] = "avg"
    freeze_backbone: Bool = False
    grad_checkpointing: Bool = False
    temporal: TemporalConfig = Field(default_factory=TemporalConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)


class TasksConfig(_Section):
    plugins: list[Str] = Field(default_factory=list)  # modules imported first, to register more tasks (mtl.tasks)


def _task_options() -> dict[str, LossOptions]:
    return {t.name: t.loss_options() for t in tasks()}


class LossConfig(_Section):
    """Task weights, and each task's own loss options: no field here belongs to one task."""

    # task -> weight of its term in the total loss; tasks not named keep 1.0
    weights: dict[str, Float] = Field(default_factory=lambda: dict.fromkeys(task_names(), 1.0))
    # task -> its loss options, checked against the model its kind names (mtl.tasks.options), e.g.
    # loss.tasks.expr.alpha=none, loss.tasks.au.gamma=1; keys and tasks not named keep the task's defaults
    tasks: dict[str, SerializeAsAny[LossOptions]] = Field(default_factory=_task_options)

    @field_validator("weights")
    @classmethod
    def _known_tasks(cls, weights: dict[str, float]) -> dict[str, float]:
        for name, w in weights.items():
            if name not in task_names():
                raise _unknown_key(f"loss.weights.{name}", list(task_names()))
            if w < 0:
                raise ConfigError(f"loss.weights.{name}: expected a value >= 0, got {w}")
        return {**dict.fromkeys(task_names(), 1.0), **weights}

    @field_validator("tasks", mode="before")
    @classmethod
    def _per_task(cls, given: Any) -> Any:
        if not isinstance(given, dict):
            return given  # pydantic says what it expected
        out = _task_options()
        for name, raw in given.items():
            if name not in out:
                raise _unknown_key(f"loss.tasks.{name}", list(out))
            task = get_task(name)
            try:
                out[name] = task.loss_options(raw.model_dump() if isinstance(raw, BaseModel) else raw)
            except ValidationError as exc:
                raise _config_error(exc, task.options_model, task.options_key) from None
        return out

    def options(self, task: Task) -> LossOptions:
        """The task's validated options; its defaults where it was registered after this config was made."""
        return self.tasks[task.name] if task.name in self.tasks else task.loss_options()


class OptimConfig(_Section):
    lr: Float = Field(1e-4, ge=0)
    weight_decay: Float = Field(1e-3, ge=0)
    betas: tuple[Float, Float] = (0.9, 0.999)
    eps: Float = 1e-8
    backbone_lr_scale: Float = Field(0.1, ge=0)  # backbone lr = lr * this
    layer_decay: Float = Field(0.75, ge=0, le=1)  # per ViT block below the top, multiplies the backbone lr
    warmup_steps: Int = Field(100, ge=0)
    min_lr_ratio: Float = Field(0.01, ge=0, le=1)  # cosine ends at lr * this
    fused: Bool = False  # torch's fused AdamW kernel (one launch per step on a GPU; tools/gpu_check.py --fused-adamw)


class ZeroConfig(_Section):
    """How DeepSpeed's ZeRO overlaps its communication with backward (``train.zero``); sizes in elements, None:
    scaled to the model (see `mtl.engine.ds_config.bucket_elements`)."""

    overlap_comm: Bool = True  # reduce gradients on a side stream while backward runs
    contiguous_gradients: Bool = True  # copy gradients into one buffer as they are made (less fragmentation)
    reduce_bucket_size: Int | None = Field(None, ge=1)
    allgather_bucket_size: Int | None = Field(None, ge=1)  # ZeRO-1/2: the all-gather of updated parameters
    prefetch_bucket_size: Int | None = Field(None, ge=1)  # ZeRO-3: parameters gathered ahead of their use


class TrainConfig(_Section):
    output_dir: Str = "runs/default"
    max_steps: Int = Field(10_000, ge=1)  # optimizer steps
    grad_accum: Int = Field(1, ge=1)
    grad_clip: Float = Field(1.0, ge=0)
    zero_stage: Int = Field(2, ge=0, le=3)
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    dist_timeout_min: Float = Field(30.0, gt=0)  # a collective waiting longer than this fails the run
    # auto: CUDA when torch sees a GPU (an error, not the CPU, where SLURM gave the job GPUs that CUDA cannot use);
    # cuda: a GPU or stop at once saying why; cpu: the CPU (and gloo) even where GPUs are visible (mtl.device)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    eval_every: Int = Field(1000, ge=1)
    ckpt_every: Int = Field(500, ge=1)
    keep_last: Int = Field(2, ge=1)
    # resume checks a checkpoint's files' sizes; true: also every byte against the sha256 its writers recorded
    verify_checkpoint: Bool = False
    log_every: Int = Field(10, ge=1)  # also when a stop signal (preemption) and non-finite losses are checked
    # auto | never | force | a checkpoint directory. A resume takes changed settings (mtl.runs.resume_changes)
    # but refuses changes that make another experiment (model, data, loss, optim...) unless `force`
    resume: Str = "auto"
    max_bad_steps: Int = Field(20, ge=1)  # consecutive non-finite losses before the run stops
    seed: Int = 0
    progress: Bool = True


class TrackingConfig(_Section):
    uri: Str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: Str = "mtl"
    run_name: Str | None = None  # None: `load_config` names the run after the config file and its overrides
    run_id: Str | None = None  # continue this existing run (set by `mtl submit`, which creates it up front)
    parent_run_id: Str | None = None  # create the run as a child of this one (sweeps)
    enabled: Bool = True


class SlurmConfig(_Section):
    nodes: Int = Field(1, ge=1)
    gpus_per_node: Int = Field(0, ge=0)
    tasks_per_node: Int | None = Field(None, ge=1)  # None: one per GPU
    cpus_per_task: Int = Field(8, ge=1)
    mem_gb: Int | None = None
    partition: Str | None = None
    time_min: Int = Field(60, ge=1)
    signal_delay_s: Int = Field(90, ge=0)
    folder: Str = "runs/slurm/%j"
    max_requeue: Int = Field(3, ge=0)
    # `mtl submit` also queues a 1-CPU job (afterany on the training jobs, mtl.launch.watch) that ends the MLflow
    # runs its jobs left RUNNING: cancelled before they started, or killed outright
    watch_runs: Bool = True


class Config(_Section):
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


def replace(section: BaseModel, **changes: Any) -> Any:
    """``dataclasses.replace`` for sections: a validated copy with ``changes`` applied."""
    return type(section).model_validate({**dict(section), **changes})


def _cross_checks(cfg: Config) -> None:
    lo, hi = cfg.data.augment.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.augment.crop_scale: expected 0 < low <= high <= 1, got {[lo, hi]}")
    if cfg.data.feature_augment.dropout >= 1:
        raise ConfigError(f"data.feature_augment.dropout: expected a value < 1, got {cfg.data.feature_augment.dropout}")
    if cfg.model.temporal.dim % cfg.model.temporal.heads:
        raise ConfigError(
            f"model.temporal.dim ({cfg.model.temporal.dim}) must be divisible by model.temporal.heads "
            f"({cfg.model.temporal.heads})"
        )
    if cfg.data.clip_len > cfg.model.temporal.max_len:
        raise ConfigError(
            f"data.clip_len ({cfg.data.clip_len}) exceeds model.temporal.max_len ({cfg.model.temporal.max_len})"
        )


# ------------------------------------------------------------------------------ pydantic errors, in our words


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "Any" if tp is Any else getattr(tp, "__name__", str(tp))


def _moved_to(key: str) -> list[str]:
    """Where the value of a key of an older release lives now ([] for any other key). A user's config that still
    has one is refused with this hint; a saved run's config is read with it moved (``from_dict``)."""
    if key == "loss.focal_gamma":  # it was the gamma of every focal loss
        return [f"{t.options_key}.gamma" for t in tasks() if "gamma" in t.options_model.model_fields]
    return {"loss.expr_alpha": ["loss.tasks.expr.alpha"], "loss.au_alpha": ["loss.tasks.au.alpha"]}.get(key, [])


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    moved = _moved_to(key)
    if moved:
        return ConfigError(f"config key '{key}' is now {', '.join(moved)} (each task owns its loss options)")
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else "top level"
    keys = f"valid keys in {section}: {', '.join(sorted(valid))}" if valid else f"{section} takes no keys"
    return ConfigError(f"unknown config key '{key}'{hint} ({keys})")


def _config_error(exc: ValidationError, root: type[BaseModel] = Config, prefix: str = "") -> ConfigError:
    """pydantic's first error as one line: the dotted key (under ``prefix``, for a model below the Config, such as
    a task's loss options), what it expects, what it got."""
    err = exc.errors()[0]
    tp: Any = root
    key, metadata = prefix, []
    for item in err["loc"]:  # follow fields, dict keys and list/tuple indices; a union's branch tag ends the walk
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            key = f"{key}.{item}".lstrip(".")
            if item not in tp.model_fields:
                return _unknown_key(key, list(tp.model_fields))
            tp, metadata = tp.model_fields[item].annotation, tp.model_fields[item].metadata
        elif origin is dict:
            key, tp = f"{key}.{item}", args[1]
        elif origin in (list, tuple) and isinstance(item, int) and err["type"] != "missing":  # not: a short tuple
            key, tp = f"{key}[{item}]", args[item if origin is tuple else 0]
        else:
            break
    got = err["input"]
    if err["type"] == "value_error" and isinstance(err["ctx"]["error"], ConfigError):
        return err["ctx"]["error"]
    if err["type"] == "value_error":  # a validator's own words
        return ConfigError(f"{key}: {err['ctx']['error']}")
    if err["type"] in ("greater_than_equal", "less_than_equal"):
        lo = next(m.ge for m in metadata if isinstance(m, annotated_types.Ge))
        hi = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
        return ConfigError(f"{key}: expected a value {f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'}, got {got}")
    if err["type"] == "model_type":
        return ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {got!r}")
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {got!r} ({type(got).__name__})")


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


def load_task_plugins(data: dict[str, Any]) -> None:
    """Import the modules named by ``tasks.plugins`` in a raw config, so that their tasks are registered before
    ``loss.*`` is checked against the registered tasks. A step of its own: validating imports nothing."""
    section = data.get("tasks")
    plugins = section.get("plugins") if isinstance(section, dict) else None
    if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
        try:
            load_plugins(plugins)
        except MtlError as exc:
            raise ConfigError(str(exc)) from None


def _validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None


@contextlib.contextmanager
def _source(name: str) -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The only way a Config is made from the outside world; an error names its source: the file or the command line.

    An unset tracking.run_name becomes the file's stem and the overrides (``smoke train.max_steps=4``)."""
    data: dict[str, Any] = {}
    file_cfg = None
    if path is not None:
        data = read_yaml(path)
        with _source(str(path)):
            load_task_plugins(data)
            file_cfg = _validate(data)  # the file's keys alone: an error here is the file's
    with _source("command line"):  # the file's keys are valid, so a key that fails now was set on the command line
        cli = parse_overrides(overrides or [])
        load_task_plugins(deep_merge(data, cli))
        cfg = _validate(deep_merge(data, cli))
    source = "command line"
    if file_cfg is not None:  # values that are valid one by one but not together: from the file unless it passes alone
        try:
            _cross_checks(file_cfg)
        except ConfigError:
            source = f"{path} with the command-line overrides" if cli else str(path)
    with _source(source):
        _cross_checks(cfg)
    if cfg.tracking.run_name is None:  # named after where it came from (mtl.naming), not by MLflow at random
        cfg = replace(cfg, tracking=replace(cfg.tracking, run_name=run_name(path, overrides or [])))
    return cfg


def _move_old_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the keys of an older release where they live now (a key set at its new place wins)."""
    loss = data.get("loss")
    if not isinstance(loss, dict):
        return data
    old = {k: loss[k] for k in loss if _moved_to(f"loss.{k}")}
    moved: dict[str, dict[str, Any]] = {}
    for k, value in old.items():
        for new in _moved_to(f"loss.{k}"):
            _, _, task, option = new.split(".")  # loss.tasks.<task>.<option>
            moved.setdefault(task, {})[option] = value
    kept = {k: v for k, v in loss.items() if k not in old}
    return {**data, "loss": deep_merge({"tasks": moved}, kept)}


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a (possibly partial) nested dict against the defaults: a saved run's config (an export's, a
    checkpoint's, from an older release too: its moved keys are read at their new place), a submitted job's."""
    load_task_plugins(data)
    cfg = _validate(_move_old_keys(data))
    _cross_checks(cfg)
    return cfg


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that round-trips through YAML and ``from_dict``."""
    return cfg.model_dump(mode="json")


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.zero_stage": 2, ...}``, for MLflow params and for diffs between runs."""
    out: dict[str, Any] = {}
    for k, v in (to_dict(cfg) if isinstance(cfg, BaseModel) else cfg).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
