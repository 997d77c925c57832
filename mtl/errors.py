"""Errors a user can act on: the CLI prints them as one line and exits non-zero, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MtlError(Exception):
    """Base of every error caused by input, config or environment rather than by a bug."""


class ConfigError(MtlError, ValueError):
    """A config key is unknown, mistyped or out of range; the message names it (and its source)."""


class DataError(MtlError):
    """Bad input data; the message names the file and, where there is one, the line."""


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Give an OSError raised inside the ``path`` it concerns when it names none: a write to a full disk fails
    with ENOSPC and no file name, which the CLI could then not report as ``<path>: No space left on device``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None  # the errno's subclass
        raise


def os_error_line(exc: OSError) -> str:
    """``path: strerror`` (``src -> dst: strerror`` for a rename), as the CLI prints an OSError."""
    if exc.filename is None:
        return str(exc)
    where = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc}"
