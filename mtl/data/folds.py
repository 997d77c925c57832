"""K folds of the labelled videos (train + val) for cross-validation: made by `mtl cv`, kept as ``folds.json`` beside
the fold runs, read by the loaders of a run whose config names one (``data.folds.file`` + ``data.folds.fold``).

Why by video, and why ``_left``/``_right`` together: frames of one video are near-duplicates, and the two people of
one recording share scene, light and camera, so either split across folds would leak. Every fold keeps at least one
labelled video of every task in its held-out part and in its training part, or a fold would train or score a task
on nothing. The assignment depends on the seed, K and the videos only (not on their order anywhere).

``folds.json`` (``FoldsFile``)::

    {"format": "mtl-folds/1", "k": 5, "seed": 0,
     "shards": "/abs/shards", "manifest_sha256": "...", "splits": ["train", "val"],
     "config": {"file": "configs/x.yaml", "overrides": [...], "sha256": "..."},   # what `mtl cv` was run with
     "parent_run_id": "..." | null,                                                 # the MLflow parent run
     "folds": [{"fold": 0, "holdout": ["vid1", "vid2_left", "vid2_right", ...]}, ...]}
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, ValidationError

from mtl.data.manifest import file_sha256
from mtl.data.schema import MANIFEST, Count, ManifestModel, Sha256, Text, describe
from mtl.data.video_index import SampleInfo, labelled_tasks, scan_split, task_stats
from mtl.errors import DataError, MtlError, naming

FORMAT = "mtl-folds/1"
FOLDS_FILE = "folds.json"
_PART = re.compile(r"_(left|right)$")
_FOLD_DIR = re.compile(r"^fold_(\d+)$")
_TRIES = 200


def group_of(video: str) -> str:
    """The recording a video belongs to: ``x_left`` and ``x_right`` are one (the ABAW naming of two people)."""
    return _PART.sub("", video)


# ------------------------------------------------------------------------------------------------ assignment


def assign(videos: dict[str, set[str]], k: int, seed: int, frames: dict[str, int] | None = None) -> list[list[str]]:
    """``videos``: video -> tasks it labels. K lists of held-out videos, grouped by recording, such that every task
    labelled anywhere is labelled in each fold's held-out videos and in the rest; deterministic in (videos, k, seed).

    Greedy with retries: recordings that carry the rarest task go first, each to the fold that lacks most of its
    tasks, then to the one with the fewest frames so far (``frames`` per video; else videos are counted), so the
    folds come out about equal in size; a failed try starts again in another seeded order. MtlError in one line
    when K exceeds the recordings, or a task has fewer labelled recordings than K, or no try succeeds."""
    groups: dict[str, list[str]] = {}
    for v in sorted(videos):
        groups.setdefault(group_of(v), []).append(v)
    gtasks = {g: set().union(*(videos[v] for v in vs)) for g, vs in groups.items()}
    names = sorted(groups)
    if k < 2:
        raise MtlError(f"--folds {k}: cross-validation needs at least 2 folds")
    if k > len(names):
        raise MtlError(f"--folds {k}: more folds than the {len(names)} labelled recordings (videos, `_left`/`_right` "
                       f"counted once) of train and val")  # fmt: skip
    all_tasks = sorted(set().union(*gtasks.values()))
    per_task = {t: sum(t in gtasks[g] for g in names) for t in all_tasks}
    short = [t for t in all_tasks if per_task[t] < k]
    if short:
        t = min(short, key=lambda x: per_task[x])
        raise MtlError(f"--folds {k}: task {t} is labelled in only {per_task[t]} recording(s) of train and val; every "
                       f"fold needs one held out and one to train on: use at most {per_task[t]} folds")  # fmt: skip
    rng = np.random.default_rng(seed)
    for _ in range(_TRIES):
        tie = {g: float(x) for g, x in zip(names, rng.random(len(names)))}
        order = sorted(names, key=lambda g: (min((per_task[t] for t in gtasks[g]), default=len(names)), tie[g]))
        folds: list[list[str]] = [[] for _ in range(k)]
        have: list[set[str]] = [set() for _ in range(k)]
        sizes = [0] * k
        fold_order = rng.permutation(k).tolist()
        for g in order:
            best = min(fold_order, key=lambda f: (-len(gtasks[g] - have[f]), sizes[f]))
            folds[best].append(g)
            have[best] |= gtasks[g]
            sizes[best] += sum(frames.get(v, 1) if frames else 1 for v in groups[g])
        if all(have[f] == set(all_tasks) and folds[f] for f in range(k)) and all(
            set().union(*(have[o] for o in range(k) if o != f)) == set(all_tasks) for f in range(k)
        ):
            return [sorted(v for g in sorted(fold) for v in groups[g]) for fold in folds]
    raise MtlError(f"--folds {k}: found no split of the {len(names)} recordings in which every fold has every task "
                   f"labelled in its held-out and its training part; use fewer folds")  # fmt: skip


# ------------------------------------------------------------------------------------------------ the file


class FoldRecord(ManifestModel):
    fold: Count
    holdout: list[Text] = Field(min_length=1)


class CvConfigRecord(ManifestModel):
    file: Text | None = None
    overrides: list[Text] = Field(default_factory=list)
    sha256: Sha256  # of the resolved config, less what may differ between the folds and the launches


class FoldsFile(ManifestModel):
    format: Literal["mtl-folds/1"] = FORMAT
    k: Annotated[int, Field(strict=True, ge=2)]
    seed: Annotated[int, Field(strict=True)]
    shards: Text
    manifest_sha256: Sha256
    splits: list[Text] = Field(min_length=1)
    config: CvConfigRecord
    parent_run_id: Text | None = None
    folds: list[FoldRecord]

    def holdout(self, fold: int, where: str = "data.folds.fold") -> list[str]:
        if not 0 <= fold < self.k:
            raise MtlError(f"{where}={fold}: the folds file has folds 0..{self.k - 1}")
        return list(self.folds[fold].holdout)


def write_folds(path: Path, folds: FoldsFile) -> None:
    """Atomic: a killed `mtl cv` leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp):
        tmp.write_text(json.dumps(folds.model_dump(mode="json"), indent=1) + "\n")
    os.replace(tmp, path)


