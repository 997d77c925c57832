"""Errors a user can act on: the CLI prints them as one line and exits non-zero, no traceback."""

from __future__ import annotations


class MtlError(Exception):
    """Base of every error caused by input, config or environment rather than by a bug."""


class DataError(MtlError):
    """Bad input data; the message names the file and, where there is one, the line."""
