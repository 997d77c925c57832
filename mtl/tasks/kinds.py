"""The three kinds of per-frame task, and what each kind does at every stage.

- ``Regression``: values in [low, high] per column (VA); head squashed to that range; CCC loss; CCC metric.
- ``SingleLabel``: one class per frame (EXPR); softmax focal loss; macro F1 over the classes.
- ``MultiLabel``: several 0/1 units per frame (AU); sigmoid focal loss; macro F1 at 0.5 and with tuned thresholds.

Each kind's loss reads the options model it names (`mtl.tasks.options`: CCC takes none, the focal losses a
``gamma`` and class or unit weights ``alpha``), set per task as ``loss.tasks.<name>.*``.
A task is an instance of one of them; override ``parse_row`` (and ``format_row``) when its files read otherwise,
and ``options_model`` with ``loss`` when its loss takes other options.
The torch parts (``loss``, ``stream``) import `mtl.tasks.losses` / `mtl.tasks.streams` only when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mtl.tasks.base import BadRow, Task, integer, number
from mtl.tasks.options import LossOptions, SigmoidFocalOptions, SoftmaxFocalOptions


@dataclass(frozen=True)
class Regression(Task):
    """Real values per column; a row with ``invalid`` in any column has no label."""

    low: float = -1.0
    high: float = 1.0
    invalid: float = -5.0

    kind: ClassVar[str] = "regression"
    metric: ClassVar[str] = "ccc"

    def parse_row(self, fields: list[str]) -> tuple[tuple[float, ...], bool]:
        values = tuple(number(f, c) for f, c in zip(fields, self.columns))
        if self.invalid in values:
            return (0.0,) * self.width, False
        for name, x in zip(self.columns, values):
            if not self.low <= x <= self.high:
                raise BadRow(f"{name} {x} is outside [{self.low:g}, {self.high:g}] "
                             f"(and is not the invalid code {self.invalid:g})")  # fmt: skip
        return values, True

    def format_row(self, values: Any, valid: bool) -> str:
        if not valid:
            return ",".join([f"{self.invalid:g}"] * self.width)
        return ",".join(f"{float(x):.4f}" for x in values)

    def check_submission(self, fields: list[str]) -> None:
        for f, name in zip(fields, self.columns):
            x = number(f, name)
            if not self.low <= x <= self.high:
                raise BadRow(f"{name} {x:g} is outside [{self.low:g}, {self.high:g}]")

    def prediction_header(self) -> list[str]:
        return list(self.columns)

    def prediction_cells(self, row: np.ndarray, threshold: np.ndarray | None) -> list[Any]:
        return [f"{x:.5f}" for x in row]

    def submission_cells(self, row: np.ndarray, threshold: np.ndarray | None) -> str:
        return ",".join(f"{x:.5f}" for x in row)

    def activate(self, logits):
        if (self.low, self.high) == (-1.0, 1.0):
            return logits.tanh()
        return self.low + (self.high - self.low) * logits.sigmoid()

    def loss(self, options: LossOptions, stats: dict[str, Any] | None):
        from mtl.tasks.losses import CCCTerm

        return CCCTerm(self.width)

    def stream(self, **kw: Any):
        from mtl.tasks.streams import RegressionStream

        return RegressionStream(self, **kw)


@dataclass(frozen=True)
class ClassTask(Task):
    """Integer labels (class indices or 0/1 units), ``invalid`` marking none; scored by F1, trained by a focal
    loss."""

    invalid: int = -1

    file_dtype: ClassVar[type] = np.int64
    pack_dtype: ClassVar[type] = np.int8


@dataclass(frozen=True)
class SingleLabel(ClassTask):
    """One class index per frame (``columns`` are the class names); ``invalid`` marks no label."""

    prediction: str = "class"  # its column in predictions files ("expression")

    kind: ClassVar[str] = "single_label"
    options_model: ClassVar[type[LossOptions]] = SoftmaxFocalOptions
    batch_dtype: ClassVar[type] = np.int64

    @property
    def label_shape(self) -> tuple[int, ...]:
        return ()

    def parse_row(self, fields: list[str]) -> tuple[int, bool]:
        e = integer(fields[0], self.prediction)
        if e == self.invalid:
            return 0, False
        if not 0 <= e < self.width:
            raise BadRow(f"{self.prediction} {e} is not a class 0..{self.width - 1} "
                         f"(nor the invalid code {self.invalid})")  # fmt: skip
        return e, True

    def format_row(self, values: Any, valid: bool) -> str:
        return str(int(values)) if valid else str(self.invalid)

    def check_submission(self, fields: list[str]) -> None:
        e = integer(fields[0], self.prediction)
        if not 0 <= e < self.width:
            raise BadRow(f"{self.prediction} {e} is not a class 0..{self.width - 1}")

    def label_problem(self, values: np.ndarray) -> str | None:
        if (values < 0).any() or (values >= self.width).any():
            return f"{self.prediction} class out of range"
        return None

    def count_fields(self) -> dict[str, int]:
        return {"class_counts": self.width}

    def counts(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {"class_counts": np.bincount(values.astype(np.int64), minlength=self.width)}

    def predict(self, output):
        return output.softmax(-1)

    def output_from(self, prediction):
        return prediction.clamp_min(1e-30).log()  # softmax(log p) = p for probabilities that sum to 1

    def prediction_header(self) -> list[str]:
        return [self.prediction] + [f"p_{c}" for c in self.columns]

    def prediction_cells(self, row: np.ndarray, threshold: np.ndarray | None) -> list[Any]:
        return [int(row.argmax())] + [f"{p:.5f}" for p in row]

    def submission_cells(self, row: np.ndarray, threshold: np.ndarray | None) -> str:
        return str(int(row.argmax()))

    def loss(self, options: SoftmaxFocalOptions, stats: dict[str, Any] | None):
        from mtl.tasks.losses import SoftmaxFocalTerm, class_alpha

        return SoftmaxFocalTerm(self.width, options.gamma, class_alpha(options.alpha, stats, self))

    def stream(self, **kw: Any):
        from mtl.tasks.streams import ClassStream

        return ClassStream(self, **kw)


@dataclass(frozen=True)
class MultiLabel(ClassTask):
    """0/1 per unit (``columns`` are the unit names); ``invalid`` in any unit leaves the frame without a label."""

    kind: ClassVar[str] = "multi_label"
    options_model: ClassVar[type[LossOptions]] = SigmoidFocalOptions
    batch_dtype: ClassVar[type] = np.float32

    def parse_row(self, fields: list[str]) -> tuple[list[int], bool]:
        units = [integer(f, c) for f, c in zip(fields, self.columns)]
        for name, x in zip(self.columns, units):
            if x not in (self.invalid, 0, 1):
                raise BadRow(f"{name} {x} is not 0, 1 (nor the invalid code {self.invalid})")
        if self.invalid in units:
            return [0] * self.width, False
        return units, True

    def format_row(self, values: Sequence[int] | np.ndarray, valid: bool) -> str:
        if not valid:
            return ",".join([str(self.invalid)] * self.width)
        return ",".join(str(int(x)) for x in values)

    def check_submission(self, fields: list[str]) -> None:
        for f, name in zip(fields, self.columns):
            if integer(f, name) not in (0, 1):
                raise BadRow(f"{name} {f.strip()} is not 0 or 1")

    def count_fields(self) -> dict[str, int]:
        return {"positive_counts": self.width}

    def counts(self, values: np.ndarray) -> dict[str, np.ndarray]:
        return {"positive_counts": values.sum(0, dtype=np.int64).reshape(self.width)}

    def predict(self, output):
        return output.sigmoid()

    def output_from(self, prediction):
        return prediction.logit()  # sigmoid(logit p) = p; 0 and 1 become -inf and inf, which sigmoid maps back

    def prediction_header(self) -> list[str]:
        return list(self.columns) + [f"p_{c}" for c in self.columns]

    def prediction_cells(self, row: np.ndarray, threshold: np.ndarray | None) -> list[Any]:
        thr = np.full(self.width, 0.5) if threshold is None else threshold
        return [int(p >= t) for p, t in zip(row, thr)] + [f"{p:.5f}" for p in row]

    def submission_cells(self, row: np.ndarray, threshold: np.ndarray | None) -> str:
        thr = np.full(self.width, 0.5) if threshold is None else threshold
        return ",".join(str(int(p >= t)) for p, t in zip(row, thr))

    def loss(self, options: SigmoidFocalOptions, stats: dict[str, Any] | None):
        from mtl.tasks.losses import SigmoidFocalTerm, pos_neg_weights

        return SigmoidFocalTerm(self.width, options.gamma, pos_neg_weights(options.alpha, stats, self))

    def stream(self, **kw: Any):
        from mtl.tasks.streams import MultiLabelStream

        return MultiLabelStream(self, **kw)
