"""``manifest.json``: what `mtl pack` wrote, as one typed schema (``PackManifest``) that pack writes and every reader
(verify, the loaders, extraction, training, evaluation) gets back checked, so each can trust its fields.

Layout (paths relative to the data root)::

    {"format": "mtl-shards/1",
     "params": {"segment_len", "shard_size", "shuffle_seed", "skip_bad_rows", "source"},
     "inputs": {"images", "annotations" | "mtl_files"},
     "splits": {"train": {
         "videos", "frames", "images", "samples",
         "shards": [{"path", "samples", "frames", "images", "bytes", "sha256", "sample_frames": [int, ...]}],
         "tasks": {"va":   {"videos", "labeled_frames", "labeled_missing_image"},   # one per registered task
                   "expr": {..., "class_counts": [8]},     # over labeled_frames (valid label, image present)
                   "au":   {..., "positive_counts": [12]}},   # (fields by the task's kind)
         "video_frames": {video: frames}, "videos_without_images": [...],
         "bad_rows_skipped", "bad_rows": ["file:line: reason", ...], "skipped_files": [...],
         "bad_images_skipped", "bad_images": ["file: reason", ...]},    # (packs before these fields lack them)
       "val": {...},
       "test": {"unlabeled": true,                 # an unlabelled split (the organisers' test set): no "tasks"
         "videos", "frames", "images", "frames_without_image", "samples", "shards": [...], "video_frames",
         "frame_counts_from": {"videos" | "frame_counts" | "crops": videos},
         "lists": {"va" | "expr" | "au" | "mtl": {"path", "source", "videos", "rows", "sha256"}},
         "videos_skipped", "skipped_videos": [...]}},
     "unlabeled_videos": [...], "warnings": [...]}

A file that does not match is one DataError naming it and the field (``splits.train.shards[3].sha256: ...``).
Fields added later have defaults, so packs written before them still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, PrivateAttr, StrictBool, Tag, model_validator

from mtl.data.schema import (
    MANIFEST,
    Count,
    ManifestModel,
    Positive,
    Sha256,
    SplitsManifest,
    Text,
    field_error,
    read_json_model,
)
from mtl.errors import DataError, naming
from mtl.tasks import get_task, task_names

__all__ = ["FORMAT", "MANIFEST", "PackManifest", "file_sha256", "read_manifest", "write_manifest"]

FORMAT = "mtl-shards/1"
_NUMBER_LIST = re.compile(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]")


def file_sha256(path: str | Path) -> str:
    """The hash a manifest records per shard (`mtl pack`) and checks again (`mtl shards verify`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ parts


class ShardRecord(ManifestModel):
    """One shard of a split: where it is, what it holds (samples, frames, frames per sample), its size and hash."""

    path: Text
    samples: Count
    frames: Count
    images: Count | None = None  # frames with an image
    bytes: Count | None = None  # (packs before this field lack it: the loader then skips the size check)
    sha256: Sha256
    sample_frames: list[Positive]

    @model_validator(mode="after")
    def _frames_add_up(self) -> ShardRecord:
        if len(self.sample_frames) != self.samples:
            raise field_error("sample_frames", f"expected one frame count per sample ({self.samples}), "
                              f"got {len(self.sample_frames)}")  # fmt: skip
        if sum(self.sample_frames) != self.frames:
            raise field_error(
                "frames", f"{self.frames} does not match the sum of sample_frames ({sum(self.sample_frames)})"
            )
        return self


class TaskStats(ManifestModel):
    """One task's statistics over a labelled split; the task's count fields (``class_counts``, ``positive_counts``:
    ``Task.count_fields``) are extra fields, checked against the registered task by the split."""

    videos: Count | None = None  # videos with an annotation for this task
    labeled_frames: Count  # frames with a valid label and an image
    labeled_missing_image: Count  # frames with a valid label and no image

    def counts(self, field: str) -> list[int]:
        """One count field (as the task's ``count_fields`` names it)."""
        return (self.model_extra or {})[field]


class TrackListRecord(ManifestModel):
    """One organisers' test list, copied into the pack (``test/lists/<track>.txt``)."""

    path: Text
    source: Text = ""  # the file it was read from
    videos: Count
    rows: Count  # submission rows it asks for
    sha256: Sha256


class _SplitBase(ManifestModel):
    videos: Count
    frames: Count
    samples: Count
    shards: list[ShardRecord]

    def _check_shards(self) -> None:
        if sum(sh.samples for sh in self.shards) != self.samples:
            raise field_error(
                "samples", f"{self.samples} disagrees with the shards' {sum(sh.samples for sh in self.shards)}"
            )
        if sum(sh.frames for sh in self.shards) != self.frames:
            raise field_error(
                "frames", f"{self.frames} disagrees with the shards' {sum(sh.frames for sh in self.shards)}"
            )


class LabelledSplit(_SplitBase):
    """A split packed from annotations (train, val): shards and per-task statistics."""

    images: Count | None = None
    tasks: dict[str, TaskStats]
    video_frames: dict[str, Count] = Field(default_factory=dict)
    videos_without_images: list[str] = Field(default_factory=list)
    bad_rows_skipped: Count = 0
    bad_rows: list[str] = Field(default_factory=list)  # "file:line: reason", the first few
    skipped_files: list[str] = Field(default_factory=list)
    bad_images_skipped: Count = 0
    bad_images: list[str] = Field(default_factory=list)  # "file: reason", the first few

    @property
    def unlabeled(self) -> bool:
        return False

    @model_validator(mode="after")
    def _consistent(self) -> LabelledSplit:
        self._check_shards()
        names = task_names()
        # Every task packed is checked if it is registered here; a task registered after the pack is simply absent.
        if not any(t in self.tasks for t in names):
            raise field_error("tasks", f"none of the tasks {', '.join(names)}")
        for name in names:
            if name not in self.tasks:
                continue
            extra = self.tasks[name].model_extra or {}
            for k, n in get_task(name).count_fields().items():
                v = extra.get(k)
                ok = isinstance(v, list) and len(v) == n and all(type(x) is int and x >= 0 for x in v)
                if not ok:
                    raise field_error(f"tasks.{name}.{k}", f"expected {n} non-negative integers, got {v!r:.80}")
        return self

    def task_stats(self) -> dict[str, dict[str, Any]]:
        """``tasks`` as plain mappings, as the tasks' loss weights read them (``mtl.tasks.losses``)."""
        return {name: st.model_dump() for name, st in self.tasks.items()}


class UnlabelledSplit(_SplitBase):
    """The organisers' test set (``mtl pack --test-list``): shards, no labels; the lists and frame counts a
    submission is checked against."""

    unlabeled: Literal[True] = True
    images: Count
    frames_without_image: Count
    video_frames: dict[str, Positive]
    frame_counts_from: dict[str, Count] = Field(default_factory=dict)  # source ("videos", "frame_counts", ...) -> n
    lists: dict[str, TrackListRecord] = Field(min_length=1)
    videos_skipped: Count = 0
    skipped_videos: list[str] = Field(default_factory=list)

    @property
    def tasks(self) -> dict[str, TaskStats]:
        """No task statistics: nothing is labelled."""
        return {}

    @model_validator(mode="after")
    def _consistent(self) -> UnlabelledSplit:
        self._check_shards()
        if self.images + self.frames_without_image != self.frames:
            raise field_error("frames_without_image", "images + frames_without_image should equal frames")
        vf = self.video_frames
        if len(vf) != self.videos or sum(vf.values()) != self.frames:
            raise field_error("video_frames", "disagrees with videos / frames")
        return self


_LABELLED, _UNLABELLED = "<labelled split>", "<unlabelled split>"
TAGS = frozenset((_LABELLED, _UNLABELLED))


def _split_kind(value: Any) -> str:
    if isinstance(value, dict):
        return _LABELLED if value.get("unlabeled", False) is False else _UNLABELLED
    return _UNLABELLED if isinstance(value, UnlabelledSplit) else _LABELLED


Split = Annotated[
    Annotated[LabelledSplit, Tag(_LABELLED)] | Annotated[UnlabelledSplit, Tag(_UNLABELLED)],
    Discriminator(_split_kind),
]


class PackInputs(ManifestModel):
    """Where the release was read from (absent: not given)."""

    images: Text
    annotations: Text | None = None
    mtl_files: dict[str, str] | None = None
    test_lists: list[str] | None = None
    videos: Text | None = None
    frame_counts: Text | None = None


class PackParams(ManifestModel):
    """How the pack was cut; part of its fingerprint."""

    segment_len: Positive
    shard_size: Positive
    shuffle_seed: Annotated[int, Field(strict=True)]
    shuffled_splits: list[str] = Field(default_factory=lambda: ["train"])
    skip_bad_rows: StrictBool
    source: Text  # "abaw", "mtl-track" or "test-lists"
    sample_format: Text | None = None


class PackManifest(SplitsManifest):
    """A packed data root's ``manifest.json``."""

    format: Literal["mtl-shards/1"] = FORMAT
    params: PackParams
    inputs: PackInputs
    splits: dict[str, Split] = Field(min_length=1)
    unlabeled_videos: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    _path: Path | None = PrivateAttr(None)

    @property
    def path(self) -> Path:
        """The file it was read from or written to (``manifest.json`` when neither)."""
        return self._path or Path(MANIFEST)

    def split(self, name: str) -> LabelledSplit | UnlabelledSplit:
        """One split with samples; DataError listing the splits there are when it is absent or empty."""
        if name not in self.splits:
            raise DataError(f"{self.path}: no split {name!r} (have {', '.join(self.splits)})")
        entry = self.splits[name]
        if entry.samples == 0:
            raise DataError(f"{self.path}: split {name!r} has no samples")
        return entry


# ------------------------------------------------------------------------------------------------ file


def write_manifest(root: Path, manifest: PackManifest) -> Path:
    """Atomic write; the manifest appears only once every shard it lists is complete."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    text = json.dumps(manifest.model_dump(mode="json", exclude_none=True), indent=1)
    text = _NUMBER_LIST.sub(lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)  # one line per list
    try:
        with naming(tmp):
            tmp.write_text(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    manifest._path = path
    return path


def read_manifest(root: str | Path) -> PackManifest:
    """The checked manifest of a packed data root; DataError naming the file and the field when missing or bad."""
    root = Path(root)
    hint = " (an interrupted pack? rerun `mtl pack`)" if (root / ".pack-plan.json").exists() else ""
    manifest = read_json_model(root, PackManifest, FORMAT, f"a directory written by `mtl pack`?{hint}", TAGS)
    manifest._path = root / MANIFEST
    return manifest
