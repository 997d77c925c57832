"""Where a person looks at runs: the `mlflow ui` command for a store and the UI's addresses of one run or of
several runs compared, which `mtl demo` and `mtl cv` print so that a click leads straight to them.

A store served by a tracking server (``http://...``) is its own UI; any other store is opened with `mlflow ui`,
bound to localhost."""

from __future__ import annotations

import json
from urllib.parse import quote

LOCAL_UI = "http://127.0.0.1:5000"


def _served(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_base(uri: str) -> str:
    return uri.rstrip("/") if _served(uri) else LOCAL_UI


def ui_command(uri: str) -> str | None:
    """The command that serves the UI of ``uri`` on localhost (None for a tracking server: it serves one)."""
    return None if _served(uri) else f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def run_address(uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page; a parent run's lists its children."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_address(uri: str, experiment_id: str) -> str:
    """An experiment's runs table."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}"


def compare_address(uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """Several runs side by side (MLflow's compare page: their parameters, metrics and plots)."""
    runs, exps = quote(json.dumps(run_ids, separators=(",", ":"))), quote(json.dumps([experiment_id]))
    return f"{ui_base(uri)}/#/compare-runs?runs={runs}&experiments={exps}"


def ui_lines(uri: str, pages: list[tuple[str, str]]) -> list[str]:
    """``MLflow: <command>`` (when one is needed) then one ``  <what>: <address>`` line per page."""
    command = ui_command(uri)
    head = [f"MLflow: {command}" if command else f"MLflow: {uri}"]
    return head + [f"  {what}: {address}" for what, address in pages]
