"""Errors a user can act on: the CLI prints them as one line and exits non-zero, no traceback."""

from __future__ import annotations

import errno
import os
import re
import shutil
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


# How libraries report a failed write without raising an OSError: torch's zip writer (no errno at all) and
# safetensors (the errno inside its own exception's text).
_TORCH_WRITE_FAILED = ("inline_container.cc", "file write failed", "PytorchStreamWriter failed")
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|Os \{ code: (\d+)")
NEARLY_FULL = 16 * 2**20  # bytes: a file system with less free is taken as full when a write failed without errno


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """``naming(path)`` for writes through torch or safetensors, which report a full disk as ``[enforce fail at
    inline_container.cc:672] . unexpected pos`` or a ``SafetensorError``: those become an OSError naming
    ``path``, ENOSPC where the errno is known or the file system is (next to) full, so the CLI prints
    ``<path>: No space left on device``."""
    try:
        with naming(path):
            yield
    except OSError:
        raise
    except Exception as exc:
        text = str(exc)
        found = _ERRNO_IN_TEXT.search(text)
        if found:
            code = int(found.group(1) or found.group(2))
            raise OSError(code, os.strerror(code), str(path)) from exc
        if not any(marker in text for marker in _TORCH_WRITE_FAILED):
            raise
        if _free_bytes(Path(path)) < NEARLY_FULL:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise OSError(errno.EIO, f"write failed ({text.splitlines()[0] if text else type(exc).__name__})",
                      str(path)) from exc  # fmt: skip


def _free_bytes(path: Path) -> int:
    """Free space (for this user) on the file system holding ``path`` or its nearest existing parent."""
    for where in (path, *path.parents):
        try:
            return shutil.disk_usage(where).free
        except OSError:
            continue
    return NEARLY_FULL


def os_error_line(exc: OSError) -> str:
    """``path: strerror`` (``src -> dst: strerror`` for a rename), as the CLI prints an OSError."""
    if exc.filename is None:
        return str(exc)
    where = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc}"
