"""Parser for the ABAW annotation tree: ``<Task>_Challenge/{Train_Set,Validation_Set}/<video>.txt``.

Line 1 of each file is a header, line i + 1 is frame i. Invalid codes: -5 in VA (either value), -1 in EXPR and in
any AU. Files may end lines with CRLF. A bad row stops the pack naming ``file:line`` unless ``skip_bad_rows``,
where the row's frame gets no label for that task and the row is counted in the manifest.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mtl.constants import AU_NAMES, EXPR_NAMES, NUM_AU, NUM_EXPR, VA_INVALID
from mtl.data.records import ParseLog, SplitLabels, TaskLabels, VideoLabels
from mtl.errors import DataError

TASK_DIRS: dict[str, tuple[str, ...]] = {
    "va": ("VA_Estimation_Challenge",),
    "expr": ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"),  # the second: an older release
    "au": ("AU_Detection_Challenge",),
}
SPLIT_DIRS: dict[str, str] = {"train": "Train_Set", "val": "Validation_Set"}
HEADERS: dict[str, tuple[str, ...]] = {"va": ("valence", "arousal"), "expr": EXPR_NAMES, "au": AU_NAMES}
COLUMNS: dict[str, int] = {"va": 2, "expr": 1, "au": NUM_AU}


class BadRow(ValueError):
    """A row that cannot be read; the message says why (the caller adds file and line)."""


# ------------------------------------------------------------------------------------------------ rows


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRow(f"{what}: expected a number, got {text.strip()!r}") from None
    if not math.isfinite(value):
        raise BadRow(f"{what}: expected a finite number, got {text.strip()!r}")
    return value


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BadRow(f"{what}: expected an integer, got {text.strip()!r}") from None


def parse_va(fields: list[str]) -> tuple[tuple[float, float], bool]:
    """``valence,arousal`` in [-1, 1]; -5 in either marks the frame invalid."""
    v = _number(fields[0], "valence")
    a = _number(fields[1], "arousal")
    if v == VA_INVALID or a == VA_INVALID:
        return (0.0, 0.0), False
    for name, x in (("valence", v), ("arousal", a)):
        if not -1.0 <= x <= 1.0:
            raise BadRow(f"{name} {x} is outside [-1, 1] (and is not the invalid code -5)")
    return (v, a), True


def parse_expr(fields: list[str]) -> tuple[int, bool]:
    """One class index 0..7, or -1."""
    e = _integer(fields[0], "expression")
    if e == -1:
        return 0, False
    if not 0 <= e < NUM_EXPR:
        raise BadRow(f"expression {e} is not a class 0..{NUM_EXPR - 1} (nor the invalid code -1)")
    return e, True


def parse_au(fields: list[str]) -> tuple[list[int], bool]:
    """Twelve 0/1 values; a -1 in any of them makes the whole frame invalid."""
    aus = [_integer(f, AU_NAMES[i]) for i, f in enumerate(fields)]
    for name, x in zip(AU_NAMES, aus):
        if x not in (-1, 0, 1):
            raise BadRow(f"{name} {x} is not 0, 1 (nor the invalid code -1)")
    if -1 in aus:
        return [0] * NUM_AU, False
    return aus, True


ROW_PARSERS = {"va": parse_va, "expr": parse_expr, "au": parse_au}


# ------------------------------------------------------------------------------------------------ files


def read_text_lines(path: Path, rel: str) -> list[str]:
    """Lines without their LF/CRLF ends; trailing blank lines dropped (a final newline is not a row)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{rel}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{rel}: cannot read ({exc.strerror})") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _looks_numeric(fields: list[str]) -> bool:
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return True


def check_header(line: str, task: str, where: str) -> None:
    """Refuse a file without its header (frame i would silently become frame i + 1) or with other columns."""
    fields = [f.strip() for f in line.split(",")]
    expected = HEADERS[task]
    if _looks_numeric(fields):
        raise DataError(f"{where}: expected the header line ({','.join(expected)}), found data {line.strip()!r}")
    names = [f.lower() for f in fields]
    want = [n.lower() for n in expected]
    # The older EXPR_Classification release has 7 classes (no "Other"); the codes 0..6 mean the same.
    ok = names == want or (task == "expr" and names == want[: NUM_EXPR - 1])
    if not ok:
        raise DataError(f"{where}: header {line.strip()!r} does not match the {task} columns {','.join(expected)}")


def parse_task_file(path: Path, rel: str, task: str, split: str, log: ParseLog) -> TaskLabels | None:
    """One ``<video>.txt``; None when the file is empty and ``skip_bad_rows`` skips it."""
    lines = read_text_lines(path, rel)
    if len(lines) < 2:
        what = "empty file" if not lines else "no label rows after the header"
        log.bad_file(split, f"{rel}:{max(len(lines), 1)}", what)
        return None
    check_header(lines[0], task, f"{rel}:1")
    n = len(lines) - 1
    ncol = COLUMNS[task]
    shape = {"va": (n, 2), "expr": (n,), "au": (n, NUM_AU)}[task]
    values = np.zeros(shape, np.float64 if task == "va" else np.int64)
    valid = np.zeros(n, bool)
    parse = ROW_PARSERS[task]
    for i, line in enumerate(lines[1:]):
        fields = line.split(",")
        try:
            if len(fields) != ncol:
                raise BadRow(f"expected {ncol} comma-separated values, found {len(fields)}")
            values[i], valid[i] = parse(fields)
        except BadRow as exc:
            log.bad_row(split, f"{rel}:{i + 2}", str(exc))
    return TaskLabels(values=values, valid=valid, source=rel)


# ------------------------------------------------------------------------------------------------ tree


def find_task_dirs(root: Path) -> dict[str, Path]:
    """The task folders present under ``root``; at least one must be."""
    if not root.is_dir():
        raise DataError(f"annotations folder not found: {root}")
    found: dict[str, Path] = {}
    for task, names in TASK_DIRS.items():
        present = [root / n for n in names if (root / n).is_dir()]
        if len(present) > 1:
            raise DataError(f"{root}: both {present[0].name} and {present[1].name} present; keep one")
        if present:
            found[task] = present[0]
    if not found:
        wanted = ", ".join(n for names in TASK_DIRS.values() for n in names)
        raise DataError(f"{root}: no task folder found (expected one or more of {wanted})")
    return found


def parse_abaw(root: Path, log: ParseLog) -> SplitLabels:
    """Labels of every video of both splits, keyed by split then video name (``_left``/``_right`` kept)."""
    root = Path(root)
    task_dirs = find_task_dirs(root)
    for task in TASK_DIRS:
        if task not in task_dirs:
            log.warnings.append(f"{root}: no {' / '.join(TASK_DIRS[task])} folder; no {task} labels")
    out: SplitLabels = {split: {} for split in SPLIT_DIRS}
    seen: dict[str, tuple[str, str]] = {}  # video -> (split, file), to catch a video filed under both splits
    for task, tdir in task_dirs.items():
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
                    out[split].setdefault(video, VideoLabels()).tasks[task] = labels
    return out
