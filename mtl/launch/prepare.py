"""What a launcher checks and resolves before it queues a job, whatever the scheduler.

A job that would fail on its first line should fail here instead, in seconds, naming the key or the file: the
inputs the job will open (shards manifest, pretrained file, resume directory) and the backbone. Relative paths
are made absolute against the submit directory, so requeued jobs and array elements that start elsewhere read and
write the same places. The SLURM side of a request is checked in mtl.launch.slurm_request.
"""

from __future__ import annotations

from pathlib import Path

from mtl.config import Config, replace
from mtl.errors import ConfigError, MtlError
from mtl.runs.layout import RunDir, resume_point
from mtl.runs.resume_changes import check as check_resume


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
    if resume not in ("auto", "never", "force"):
        resume = _abs(resume, base)
    return replace(
        cfg,
        data=replace(
            cfg.data,
            shards=_abs(cfg.data.shards, base),
            features=[_abs(f, base) for f in cfg.data.features],
            folds=replace(cfg.data.folds, file=_abs(cfg.data.folds.file, base)),
        ),
        model=replace(cfg.model, pretrained_file=_abs(cfg.model.pretrained_file, base)),
        train=replace(cfg.train, output_dir=_abs(cfg.train.output_dir, base), resume=resume),
        tracking=replace(cfg.tracking, uri=resolve_uri(cfg.tracking)),
        slurm=replace(cfg.slurm, folder=_abs(cfg.slurm.folder, base)),
    )


def check_inputs(cfg: Config) -> None:
    """The files the job opens first exist (cached features: made from data.shards), and the backbone is one timm
    knows (a typo fails here, not in 3 h)."""
    manifest = Path(cfg.data.shards) / "manifest.json"
    if not manifest.is_file():
        raise MtlError(f"data.shards={cfg.data.shards}: no manifest.json there (pack the data with `mtl pack`)")
    if cfg.data.features:  # manifests only: made from data.shards (the shards are checked when the job reads them)
        from mtl.features.loader import check_sources

        check_sources(cfg.data.features, cfg.data.shards)
    if cfg.model.pretrained_file and not Path(cfg.model.pretrained_file).is_file():
        raise MtlError(f"model.pretrained_file={cfg.model.pretrained_file}: file not found")
    found = resume_point(cfg.train.resume, RunDir(Path(cfg.train.output_dir)))  # what the job would resume from
    if found is not None and found.state().get("config"):  # a resume that would be refused: refused here, not queued
        check_resume(found.state()["config"], cfg, found.dir, found.tag)
    import timm

    if not timm.is_model(cfg.model.backbone):
        close = timm.list_models(f"*{cfg.model.backbone.split('_')[0]}*")[:5]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise ConfigError(f"model.backbone={cfg.model.backbone!r} is not a timm model{hint}")


def existing_run_id(cfg: Config) -> str | None:
    """The MLflow run a resubmitted output_dir already belongs to (the engine continues it on resume)."""
    return RunDir(Path(cfg.train.output_dir)).recorded_run_id(cfg.train.resume)
