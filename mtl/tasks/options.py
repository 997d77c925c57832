"""A task's loss options: its ``loss.tasks.<task>.*`` settings, one small typed model per kind of loss.

A kind names its model in ``Task.options_model`` (a plugin's kind may name its own); the config validates
``loss.tasks.<task>`` against the model of that task, with the task's defaults where a key is not set, and the
objective hands each task its validated options. No field of the config's ``loss`` section is any task's.
Validation sees the task's width (``context={"width": ...}``), so a list of class weights of the wrong length fails
with the config, before anything is packed or trained.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mtl.fields import Float

# "auto": from the training split's counts in the manifest (balanced, see `mtl.tasks.losses`); "none": all 1
Weights = Literal["auto", "none"] | list[Float]


class LossOptions(BaseModel):
    """The base of every kind's options, and the options of a loss that takes none (a regression task's CCC)."""

    model_config = ConfigDict(extra="forbid")


class FocalOptions(LossOptions):
    """A focal loss: its focusing parameter and its weights, one per head output."""

    gamma: Float = Field(2.0, ge=0)  # 0: the plain (weighted) cross-entropy
    alpha: Weights = "auto"

    alpha_max: ClassVar[float | None] = None  # the largest weight a list may hold (None: no bound)

    @field_validator("alpha")
    @classmethod
    def _one_per_output(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list):
            return value
        width = (info.context or {}).get("width", len(value))
        hi = cls.alpha_max
        if len(value) != width or any(a < 0 or (hi is not None and a > hi) for a in value):
            what = "non-negative numbers" if hi is None else f"numbers in [0, {hi:g}]"
            raise ValueError(f"expected 'auto', 'none' or a list of {width} {what}, got {value}")
        return value


class SoftmaxFocalOptions(FocalOptions):
    """A single-label task's softmax focal loss; ``alpha``: a weight per class (``alpha_c`` scales class c's term)."""


class SigmoidFocalOptions(FocalOptions):
    """A multi-label task's sigmoid focal loss; ``alpha``: a list weighs unit j's positives ``a_j`` and its
    negatives ``1 - a_j`` (RetinaNet); "auto" balances each unit's positives against its negatives."""

    alpha_max: ClassVar[float | None] = 1.0
