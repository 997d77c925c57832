"""Tasks as data: each per-frame task described once, every stage iterating over the registered descriptions.

Importing this package registers the built-in ABAW tasks (VA, EXPR, AU, in that order). A new task is one
``register(...)`` of a kind from `mtl.tasks.kinds` in a module the run imports (config ``tasks.plugins``); its loss
options (``loss.tasks.<name>.*``) are the model its kind names (`mtl.tasks.options`).
"""

from __future__ import annotations

from mtl.tasks import abaw as _abaw  # noqa: F401  (registers VA, EXPR, AU)
from mtl.tasks.base import BadRow, Task, get_task, load_plugins, register, task_names, tasks, unregister
from mtl.tasks.kinds import MultiLabel, Regression, SingleLabel
from mtl.tasks.options import FocalOptions, LossOptions, SigmoidFocalOptions, SoftmaxFocalOptions

__all__ = [
    "BadRow",
    "FocalOptions",
    "LossOptions",
    "MultiLabel",
    "Regression",
    "SigmoidFocalOptions",
    "SingleLabel",
    "SoftmaxFocalOptions",
    "Task",
    "get_task",
    "load_plugins",
    "register",
    "task_names",
    "tasks",
    "unregister",
]
