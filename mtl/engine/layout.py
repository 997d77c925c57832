"""Names inside a run's ``train.output_dir``, shared with the launch layer (no torch import, for login nodes)."""

from __future__ import annotations

RUN_ID_FILE = "mlflow_run_id"  # the run's MLflow run id, written before the first checkpoint exists
CHECKPOINTS = "checkpoints"
EXPORT = "export"
