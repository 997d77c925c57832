"""Is the MLflow store usable? Asked before a command does any work, so that a store holding garbage or sitting in
a read-only folder is one line naming it, not an SQLAlchemy traceback after training started or after `mtl eval`
wrote its outputs."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

from mtl.errors import MtlError

SQLITE = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (None for a server or a file store)."""
    return Path(uri[len(SQLITE) :]) if uri.startswith(SQLITE) else None


def check_store(uri: str, create: bool = True) -> None:
    """Raise an MtlError naming ``uri`` unless MLflow can read and write it. ``create``: a store not there yet is
    to be made (as `mtl train` would): its folder must be writable; else it may be absent (`mtl eval` then logs
    nothing). Either way a store not there yet is not made here: the check writes nothing (a start refused later,
    for a run folder in use, leaves no store behind)."""
    path = sqlite_file(uri)
    if path is not None:
        if not path.exists():
            if create:
                _check_sqlite(uri, path)
            return
        _check_sqlite(uri, path)
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # any store: a server down, a schema MLflow cannot migrate, ...
        raise MtlError(f"MLflow store {uri} cannot be opened: {_first_line(exc)}") from None


def _check_sqlite(uri: str, path: Path) -> None:
    """SQLite writes a journal beside the database, and MLflow the runs' artifacts beside it (``mlartifacts``):
    the folder must be writable too, not only the file."""
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if folder is None or not folder.is_dir():
        raise MtlError(f"MLflow store {uri}: {path.parent} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MtlError(f"MLflow store {uri}: {folder} is not writable (SQLite and MLflow write beside the store)")
    if not path.exists():
        return
    if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
        raise MtlError(f"MLflow store {uri}: {path} is not a readable and writable file")
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise MtlError(f"MLflow store {uri}: {path} is not an SQLite database ({exc})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
