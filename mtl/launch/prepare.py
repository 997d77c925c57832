"""Everything `mtl submit` checks and resolves on the login node, before anything is queued.

A job that would fail on its first line should fail here instead, in seconds, naming the key or the file: the
config (keys, types, ranges), the SLURM request (sbatch present, partition known, time limit longer than the
preemption warning), and the inputs the job will open (shards manifest, pretrained file, resume directory).
Relative paths are made absolute against the submit directory, so requeued jobs and array elements that start
elsewhere read and write the same places.
"""

from __future__ import annotations

from pathlib import Path

from mtl.config import Config, ConfigError, load_config, replace
from mtl.engine.layout import RUN_ID_FILE, RunDir, resume_point  # noqa: F401 (RUN_ID_FILE: sweep.py's message)
from mtl.errors import MtlError
from mtl.launch import cluster

# `mtl submit` flag -> the slurm.* key it sets (flags win over the config file and key=value overrides).
FLAG_KEYS = {
    "nodes": "slurm.nodes",
    "gpus_per_node": "slurm.gpus_per_node",
    "tasks_per_node": "slurm.tasks_per_node",
    "cpus_per_task": "slurm.cpus_per_task",
    "mem_gb": "slurm.mem_gb",
    "partition": "slurm.partition",
    "time": "slurm.time_min",
    "folder": "slurm.folder",
}


def flag_overrides(flags: dict[str, object]) -> list[str]:
    """``{"nodes": 2, "partition": None}`` -> ``["slurm.nodes=2"]`` (unset flags leave the config alone)."""
    return [f"{FLAG_KEYS[k]}={v}" for k, v in flags.items() if k in FLAG_KEYS and v is not None]


def tasks_per_node(cfg: Config) -> int:
    """One task per GPU; on CPU partitions slurm.tasks_per_node, else 1."""
    s = cfg.slurm
    if s.tasks_per_node is not None:
        return s.tasks_per_node
    return max(1, s.gpus_per_node)


def _abs(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def absolutize(cfg: Config, base: Path | None = None) -> Config:
    """Paths and the MLflow store made absolute against ``base`` (the submit directory)."""
    from mtl.tracking.mlflow_run import resolve_uri

    base = (base or Path.cwd()).resolve()
    resume = cfg.train.resume
    if resume not in ("auto", "never"):
        resume = _abs(resume, base)
    return replace(
        cfg,
        data=replace(cfg.data, shards=_abs(cfg.data.shards, base)),
        model=replace(cfg.model, pretrained_file=_abs(cfg.model.pretrained_file, base)),
        train=replace(cfg.train, output_dir=_abs(cfg.train.output_dir, base), resume=resume),
        tracking=replace(cfg.tracking, uri=resolve_uri(cfg.tracking)),
        slurm=replace(cfg.slurm, folder=_abs(cfg.slurm.folder, base)),
    )


def check_inputs(cfg: Config) -> None:
    """The files the job opens first exist, and the backbone is one timm knows (a typo fails here, not in 3 h)."""
    manifest = Path(cfg.data.shards) / "manifest.json"
    if not manifest.is_file():
        raise MtlError(f"data.shards={cfg.data.shards}: no manifest.json there (pack the data with `mtl pack`)")
    if cfg.model.pretrained_file and not Path(cfg.model.pretrained_file).is_file():
        raise MtlError(f"model.pretrained_file={cfg.model.pretrained_file}: file not found")
    resume_point(cfg.train.resume, RunDir(Path(cfg.train.output_dir)))  # what the job would resume from
    import timm

    if not timm.is_model(cfg.model.backbone):
        close = timm.list_models(f"*{cfg.model.backbone.split('_')[0]}*")[:5]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise ConfigError(f"model.backbone={cfg.model.backbone!r} is not a timm model{hint}")


def check_request(cfg: Config) -> str:
    """The SLURM side: tools present, partition known, sensible limits. Returns the partition used."""
    s = cfg.slurm
    if s.time_min * 60 <= s.signal_delay_s:
        raise ConfigError(
            f"slurm.time_min={s.time_min} min is not longer than slurm.signal_delay_s={s.signal_delay_s} s: "
            "the job would be told to checkpoint before it starts"
        )
    if s.gpus_per_node == 0 and s.tasks_per_node is None and s.nodes > 1:
        raise ConfigError("slurm.gpus_per_node=0 on several nodes: set slurm.tasks_per_node (--tasks-per-node)")
    cluster.require_sbatch()
    return cluster.check_partition(s.partition)


def load_for_submit(config: str | Path | None, overrides: list[str], flags: dict[str, object]) -> Config:
    """Validated config with the flags applied and paths absolute; raises before anything touches SLURM."""
    cfg = load_config(config, [*overrides, *flag_overrides(flags)])
    return absolutize(cfg)


def existing_run_id(cfg: Config) -> str | None:
    """The MLflow run a resubmitted output_dir already belongs to (the engine continues it on resume)."""
    return RunDir(Path(cfg.train.output_dir)).recorded_run_id(cfg.train.resume)
