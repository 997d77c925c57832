"""Parser for the ABAW annotation tree: ``<Task>_Challenge/{Train_Set,Validation_Set}/<video>.txt``.

Line 1 of each file is a header, line i + 1 is frame i; each registered task says where its folder is, which
header it has and how a row reads (ABAW's invalid codes: -5 in VA, either value; -1 in EXPR and in any AU).
Files may end lines with CRLF. A bad row stops the pack naming ``file:line`` unless ``skip_bad_rows``, where the
row's frame gets no label for that task and the row is counted in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtl.data.labels import ParseLog, SplitLabels, TaskLabels, VideoLabels, read_rows, read_text_lines
from mtl.errors import DataError
from mtl.tasks import Task, get_task, tasks

SPLIT_DIRS: dict[str, str] = {"train": "Train_Set", "val": "Validation_Set"}


def _looks_numeric(fields: list[str]) -> bool:
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return True


def check_header(line: str, task: Task, where: str) -> None:
    """Refuse a file without its header (frame i would silently become frame i + 1) or with other columns."""
    fields = [f.strip() for f in line.split(",")]
    if _looks_numeric(fields):
        raise DataError(f"{where}: expected the header line ({','.join(task.columns)}), found data {line.strip()!r}")
    if not task.header_ok([f.lower() for f in fields]):
        raise DataError(
            f"{where}: header {line.strip()!r} does not match the {task.name} columns {','.join(task.columns)}"
        )


def parse_task_file(path: Path, rel: str, task: Task, split: str, log: ParseLog) -> TaskLabels | None:
    """One ``<video>.txt``; None when the file is empty and ``skip_bad_rows`` skips it."""
    lines = read_text_lines(path, rel)
    if len(lines) < 2:
        what = "empty file" if not lines else "no label rows after the header"
        log.bad_file(split, f"{rel}:{max(len(lines), 1)}", what)
        return None
    check_header(lines[0], task, f"{rel}:1")
    n = len(lines) - 1
    values, valid = task.empty(n), np.zeros(n, bool)
    for i, (value, ok) in read_rows(lines, rel, task.row_fields, split, log, task.parse_row):
        values[i], valid[i] = value, ok
    return TaskLabels(values=values, valid=valid, source=rel)


# ------------------------------------------------------------------------------------------------ tree


def find_task_dirs(root: Path) -> dict[str, Path]:
    """The task folders present under ``root``; at least one must be."""
    if not root.is_dir():
        raise DataError(f"annotations folder not found: {root}")
    found: dict[str, Path] = {}
    for task in tasks():
        present = [root / n for n in task.folders if (root / n).is_dir()]
        if len(present) > 1:
            raise DataError(f"{root}: both {present[0].name} and {present[1].name} present; keep one")
        if present:
            found[task.name] = present[0]
    if not found:
        wanted = ", ".join(n for task in tasks() for n in task.folders)
        raise DataError(f"{root}: no task folder found (expected one or more of {wanted})")
    return found


def parse_abaw(root: Path, log: ParseLog) -> SplitLabels:
    """Labels of every video of both splits, keyed by split then video name (``_left``/``_right`` kept)."""
    root = Path(root)
    task_dirs = find_task_dirs(root)
    for task in tasks():
        if task.name not in task_dirs:
            log.warnings.append(f"{root}: no {' / '.join(task.folders)} folder; no {task.name} labels")
    out: SplitLabels = {split: {} for split in SPLIT_DIRS}
    seen: dict[str, tuple[str, str]] = {}  # video -> (split, file), to catch a video filed under both splits
    for name, tdir in task_dirs.items():
        task = get_task(name)
        for split, sdir in SPLIT_DIRS.items():
            folder = tdir / sdir
            if not folder.is_dir():
                raise DataError(f"missing folder: {folder}")
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or not path.is_file():
                    continue
                rel = str(path.relative_to(root))
                if path.suffix != ".txt":
                    log.warnings.append(f"{rel}: not a .txt annotation file; ignored")
                    continue
                video = path.stem
                other = seen.setdefault(video, (split, rel))
                if other[0] != split:
                    raise DataError(f"{rel}: video {video} is also in the {other[0]} split ({other[1]})")
                labels = parse_task_file(path, rel, task, split, log)
                if labels is not None:
                    out[split].setdefault(video, VideoLabels()).tasks[task.name] = labels
    return out
