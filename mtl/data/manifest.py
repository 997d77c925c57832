"""``manifest.json``: what `mtl pack` wrote, read back and checked once so every consumer can trust its fields.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from mtl.errors import DataError, naming
from mtl.tasks import get_task, task_names

FORMAT = "mtl-shards/1"
_NUMBER_LIST = re.compile(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]")
MANIFEST = "manifest.json"


def file_sha256(path: str | Path) -> str:
    """The hash a manifest records per shard (`mtl pack`) and checks again (`mtl shards verify`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path, manifest: dict) -> Path:
    """Atomic write; the manifest appears only once every shard it lists is complete."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    text = json.dumps(manifest, indent=1)
    text = _NUMBER_LIST.sub(lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)  # one line per list
    try:
        with naming(tmp):
            tmp.write_text(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_manifest_json(root: Path, fmt: str, what: str) -> dict[str, Any]:
    """``root/manifest.json`` parsed, a mapping of format ``fmt``; DataError naming the file otherwise (``what``:
    the end of "is ROOT ..." when it is missing)."""
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found; is {root} {what}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    need(isinstance(manifest, dict), path, "top level", "expected a mapping")
    need(manifest.get("format") == fmt, path, "format", f"expected {fmt!r}, got {manifest.get('format')!r}")
    return manifest


def need(cond: bool, path: Path, key: str, what: str) -> None:
    """A manifest check: DataError naming the file and the key when ``cond`` fails."""
    if not cond:
        raise DataError(f"{path}: {key}: {what}")


def is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_split(path: Path, name: str, s: Any) -> None:
    key = f"splits.{name}"
    need(isinstance(s, dict), path, key, "expected a mapping")
    for k in ("videos", "frames", "samples"):
        need(is_count(s.get(k)), path, f"{key}.{k}", "expected a non-negative integer")
    shards = s.get("shards")
    need(isinstance(shards, list), path, f"{key}.shards", "expected a list")
    for i, sh in enumerate(shards):
        sk = f"{key}.shards[{i}]"
        need(isinstance(sh, dict), path, sk, "expected a mapping")
        need(isinstance(sh.get("path"), str), path, f"{sk}.path", "expected a string")
        need(isinstance(sh.get("sha256"), str) and len(sh["sha256"]) == 64, path, f"{sk}.sha256", "expected a hash")
        for k in ("samples", "frames"):
            need(is_count(sh.get(k)), path, f"{sk}.{k}", "expected a non-negative integer")
        sf = sh.get("sample_frames")
        need(
            isinstance(sf, list) and len(sf) == sh["samples"] and all(is_count(x) and x > 0 for x in sf),
            path,
            f"{sk}.sample_frames",
            "expected one positive frame count per sample",
        )
        need(sum(sf) == sh["frames"], path, f"{sk}.frames", "does not match the sum of sample_frames")
    need(sum(sh["samples"] for sh in shards) == s["samples"], path, f"{key}.samples", "disagrees with the shards")
    need(sum(sh["frames"] for sh in shards) == s["frames"], path, f"{key}.frames", "disagrees with the shards")
    if s.get("unlabeled", False) is not False:
        _check_unlabeled(path, key, s)
        return
    tasks = s.get("tasks")
    need(isinstance(tasks, dict), path, f"{key}.tasks", "expected a mapping")
    # Every task packed is checked if it is registered here; a task registered after the pack is simply absent.
    need(any(t in tasks for t in task_names()), path, f"{key}.tasks", f"none of the tasks {', '.join(task_names())}")
    for name in task_names():
        if name not in tasks:
            continue
        t, tk = tasks[name], f"{key}.tasks.{name}"
        need(isinstance(t, dict), path, tk, "expected a mapping")
        for k in ("labeled_frames", "labeled_missing_image"):
            need(is_count(t.get(k)), path, f"{tk}.{k}", "expected a non-negative integer")
        for k, n in get_task(name).count_fields().items():
            v = t.get(k)
            need(
                isinstance(v, list) and len(v) == n and all(is_count(x) for x in v),
                path,
                f"{tk}.{k}",
                f"expected {n} non-negative integers",
            )


def _check_unlabeled(path: Path, key: str, s: dict) -> None:
    need(s["unlabeled"] is True, path, f"{key}.unlabeled", "expected true or absent")
    for k in ("images", "frames_without_image"):
        need(is_count(s.get(k)), path, f"{key}.{k}", "expected a non-negative integer")
    need(s["images"] + s["frames_without_image"] == s["frames"], path, f"{key}.frames_without_image",
          "images + frames_without_image should equal frames")  # fmt: skip
    vf = s.get("video_frames")
    need(isinstance(vf, dict) and all(is_count(n) and n > 0 for n in vf.values()), path, f"{key}.video_frames",
          "expected a mapping of video to frame count")  # fmt: skip
    need(len(vf) == s["videos"] and sum(vf.values()) == s["frames"], path, f"{key}.video_frames",
          "disagrees with videos / frames")  # fmt: skip
    lists = s.get("lists")
    need(isinstance(lists, dict) and bool(lists), path, f"{key}.lists", "expected a non-empty mapping")
    for track, e in lists.items():
        lk = f"{key}.lists.{track}"
        need(isinstance(e, dict), path, lk, "expected a mapping")
        need(isinstance(e.get("path"), str), path, f"{lk}.path", "expected a string")
        need(isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64, path, f"{lk}.sha256", "expected a hash")
        for k in ("videos", "rows"):
            need(is_count(e.get(k)), path, f"{lk}.{k}", "expected a non-negative integer")


def read_manifest(root: str | Path) -> dict:
    """The validated manifest of a packed data root; DataError naming the file and key when missing or bad."""
    root = Path(root)
    hint = " (an interrupted pack? rerun `mtl pack`)" if (root / ".pack-plan.json").exists() else ""
    path, manifest = root / MANIFEST, load_manifest_json(root, FORMAT, f"a directory written by `mtl pack`?{hint}")
    need(isinstance(manifest.get("params"), dict), path, "params", "expected a mapping")
    splits = manifest.get("splits")
    need(isinstance(splits, dict) and bool(splits), path, "splits", "expected a non-empty mapping")
    for name, s in splits.items():
        _check_split(path, name, s)
    return manifest


def split_entry(manifest: dict, split: str, root: str | Path) -> dict:
    """One split of a manifest; DataError listing the splits there are when it is absent or empty."""
    splits = manifest["splits"]
    if split not in splits:
        raise DataError(f"{Path(root) / MANIFEST}: no split {split!r} (have {', '.join(splits)})")
    entry = splits[split]
    if entry["samples"] == 0:
        raise DataError(f"{Path(root) / MANIFEST}: split {split!r} has no samples")
    return entry
