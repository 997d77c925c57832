"""MLflow runs as a launcher handles them before and around a job: found or made, tagged, deleted again; and
outputs made after the run ended attached to it.

`mtl submit` makes the run on the login node so that its id can be printed next to the job id and passed to the
job (``tracking.run_id``). A run whose job never ran is ended here (FAILED when sbatch refused the job, KILLED
when it was cancelled before it started), with the reason as a tag, so no run stays RUNNING for ever.
`mtl eval` attaches its predictions and submission files to the run that trained the weights (``attach``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mtl.config import TrackingConfig
from mtl.errors import MtlError
from mtl.tracking.mlflow_run import create_run, resolve_uri
from mtl.tracking.store import check_store


def client(uri: str) -> MlflowClient:
    return MlflowClient(uri)


def open_run(
    t: TrackingConfig, name: str | None, tags: dict[str, str], output_dir_run: str | None = None
) -> tuple[str | None, bool]:
    """(run id, made here?) for a job: tracking.run_id, else ``output_dir_run`` (the run its output directory
    already belongs to), else a new run. ``t.uri`` must be resolved (absolute)."""
    if not t.enabled:
        return None, False
    run_id = t.run_id or output_dir_run
    check_store(t.uri, create=not run_id)
    if run_id:
        try:
            client(t.uri).get_run(run_id)
        except Exception as exc:
            raise MtlError(f"MLflow run {run_id} not found in {t.uri}: {str(exc).splitlines()[0]}") from None
        return run_id, False
    return create_run(t, run_name=name, parent_run_id=t.parent_run_id, tags=tags), True


def end_runs(uri: str, run_ids: Sequence[str | None], status: str, reason: str) -> None:
    """End the runs that are still RUNNING (a job that ran ends its own), tagging ``mtl.end_reason``. Best effort:
    the error that ended them is what the user needs to see, not one from here."""
    c = client(uri)
    for run_id in run_ids:
        if not run_id:
            continue
        try:
            if c.get_run(run_id).info.status == "RUNNING":
                c.set_tag(run_id, "mtl.end_reason", reason[:5000])
                c.set_terminated(run_id, status)
        except Exception:
            pass


def tag_run(uri: str, run_id: str | None, tags: dict[str, str]) -> None:
    if run_id:
        c = client(uri)
        for k, v in tags.items():
            c.set_tag(run_id, k, v)


def check_attach(t: TrackingConfig) -> None:
    """What ``attach`` will need, asked before the outputs are made: a store that is there must be usable (one
    that is not is no error: nothing is logged)."""
    if t.enabled and t.run_id:
        check_store(resolve_uri(t), create=False)


def attach(
    t: TrackingConfig, paths: Sequence[Path], artifact_path: str, metrics: dict[str, float] | None = None
) -> str:
    """Log files and folders to the existing run ``t.run_id`` under ``artifact_path`` (and ``metrics``), leaving its
    status as it is (a FINISHED run stays FINISHED). Never makes a store or a run: where there is no reachable run,
    nothing is logged. Returns what happened, for the user."""
    if not t.enabled or not t.run_id:
        why = "tracking.enabled=false" if not t.enabled else "no MLflow run is recorded with these weights"
        return f"{why}: nothing logged to MLflow"
    uri = resolve_uri(t)
    nothing = f"nothing logged to MLflow (set tracking.uri=... to the store of run {t.run_id})"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return f"MLflow store {uri} not found: {nothing}"
    c = client(uri)
    try:
        run = c.get_run(t.run_id)
    except Exception as exc:
        return f"MLflow run {t.run_id} not found in {uri} ({str(exc).splitlines()[0]}): {nothing}"
    if run.info.lifecycle_stage == "deleted":
        return f"MLflow run {t.run_id} in {uri} is deleted: nothing logged to MLflow"
    for path in paths:
        if path.is_dir():
            c.log_artifacts(t.run_id, str(path), f"{artifact_path}/{path.name}")
        else:
            c.log_artifact(t.run_id, str(path), artifact_path)
    if metrics:
        stamp = int(time.time() * 1000)
        c.log_batch(t.run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()])
    return f"logged to MLflow run {t.run_id} ({uri}) under {artifact_path}/"
