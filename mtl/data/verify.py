"""`mtl shards verify DIR`: read every shard back and check it against the manifest.

Per shard: the file exists, its size and sha256 match, it reads as a tar to the end (a truncated copy does not),
every sample is well formed with the frame count the manifest says, and every JPEG decodes. Reading uses
webdataset's streaming tar iterator, the way a remote reader would see the file.

Per split (``stats_problems``): the statistics the manifest holds (frames, images, frames per video, and per task
the labelled frames and the class/positive counts that set the loss weights) are summed again from the samples.
"""

from __future__ import annotations

import concurrent.futures as cf
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mtl.data.jpeg import jpeg_problem  # the loader's own decoder
from mtl.data.manifest import ShardRecord, file_sha256, read_manifest
from mtl.data.pool import process_pool
from mtl.data.shardio import Sample, parse_sample
from mtl.data.video_index import label_stats
from mtl.errors import DataError
from mtl.tasks import get_task, tasks

MAX_REASONS = 5


@dataclass
class ShardReport:
    path: str
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    frames: int = 0
    jpegs: int = 0
    stats: dict = field(default_factory=dict)  # this shard's part of its split's statistics (``sample_stats``)

    @property
    def ok(self) -> bool:
        return not self.problems


def sample_stats(sample: Sample, into: dict) -> None:
    """Add one sample to statistics laid out as the manifest's: ``images``, ``video_frames``, and per task
    ``labeled_frames`` and ``labeled_missing_image`` and the task's count fields (over labelled frames with an
    image, as `mtl pack` counts them)."""
    into["images"] = into.get("images", 0) + int(sample.has_image.sum())
    into.setdefault("video_frames", Counter())[sample.video] += len(sample)
    for name, stats in label_stats(sample.labels, sample.has_image).items():
        st = into.setdefault("tasks", {}).setdefault(name, {})
        for k, v in stats.items():
            st[k] = st.get(k, 0) + v


def check_shard(root: str, entry: ShardRecord) -> ShardReport:
    """All checks of one shard; problems are collected (up to a few), not raised."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    rep = ShardReport(entry.path)
    path = Path(root) / entry.path
    if not path.is_file():
        rep.problems.append("file missing")
        return rep
    digest = file_sha256(path)
    size = path.stat().st_size
    if entry.bytes is not None and size != entry.bytes:
        rep.problems.append(f"size {size} bytes, manifest says {entry.bytes}")
    if digest != entry.sha256:
        rep.problems.append(f"sha256 {digest[:12]}... does not match the manifest's {entry.sha256[:12]}...")
    expected = entry.sample_frames

    def files():
        with open(path, "rb") as f:
            for item in tar_file_iterator(f):
                item["__url__"] = str(path)
                yield item

    try:
        for raw in group_by_keys(files()):
            i = rep.samples
            rep.samples += 1
            sample = parse_sample(raw, entry.path)
            sample_stats(sample, rep.stats)
            if raw["__key__"] != f"{i:06d}":
                rep.problems.append(f"sample {i} has key {raw['__key__']}")
            if i < len(expected) and len(sample) != expected[i]:
                rep.problems.append(f"sample {raw['__key__']} has {len(sample)} frames, manifest says {expected[i]}")
            rep.frames += len(sample)
            buf = memoryview(sample.blob)
            for j in range(len(sample)):
                a, b = int(sample.offsets[j]), int(sample.offsets[j + 1])
                if a == b:
                    continue
                rep.jpegs += 1
                problem = jpeg_problem(buf[a:b])
                if problem is not None and len(rep.problems) < MAX_REASONS:
                    rep.problems.append(f"sample {raw['__key__']} frame {sample.frames[j]}: JPEG does not decode "
                                        f"({problem})")  # fmt: skip
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        rep.problems.append(f"unreadable after {rep.samples} samples: {exc}")
    except DataError as exc:
        rep.problems.append(str(exc))
    if rep.samples != entry.samples:
        rep.problems.append(f"{rep.samples} samples, manifest says {entry.samples}")
    if rep.frames != entry.frames and not rep.problems:
        rep.problems.append(f"{rep.frames} frames, manifest says {entry.frames}")
    return rep


def verify(root: str | Path, workers: int = 1, progress: bool = True) -> list[ShardReport]:
    """One report per shard listed in the manifest, in manifest order."""
    root = Path(root)
    entries = read_manifest(root).shards()
    bar = tqdm(total=len(entries), desc="verify", unit="shard", disable=not progress)
    reports: dict[str, ShardReport] = {}
    try:
        if workers <= 1:
            for e in entries:
                reports[e.path] = check_shard(str(root), e)
                bar.update(1)
        else:
            with process_pool(workers) as pool:
                futs = {pool.submit(check_shard, str(root), e): e.path for e in entries}
                for fut in cf.as_completed(futs):
                    reports[futs[fut]] = fut.result()
                    bar.update(1)
    finally:
        bar.close()
    return [reports[e.path] for e in entries]


def _add(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _add(total.setdefault(k, Counter() if isinstance(v, Counter) else {}), v)
        else:
            total[k] = total.get(k, 0) + v


def _figures(images: Any, video_frames: dict, task_stats: dict, names: list[str]) -> dict[str, Any]:
    """A split's checked statistics as ``key -> value`` (JSON-like values), for tasks ``names``."""
    out = {"images": images, "video_frames": {v: int(n) for v, n in video_frames.items() if n}}
    for name in names:
        st = task_stats.get(name, {})
        for k in ("labeled_frames", "labeled_missing_image", *get_task(name).count_fields()):
            out[f"tasks.{name}.{k}"] = np.asarray(st.get(k, 0)).tolist()
    return out


def stats_problems(root: str | Path, reports: list[ShardReport]) -> list[str]:
    """Where the manifest's statistics of a split differ from the sums over its samples (``splits.<split>.<key>:
    manifest X, samples Y``); a split with an unreadable shard is skipped (that shard is reported already). An
    unlabelled split (the test set) has no task statistics: its images and frames per video are checked."""
    manifest = read_manifest(root)
    by_path = {r.path: r for r in reports}
    problems = []
    for split, entry in manifest.splits.items():
        parts = [by_path.get(sh.path) for sh in entry.shards]
        if not all(r is not None and r.ok for r in parts):
            continue
        total: dict = {}
        for r in parts:
            _add(total, r.stats)
        stats = {name: st.model_dump() for name, st in entry.tasks.items()}
        names = [t.name for t in tasks() if t.name in stats]
        recorded = _figures(entry.images, entry.video_frames, stats, names)
        found = _figures(total.get("images", 0), total.get("video_frames", {}), total.get("tasks", {}), names)
        for key, want in recorded.items():
            if want is not None and want != found[key]:
                problems.append(f"splits.{split}.{key}: manifest {_short(want)}, samples {_short(found[key])}")
    return problems


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "..."


def stray_files(root: str | Path) -> list[str]:
    """Shard-like files the manifest does not list (leftover .tmp, shards of an older pack)."""
    root = Path(root)
    manifest = read_manifest(root)
    listed = {sh.path for sh in manifest.shards()}
    out = []
    for split in manifest.splits:
        for p in sorted((root / split).glob("*")):
            rel = f"{split}/{p.name}"
            if rel not in listed and (p.suffix in (".tar", ".tmp")):
                out.append(rel)
    return out
