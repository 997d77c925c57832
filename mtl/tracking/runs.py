"""MLflow runs as a launcher handles them before and around a job: found or made, tagged, deleted again.

`mtl submit` makes the run on the login node so that its id can be printed next to the job id and passed to the
job (``tracking.run_id``). A run whose job never ran is ended here (FAILED when sbatch refused the job, KILLED
when it was cancelled before it started), with the reason as a tag, so no run stays RUNNING for ever.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlflow.tracking import MlflowClient

from mtl.config import TrackingConfig
from mtl.errors import MtlError
from mtl.tracking.mlflow_run import create_run


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
