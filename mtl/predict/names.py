"""The task vocabulary predictions are written with, kept in this one module so it can follow the task registry."""

from __future__ import annotations

from mtl.constants import AU_NAMES, EXPR_NAMES

EXPRESSIONS: tuple[str, ...] = tuple(EXPR_NAMES)
ACTION_UNITS: tuple[str, ...] = tuple(AU_NAMES)
FACE_COLUMNS: tuple[str, ...] = ("frame", "time_s", "face", "face_x", "face_y", "face_w", "face_h", "face_score")


def csv_header() -> list[str]:
    """Frame and face columns, VA, the expression, its probabilities, AU decisions, AU probabilities."""
    return [
        *FACE_COLUMNS,
        "valence",
        "arousal",
        "expression",
        *(f"p_{n}" for n in EXPRESSIONS),
        *ACTION_UNITS,
        *(f"p_{n}" for n in ACTION_UNITS),
    ]
