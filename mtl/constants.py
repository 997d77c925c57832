"""Task vocabulary of Aff-Wild2 / ABAW, shared by every stage of the pipeline."""

from __future__ import annotations

TASKS: tuple[str, ...] = ("va", "expr", "au")

EXPR_NAMES: tuple[str, ...] = (
    "Neutral",
    "Anger",
    "Disgust",
    "Fear",
    "Happiness",
    "Sadness",
    "Surprise",
    "Other",
)
AU_NAMES: tuple[str, ...] = (
    "AU1",
    "AU2",
    "AU4",
    "AU6",
    "AU7",
    "AU10",
    "AU12",
    "AU15",
    "AU23",
    "AU24",
    "AU25",
    "AU26",
)
NUM_EXPR = len(EXPR_NAMES)
NUM_AU = len(AU_NAMES)

# Codes the ABAW release uses for "no label on this frame".
VA_INVALID = -5.0
EXPR_INVALID = -1
AU_INVALID = -1

SPLITS: tuple[str, ...] = ("train", "val")
