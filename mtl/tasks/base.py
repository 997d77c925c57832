"""What every per-frame task is, and the registry of the tasks a run knows.

A task is described once, by an instance of one of the kinds in `mtl.tasks.kinds` (regression, single-label or
multi-label classification): its name (the key of its labels in parsed files, shards, batches, network outputs and
metric names), its label columns and invalid code, where its annotations live, its submission file and the model
of its loss options (``loss.tasks.<name>.*``, `mtl.tasks.options`). Everything else in the package iterates over
``tasks()``.

This module and `mtl.tasks.kinds` import no torch, so the data layer (parsers, pack, manifest) can use them; the
kinds import their torch parts (`mtl.tasks.losses`, `mtl.tasks.streams`) only when asked for a loss or a metric.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mtl.errors import MtlError
from mtl.tasks.options import LossOptions

if TYPE_CHECKING:  # torch-side types, for annotations only
    from torch import Tensor, nn

    from mtl.tasks.streams import TaskStream


class BadRow(ValueError):
    """A label row that cannot be read; the message says why (the caller adds file and line)."""


def number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRow(f"{what}: expected a number, got {text.strip()!r}") from None
    if not math.isfinite(value):
        raise BadRow(f"{what}: expected a finite number, got {text.strip()!r}")
    return value


def integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadRow(f"{what}: expected an integer, got {text.strip()!r}") from None


@dataclass(frozen=True)
class Task:
    """The parts every kind shares; see the kinds for what their labels, losses and metrics are."""

    name: str  # "va": labels ``va`` / ``va_valid`` everywhere, head ``heads.va``, metrics ``va_*``
    title: str  # for plots and messages: "VA"
    columns: tuple[str, ...]  # the annotation file's header: one name per value (class names for single-label)
    folders: tuple[str, ...]  # ABAW-tree annotation folders (alternative names of one folder; first: the usual)
    submission: str  # test-submission file name ("VA.txt"); header ``image_location,<columns>``
    mtl_track: tuple[str, ...] = ()  # this task's header fields in the MTL-track file; () if not in that file
    header_aliases: tuple[tuple[str, ...], ...] = ()  # other accepted headers (an older release's)
    # The organisers' test-set list of this task's track, named ``<name>_test_set_release.txt`` for one of these
    # names (matched ignoring case and - vs _; first: the usual). () : given only as ``<task>=FILE``.
    test_lists: tuple[str, ...] = ()

    kind: ClassVar[str] = ""
    file_dtype: ClassVar[type] = np.float64  # label values as parsed
    pack_dtype: ClassVar[type] = np.float64  # as held while packing (hashed into the pack plan: keep stable)
    batch_dtype: ClassVar[type] = np.float32  # in samples and batches
    options_model: ClassVar[type[LossOptions]] = LossOptions  # its ``loss.tasks.<name>`` settings
    metric: ClassVar[str] = "f1"  # the metric that stands for it (``headline``)

    # ---------------------------------------------------------------------------------------------- shapes

    @property
    def width(self) -> int:
        """Outputs of the head."""
        return len(self.columns)

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Shape of one frame's label: (width,), or () for a class index."""
        return (self.width,)

    @property
    def row_fields(self) -> int:
        """Comma-separated values of one row in the annotation file."""
        return int(np.prod(self.label_shape, dtype=np.int64))

    @property
    def valid_key(self) -> str:
        return f"{self.name}_valid"

    @property
    def options_key(self) -> str:
        """Where its loss options live in the config (for messages)."""
        return f"loss.tasks.{self.name}"

    def empty(self, n: int, dtype: type | None = None) -> np.ndarray:
        return np.zeros((n, *self.label_shape), dtype or self.file_dtype)

    # ---------------------------------------------------------------------------------------------- files

    def parse_row(self, fields: list[str]) -> tuple[Any, bool]:
        """One frame's comma-separated values -> (values, valid); raise BadRow naming what is wrong."""
        raise NotImplementedError

    def header_ok(self, names: Sequence[str]) -> bool:
        """Whether an annotation file's header (lower-cased fields) is this task's."""
        want = [tuple(c.lower() for c in h) for h in (self.columns, *self.header_aliases)]
        return tuple(names) in want

    def format_row(self, values: Any, valid: bool) -> str:
        """One frame as a row of its annotation file (the inverse of ``parse_row``; synthetic data writes it)."""
        raise NotImplementedError

    def check_submission(self, fields: list[str]) -> None:
        """One frame's values in a test submission (``submission_cells``); raise BadRow naming what is wrong. Unlike
        annotation rows, no invalid code: every frame needs a prediction in range."""
        raise NotImplementedError

    def label_problem(self, values: np.ndarray) -> str | None:
        """What is wrong with labels read back from a shard (values a parser could not have produced), or None."""
        return None

    # ---------------------------------------------------------------------------------------------- stats

    def count_fields(self) -> dict[str, int]:
        """Manifest fields this kind adds to a split's ``tasks.<name>`` stats, and their lengths."""
        return {}

    def counts(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Those fields over the rows of ``values`` (labelled frames with an image)."""
        return {}

    # ---------------------------------------------------------------------------------------------- outputs

    def predict(self, output: Any) -> Any:
        """Head output (a tensor [..., width]) -> what predictions files hold (values or probabilities)."""
        return output

    def output_from(self, prediction: Any) -> Any:
        """The inverse of ``predict`` (a tensor): a head output whose metric is the prediction's, so predictions
        averaged or smoothed outside the network (ensembles, post-processing) are scored by the same streams."""
        return prediction

    def prediction_header(self) -> list[str]:
        raise NotImplementedError

    def prediction_cells(self, row: np.ndarray, threshold: np.ndarray | None) -> list[Any]:
        raise NotImplementedError

    def submission_cells(self, row: np.ndarray, threshold: np.ndarray | None) -> str:
        raise NotImplementedError

    def headline(self) -> str:
        """The metric that stands for this task (in ``mtl_score`` and the summary line)."""
        return f"{self.name}_{self.metric}"

    # ---------------------------------------------------------------------------------------------- torch side

    def activate(self, logits: Tensor) -> Tensor:
        """The head's output from its linear layer's (e.g. squashed to the label range)."""
        return logits

    def loss_options(self, raw: Any = None) -> LossOptions:
        """Its ``loss.tasks.<name>`` settings checked against ``options_model`` (its defaults where a key is not
        set); pydantic's ValidationError where they do not fit, which the config turns into one line naming the key."""
        return self.options_model.model_validate({} if raw is None else raw, context={"width": self.width})

    def loss(self, options: LossOptions, stats: dict[str, Any] | None) -> nn.Module:
        """``term(output [N,width], target, weight [N]) -> scalar`` from its options (an ``options_model``) and the
        training split's stats from the manifest."""
        raise NotImplementedError

    def stream(self, **kw: Any) -> TaskStream:
        """A streaming metric over the frames of a split (see `mtl.tasks.streams`)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ registry

_REGISTRY: dict[str, Task] = {}


def register(task: Task, replace: bool = False) -> Task:
    """Add ``task`` to the tasks every stage iterates over; a second task of the same name is refused."""
    if not task.name.isidentifier() or "_" in task.name:
        raise MtlError(f"task name {task.name!r}: use letters and digits only (it prefixes keys like va_valid)")
    if task.name in _REGISTRY and not replace:
        raise MtlError(f"a task named {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def tasks() -> tuple[Task, ...]:
    """The registered tasks, in registration order (the built-in VA, EXPR, AU first)."""
    return tuple(_REGISTRY.values())


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_task(name: str) -> Task:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MtlError(f"unknown task {name!r} (registered: {', '.join(_REGISTRY)})") from None


def load_plugins(modules: Sequence[str], key: str = "tasks.plugins") -> None:
    """Import modules that register more tasks; ``key`` names the setting in errors."""
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MtlError(f"{key}[{i}]: cannot import {module!r} ({exc})") from None
