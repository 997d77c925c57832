"""MLflow logging from global rank 0, batched, through MLflow's own client.

The run is made once, by `mtl submit` on the login node (mtl.tracking.runs) or else by the first `train`
(``create_run``), and then identified by its id everywhere: a resumed or requeued job passes the same id back in,
so one training run is always one MLflow run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mtl.config import TrackingConfig
from mtl.tracking.store import check_store

DEFAULT_URI = "sqlite:///mlflow.db"
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_CHARS = 6000
# MLflow 3's UI opens an experiment by this tag; mlflow has no Python constant for it (only its UI does).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def resolve_uri(cfg: TrackingConfig) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else ./mlflow.db, with sqlite paths made absolute.

    Absolute, so that jobs started in another directory (SLURM, requeues) write to the same store.
    """
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a sqlite store (not in whatever directory the job happens to run in)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment ``name``, made if needed, tagged as model training (MLflow 3's UI then opens its runs table,
    not a GenAI overview); one made before without the tag (by an older mtl, or by hand) gets it."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=_artifact_root(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except Exception:  # another rank or job created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def create_run(
    cfg: TrackingConfig, run_name: str | None = None, parent_run_id: str | None = None, tags: dict | None = None
) -> str:
    """Make a run without starting to log into it (used by `mtl submit` on the login node, and by train)."""
    uri = resolve_uri(cfg)
    client = MlflowClient(uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, cfg.experiment, uri), run_name=run_name, tags=all_tags)
    return run.info.run_id


class Tracker:
    """Buffered logging into one run; every method is a no-op when ``active`` is False (ranks > 0)."""

    def __init__(self, cfg: TrackingConfig, run_id: str | None, active: bool, run_name: str | None = None):
        self.active = active and cfg.enabled
        self.uri = resolve_uri(cfg)
        self.run_id = run_id
        self._metrics: list[Metric] = []
        self._logged_to: dict[str, int] = {}  # key -> last step already in the run (a resumed run skips those)
        if not self.active:
            return
        check_store(self.uri)  # one line naming a broken store, not SQLAlchemy's traceback
        self.client = MlflowClient(self.uri)
        if self.run_id is None:
            self.run_id = create_run(cfg, run_name or cfg.run_name, cfg.parent_run_id)
        else:
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self._logged_to = self._last_steps()

    def _last_steps(self) -> dict[str, int]:
        """Steps a killed attempt logged after its last checkpoint come again after the resume: log them once."""
        # a run's latest value of a key is the one at its highest step, so one get_run tells every key's last step
        return {m.key: m.step for m in self.client.get_run(self.run_id).data.to_proto().metrics}

    @property
    def resumed(self) -> bool:
        """True when the run already holds params (a requeued or resumed job)."""
        return bool(self.active and self.client.get_run(self.run_id).data.params)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = False) -> None:
        if not self.active:
            return
        now = int(time.time() * 1000)
        self._metrics.extend(
            Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._logged_to.get(k, -1)
        )
        if flush or len(self._metrics) >= 200:
            self.flush()

    def flush(self) -> None:
        if not self.active:
            return
        while self._metrics:
            batch, self._metrics = self._metrics[:_MAX_METRICS_PER_BATCH], self._metrics[_MAX_METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.active:
            self.client.log_figure(self.run_id, figure, artifact_file)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """An image at a step: the UI shows a key's images over steps (a slider), not as loose files."""
        if self.active:
            self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def log_datasets(self, datasets: Sequence[tuple[Dataset, str]]) -> None:
        """(dataset, context) pairs as the run's inputs; context: training, validation or testing."""
        if self.active and datasets:
            inputs = [
                DatasetInput(DatasetEntity(**ds.to_dict()), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                for ds, context in datasets
            ]
            self.client.log_inputs(self.run_id, datasets=inputs)

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED, or KILLED (preempted: the requeued job sets it RUNNING again)."""
        if self.active:
            self.flush()
            self.client.set_terminated(self.run_id, status=status)