def read_folds(path: str | Path) -> FoldsFile:
    """The checked folds file; DataError naming the file (and the field) otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: folds file not found (written by `mtl cv`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else data
        raise DataError(f"{path}: format: expected {FORMAT!r}, got {got!r}")
    try:
        folds = FoldsFile.model_validate(data)
    except ValidationError as exc:
        raise DataError(f"{path}: {describe(exc)}") from None
    if len(folds.folds) != folds.k or [f.fold for f in folds.folds] != list(range(folds.k)):
        raise DataError(f"{path}: folds: expected folds 0..{folds.k - 1} in order")
    return folds


def fold_dir(out: Path, k: int) -> Path:
    """Fold k's run directory in a cv directory (beside its ``folds.json``)."""
    return Path(out) / f"fold_{k}"


def fold_dirs(out: Path) -> list[Path] | None:
    """The ``fold_<k>`` run directories of the cv directory ``out``, in fold order; None if it is not one (no
    ``folds.json``)."""
    out = Path(out)
    if not (out / FOLDS_FILE).is_file():
        return None
    found = sorted((int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _FOLD_DIR.match(p.name)))
    if not found:
        raise MtlError(f"{out}: has {FOLDS_FILE} but no fold_<k>/ run directories")
    return [p for _, p in found]


def manifest_digest(shards: str | Path) -> str:
    return file_sha256(Path(shards) / MANIFEST)


def labelled_samples(shards: str | Path, splits: list[str]) -> list[SampleInfo]:
    return [s for split in splits for s in scan_split(shards, split)]


def make_folds(shards: str | Path, splits: list[str], k: int, seed: int) -> list[list[str]]:
    """The held-out videos of each of K folds over the labelled videos of ``splits``."""
    samples = labelled_samples(shards, splits)
    videos = labelled_tasks(samples)
    frames: dict[str, int] = {}
    for s in samples:
        frames[s.video] = frames.get(s.video, 0) + s.frames
    per_split = [{s.video for s in scan_split(shards, sp)} for sp in splits]
    both = sorted(v for v in videos if sum(v in vs for vs in per_split) > 1)
    if both:
        raise MtlError(f"{shards}: video {both[0]} is in more than one of the splits {splits}")
    return assign(videos, k, seed, frames)


# ------------------------------------------------------------------------------------------------ a fold's data


def fold_samples(data_cfg, role: Literal["train", "val"]) -> list[SampleInfo]:
    """The samples of a fold run's training part (``train``) or held-out part (``val``): of the folds file's
    splits, whose video the fold does (val) or does not (train) hold out. DataError naming the folds file when it
    was made for another pack or names videos this pack does not have."""
    f = data_cfg.folds
    folds = read_folds(f.file)
    if manifest_digest(data_cfg.shards) != folds.manifest_sha256:
        raise DataError(f"{f.file}: made for another pack than data.shards={data_cfg.shards} (its manifest.json "
                        f"changed); run `mtl cv` again with another out dir, or read that pack's split as packed: "
                        f"data.folds.file=null data.folds.fold=null")  # fmt: skip
    held = set(folds.holdout(f.fold))
    samples = labelled_samples(data_cfg.shards, folds.splits)
    missing = held - {s.video for s in samples}
    if missing:
        raise DataError(f"{f.file}: fold {f.fold} holds out video {sorted(missing)[0]}, which {data_cfg.shards} lacks")
    return [s for s in samples if (s.video in held) == (role == "val")]


def fold_role(data_cfg, split: str) -> Literal["train", "val"] | None:
    """What a loader of ``split`` reads in a fold run: its training part (data.train_split), its held-out part
    (data.val_split), or the split as packed (None: no fold, or another split such as the test set)."""
    if data_cfg.folds.file is None:
        return None
    if split == data_cfg.train_split:
        return "train"
    if split == data_cfg.val_split:
        return "val"
    return None


def training_task_stats(data_cfg, packed: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """Label statistics the losses weigh by: the packed training split's (``packed``), or in a fold run those of
    the fold's own training part."""
    if data_cfg.folds.file is None:
        return packed
    return task_stats(fold_samples(data_cfg, "train"))
