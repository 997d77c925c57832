"""`mtl pack`: an Aff-Wild2 release (images + ABAW tree or MTL-track files) -> WebDataset shards + manifest.json.

Each split's videos are cut into segments of ``segment_len`` consecutive frames (a tail shorter than half a segment
joins the one before it, so no sample is a few frames long). Segments are samples; ``shard_size`` samples make a
shard. The train split's samples are put in a seeded random order before sharding, so any shard mixes many videos
and a streaming reader with a small shuffle buffer still sees varied batches; other splits stay in (video, frame)
order for evaluation.

Restartable: the plan (a function of the inputs and parameters only) is fingerprinted in ``.pack-plan.json``;
shards are written to ``.tmp`` and renamed when complete, so a rerun after an interruption keeps every ``*.tar``
it finds (untouched) and writes only the rest. A rerun with other input or parameters (a bad image fixed) after a
pack that never finished starts over; only a finished pack (one with its manifest) needs ``--overwrite``.
Same input -> byte-identical shards, whatever the worker count.

Every frame is decoded (the loader's decoder) before it goes into a shard: a truncated or corrupt JPEG is an error
naming its file, or with ``skip_bad_rows`` a frame without an image, counted and listed in the manifest.

``pack(PackOptions(...))`` runs three steps: ``plan_pack`` (read the labels, scan the images, cut samples and
shards: nothing written), ``write_pack_shards`` (the shards, resuming), ``pack_manifest`` (the typed
``PackManifest``, written last).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtl.data import testset
from mtl.data.jpeg import jpeg_problem
from mtl.data.labels import MAX_LISTED_BAD_ROWS, ParseLog, SplitLabels, VideoLabels
from mtl.data.manifest import (
    FORMAT,
    MANIFEST,
    LabelledSplit,
    PackInputs,
    PackManifest,
    PackParams,
    ShardRecord,
    TaskStats,
    UnlabelledSplit,
    file_sha256,
    write_manifest,
)
from mtl.data.pool import process_pool
from mtl.data.shardio import JPEG_MAGIC, encode_sample, label_meta, parse_sample, read_raw, write_shard
from mtl.errors import DataError, MtlError, naming
from mtl.tasks import tasks

PLAN_FILE = ".pack-plan.json"
_FRAME_NAME = re.compile(r"^(\d+)\.jpg$", re.IGNORECASE)


def _label_keys() -> tuple[str, ...]:
    return tuple(k for t in tasks() for k in (t.name, t.valid_key))


# ------------------------------------------------------------------------------------------------ images


@dataclass
class VideoImages:
    """The JPEGs of one ``cropped_aligned/<video>`` folder: frame numbers, sizes, mtimes, and odd file names."""

    folder: Path | None
    frames: np.ndarray  # int64, sorted
    sizes: np.ndarray
    mtimes: np.ndarray
    names: dict[int, str] | None  # None when every name is the usual NNNNN.jpg

    @property
    def last(self) -> int:
        return int(self.frames[-1]) if len(self.frames) else 0

    def name(self, frame: int) -> str:
        return self.names[frame] if self.names is not None else f"{frame:05d}.jpg"


def scan_video(folder: Path) -> VideoImages:
    if not folder.is_dir():
        return VideoImages(None, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), None)
    rows = []
    for entry in os.scandir(folder):
        m = _FRAME_NAME.match(entry.name)
        if not m or not entry.is_file():
            continue
        frame = int(m.group(1))
        if frame < 1:
            continue
        st = entry.stat()
        if st.st_size == 0:
            raise DataError(f"{folder / entry.name}: empty image file (delete it: the frame then has no image)")
        rows.append((frame, st.st_size, st.st_mtime_ns, entry.name))
    rows.sort()
    for a, b in zip(rows, rows[1:]):
        if a[0] == b[0]:
            raise DataError(f"{folder}: frame {a[0]} has two images ({a[3]}, {b[3]})")
    frames = np.array([r[0] for r in rows], np.int64)
    names = {r[0]: r[3] for r in rows}
    usual = all(name == f"{f:05d}.jpg" for f, name in names.items())
    return VideoImages(
        folder,
        frames,
        np.array([r[1] for r in rows], np.int64),
        np.array([r[2] for r in rows], np.int64),
        None if usual else names,
    )


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class PackedVideo:
    name: str
    n: int  # frames 1..n
    labels: dict[str, np.ndarray]  # dense, see VideoLabels.dense
    has_image: np.ndarray  # bool [n]
    images: VideoImages
    tasks: tuple[str, ...]  # tasks with an annotation for this video

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.name}|{self.n}|{','.join(self.tasks)}".encode())
        for k in _label_keys():
            h.update(np.ascontiguousarray(self.labels[k]).tobytes())
        for arr in (self.images.frames, self.images.sizes, self.images.mtimes):
            h.update(arr.tobytes())
        if self.images.names is not None:
            h.update(json.dumps(sorted(self.images.names.items())).encode())
        return h.hexdigest()


def build_video(name: str, labels, images: VideoImages) -> PackedVideo:
    n = max(labels.rows, images.last)
    dense = labels.dense(n)
    for t in tasks():
        dense[t.name] = dense[t.name].astype(t.pack_dtype)
    has_image = np.zeros(n, bool)
    has_image[images.frames - 1] = True
    return PackedVideo(name, n, dense, has_image, images, tuple(t.name for t in tasks() if t.name in labels.tasks))


def segments(n: int, segment_len: int) -> list[tuple[int, int]]:
    """[(start, stop)) 0-based frame ranges; a tail shorter than half a segment joins the previous one."""
    cuts = list(range(0, n, segment_len)) + [n]
    spans = list(zip(cuts, cuts[1:]))
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < segment_len / 2:
        (a, _), (_, d) = spans[-2], spans[-1]
        spans[-2:] = [(a, d)]
    return spans


def plan_split(videos: list[PackedVideo], segment_len: int, shuffle: bool, seed: int) -> list[tuple[int, int, int]]:
    """(video index, start, stop) per sample, in the order they go into shards."""
    samples = [(i, a, b) for i, v in enumerate(videos) for a, b in segments(v.n, segment_len)]
    if shuffle:
        order = np.random.default_rng([seed, 0x9ACC]).permutation(len(samples))
        samples = [samples[i] for i in order]
    return samples


# ------------------------------------------------------------------------------------------------ writing


_FIX = "replace or delete it (the frame then has no image), or pass --skip-bad-rows"


def _jpeg_fault(data: bytes) -> str | None:
    """Why the loader could not use these bytes as a frame, or None."""
    if not data.startswith(JPEG_MAGIC):
        return "not a JPEG file"
    problem = jpeg_problem(data)
    return None if problem is None else f"JPEG does not decode ({problem})"


def _frame_jpeg(path: Path, skip_bad: bool, bad: list[list]) -> bytes | None:
    """The file's bytes if the loader's decoder reads it to the end; else a DataError naming it, or under
    ``skip_bad`` None (the frame has no image) with [video, frame, reason] appended to ``bad``."""
    data = path.read_bytes()
    fault = _jpeg_fault(data)
    if fault is None:
        return data
    if not skip_bad:
        raise DataError(f"{path}: {fault}; {_FIX}")
    bad.append([path.parent.name, int(_FRAME_NAME.match(path.name).group(1)), f"{path}: {fault}"])
    return None


def write_shard_job(job: dict) -> dict:
    """Runs in a pack worker: read and decode the JPEGs of one shard's samples and write the shard."""
    samples, bad = [], []
    for i, s in enumerate(job["samples"]):
        jpegs = [None if name is None else _frame_jpeg(Path(s["folder"]) / name, job["skip_bad"], bad)
                 for name in s["names"]]  # fmt: skip
        meta = {"video": s["video"], "frames": s["frames"], **label_meta(s["labels"])}
        samples.append(encode_sample(i, meta, jpegs))
    path = Path(job["path"])
    write_shard(path, samples)
    return {"path": job["rel"], "bytes": path.stat().st_size, "sha256": file_sha256(path), "bad_images": bad}


def finished_shard(job: dict) -> dict:
    """``write_shard_job``'s result for a shard an interrupted run finished: hashed, and under ``skip_bad`` its
    skipped frames (an image in the plan, none in the shard) found and their files' reasons read again."""
    path = Path(job["path"])
    res = {"path": job["rel"], "bytes": path.stat().st_size, "sha256": file_sha256(path), "bad_images": []}
    if job["skip_bad"]:
        for raw, planned in zip(read_raw(path), job["samples"]):
            s = parse_sample(raw, str(path))
            for name, frame, has in zip(planned["names"], s.frames.tolist(), s.has_image.tolist()):
                src = Path(planned["folder"]) / str(name)
                if name is not None and not has and _frame_jpeg(src, True, res["bad_images"]) is not None:
                    res["bad_images"].append([s.video, frame, f"{src}: skipped by an earlier, interrupted run"])
    return res


def _shard_jobs(
    out: Path, split: str, videos: list[PackedVideo], plan, shard_size: int, skip_bad: bool = False
) -> Iterator[dict]:
    for k, start in enumerate(range(0, len(plan), shard_size)):
        rel = f"{split}/{k:06d}.tar"
        samples = []
        for vi, a, b in plan[start : start + shard_size]:
            v = videos[vi]
            frames = list(range(a + 1, b + 1))
            samples.append(
                {
                    "video": v.name,
                    "folder": str(v.images.folder) if v.images.folder else "",
                    "frames": frames,
                    "names": [v.images.name(f) if v.has_image[f - 1] else None for f in frames],
                    "labels": {key: v.labels[key][a:b] for key in _label_keys()},
                }
            )
        yield {
            "rel": rel,
            "path": str(out / rel),
            "samples": samples,
            "frames": [len(s["frames"]) for s in samples],
            "images": sum(sum(n is not None for n in s["names"]) for s in samples),
            "skip_bad": skip_bad,
        }


def _run_jobs(jobs: list[dict], workers: int, progress: bool, done: dict[str, dict]) -> None:
    """Write the shards not already done, ``workers`` at a time, at most 2 per worker queued (memory)."""
    todo = [j for j in jobs if j["rel"] not in done]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="pack", unit="shard", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                done[job["rel"]] = write_shard_job(job)
                bar.update(1)
            return
        with process_pool(workers) as pool:
            pending: set[cf.Future] = set()
            it = iter(todo)
            try:
                while True:
                    while len(pending) < 2 * workers:
                        job = next(it, None)
                        if job is None:
                            break
                        pending.add(pool.submit(write_shard_job, job))
                    if not pending:
                        break
                    finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        res = fut.result()
                        done[res["path"]] = res
                        bar.update(1)
            except BaseException:  # an error or Ctrl-C: start nothing more
                for p in pending:
                    p.cancel()
                raise
    except BrokenProcessPool:
        raise MtlError(
            f"a pack worker process died (killed, or out of memory with --workers {workers}); "
            "rerun the same `mtl pack` to continue where it stopped"
        ) from None
    finally:
        bar.close()


def _drop_bad_images(jobs: list[dict], done: dict[str, dict], per_split: dict[str, list[PackedVideo]]) -> dict:
    """Frames whose JPEG was skipped (``skip_bad_rows``) lose their image in the plan's counts too, so the
    manifest's statistics describe the shards; returns each split's skipped files, as messages."""
    out: dict[str, list[str]] = {split: [] for split in per_split}
    by_name = {(split, v.name): v for split, vids in per_split.items() for v in vids}
    for job in jobs:
        split = job["rel"].split("/")[0]
        for video, frame, msg in done[job["rel"]]["bad_images"]:
            by_name[split, video].has_image[frame - 1] = False
            job["images"] -= 1
            out[split].append(msg)
    return out


# ------------------------------------------------------------------------------------------------ state


def _unfinished_pack(out: Path, splits: list[str]) -> bool:
    """True if ``out`` holds what a pack that never finished left (its plan, no manifest): shards of no use to
    anyone, removed so a rerun with fixed input or other parameters starts over instead of being refused."""
    if not (out / PLAN_FILE).is_file() or (out / MANIFEST).exists():
        return False
    print(f"mtl pack: note: {out} holds an unfinished pack of other input or parameters; starting over",
          file=sys.stderr)  # fmt: skip
    for name in ("train", "val", *splits):
        for pattern in ("*.tar", "*.tmp"):
            for path in (out / name).glob(pattern):
                path.unlink()
    return True


def _prepare_out(out: Path, fingerprint: str, overwrite: bool, splits: list[str]) -> None:
    """Refuse to mix two different packs in one folder; drop leftovers of an interrupted write."""
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError, AttributeError):
            old = None
        same = old == fingerprint or _unfinished_pack(out, splits)
    else:
        old_tars = any(any((out / s).glob("*.tar")) for s in ("train", "val", testset.SPLIT, *splits))
        same = not (out / MANIFEST).exists() and not old_tars
    if not same:
        if not overwrite:
            raise DataError(
                f"{out} holds a pack of other input or parameters; pass --overwrite to replace it, or another --out"
            )
        for name in ("train", "val", testset.SPLIT, *splits):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        (out / MANIFEST).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (out / split).mkdir(exist_ok=True)
        for tmp in (out / split).glob("*.tmp"):
            tmp.unlink()
    tmp = plan_path.with_name(PLAN_FILE + ".tmp")
    with naming(tmp):
        tmp.write_text(json.dumps({"format": FORMAT, "fingerprint": fingerprint}) + "\n")
    os.replace(tmp, plan_path)


# ------------------------------------------------------------------------------------------------ stats


def split_stats(videos: list[PackedVideo]) -> dict:
    stats: dict[str, TaskStats] = {}
    for t in tasks():
        st = {"videos": 0, "labeled_frames": 0, "labeled_missing_image": 0}
        counts = {k: np.zeros(n, np.int64) for k, n in t.count_fields().items()}
        for v in videos:
            valid = v.labels[t.valid_key]
            st["videos"] += t.name in v.tasks
            st["labeled_frames"] += int((valid & v.has_image).sum())
            st["labeled_missing_image"] += int((valid & ~v.has_image).sum())
            for k, c in t.counts(v.labels[t.name][valid & v.has_image]).items():
                counts[k] += c
        stats[t.name] = TaskStats(**st, **{k: c.tolist() for k, c in counts.items()})
    return {
        "videos": len(videos),
        "frames": int(sum(v.n for v in videos)),
        "images": int(sum(int(v.has_image.sum()) for v in videos)),
        "tasks": stats,
        "video_frames": {v.name: v.n for v in videos},
        "videos_without_images": [v.name for v in videos if not len(v.images.frames)],
    }


# ------------------------------------------------------------------------------------------------ test set


@dataclass
class ListedTestSet:
    """The unlabelled split ``test``: its videos, the organisers' lists, and where each frame count came from."""

    videos: list[PackedVideo]
    lists: list[testset.TrackList]
    count_sources: dict[str, str]
    skipped: list[str]  # listed videos without frames (under skip_bad_rows), as messages


def unlabelled_video(name: str, n: int, images: VideoImages) -> PackedVideo:
    """Frames 1..n of a test video, no labels; a frame without a crop has no image (the model masks it)."""
    dense = VideoLabels().dense(n)
    for t in tasks():
        dense[t.name] = dense[t.name].astype(t.pack_dtype)
    has_image = np.zeros(n, bool)
    has_image[images.frames - 1] = True
    return PackedVideo(name, n, dense, has_image, images, ())


def build_test_split(
    images: Path,
    test_lists: list[str],
    videos_dir: Path | None,
    frame_counts: Path | None,
    labelled: dict[str, str],
    log: ParseLog,
) -> ListedTestSet:
    """Every video of the organisers' lists with its frames folder; one without is an error (skipped and counted
    under ``skip_bad_rows``); a test video that is also labelled is an error."""
    lists = testset.read_test_lists(test_lists)
    listed_in: dict[str, list[str]] = {}
    highest: dict[str, int] = {}
    for lst in lists:
        for v in lst.videos:
            listed_in.setdefault(v, []).append(lst.source)
        for v, f in lst.frames:
            highest[v] = max(highest.get(v, 0), f)
    found: dict[str, VideoImages] = {}
    skipped = []
    for v in sorted(listed_in):
        if v in labelled:
            raise DataError(f"{listed_in[v][0]}: test video {v} is also labelled (in the {labelled[v]} split)")
        img = scan_video(images / v)
        if img.folder is None or len(img.frames) == 0:
            what = "no frames folder" if img.folder is None else "an empty frames folder"
            msg = f"{images / v}: {what} for test video {v} (listed in {', '.join(listed_in[v])})"
            if not log.skip_bad_rows:
                raise DataError(f"{msg}; use --skip-bad-rows to skip it (its rows are then missing from submissions)")
            skipped.append(msg)
            log.warnings.append(f"{msg}: skipped")
            continue
        found[v] = img
        highest[v] = max(highest.get(v, 0), img.last)
    if not found:
        raise DataError(f"{images}: none of the {len(listed_in)} test videos has a frames folder here")
    counts = testset.frame_counts(list(found), highest, videos_dir, frame_counts, log.warnings)
    videos = [unlabelled_video(v, counts.counts[v], img) for v, img in found.items()]
    return ListedTestSet(videos, lists, counts.sources, skipped)


def unlabelled_entry(out: Path, test: ListedTestSet, samples: int, shards: list[ShardRecord]) -> UnlabelledSplit:
    """The manifest's entry of the unlabelled split: shards as any split's, no task stats; frames without an image,
    the lists (copied into the pack) and where the frame counts came from."""
    frames = sum(v.n for v in test.videos)
    images = sum(int(v.has_image.sum()) for v in test.videos)
    video_frames = {v.name: v.n for v in test.videos}
    sources: dict[str, int] = {}
    for source in test.count_sources.values():
        sources[source] = sources.get(source, 0) + 1
    return UnlabelledSplit(
        videos=len(test.videos),
        frames=frames,
        images=images,
        frames_without_image=frames - images,
        samples=samples,
        shards=shards,
        video_frames=video_frames,
        frame_counts_from=dict(sorted(sources.items())),
        lists=testset.write_lists(out, test.lists, video_frames),
        videos_skipped=len(test.skipped),
        skipped_videos=test.skipped,
    )


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class PackOptions:
    """What `mtl pack` packs, where to, and how: the command's flags, as one value.

    ``images``: the ``cropped_aligned`` folder. ``annotations``: the folder holding the ``<Task>_Challenge``
    folders, or None with ``mtl_files={"train": file, "val": file}`` for the MTL track's single-file format.
    ``test_lists``: the organisers' test lists (``FILE`` or ``TRACK=FILE``), packed as the unlabelled split
    ``test`` (alone, or beside the labelled splits), frame counts from ``videos_dir`` or ``frame_counts``.
    """

    images: Path
    annotations: Path | None
    out: Path
    segment_len: int = 64
    shard_size: int = 256
    workers: int = 1
    skip_bad_rows: bool = False
    _: KW_ONLY
    mtl_files: dict[str, Path] | None = None
    test_lists: list[str] | None = None
    videos_dir: Path | None = None
    frame_counts: Path | None = None
    shuffle_seed: int = 0
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        """DataError on a value no pack can be made with, before anything is read or written."""
        for name, low in (("segment_len", 1), ("shard_size", 1), ("workers", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if not Path(self.images).is_dir():
            raise DataError(f"images folder not found: {self.images}")

    def params(self) -> PackParams:
        """The parameters the manifest records (and the plan's fingerprint covers)."""
        source = "abaw" if self.annotations is not None else "mtl-track" if self.mtl_files else "test-lists"
        return PackParams(
            segment_len=self.segment_len,
            shard_size=self.shard_size,
            shuffle_seed=self.shuffle_seed,
            shuffled_splits=["train"],
            skip_bad_rows=self.skip_bad_rows,
            source=source,
            sample_format="key.json (labels) + key.jpgs (concatenated original JPEGs)",
        )

    def inputs(self) -> PackInputs:
        """Where the release was read from, as the manifest records it."""
        inputs = PackInputs(images=str(self.images))
        if self.annotations is not None:
            inputs.annotations = str(self.annotations)
        elif self.mtl_files:
            inputs.mtl_files = {k: str(v) for k, v in sorted(self.mtl_files.items())}
        if self.test_lists:
            inputs.videos = str(self.videos_dir) if self.videos_dir else None
            inputs.frame_counts = str(self.frame_counts) if self.frame_counts else None
        return inputs


# ------------------------------------------------------------------------------------------------ plan


def _read_labels(annotations: Path | None, mtl_files: dict[str, Path] | None, log: ParseLog) -> SplitLabels:
    if (annotations is None) == (not mtl_files):
        raise DataError("give either an ABAW annotations folder or MTL-track files (not both, not neither)")
    if annotations is not None:
        from mtl.data.abaw import parse_abaw

        return parse_abaw(Path(annotations), log)
    from mtl.data.mtl_track_file import parse_mtl

    return parse_mtl({k: Path(v) for k, v in mtl_files.items()}, log)


@dataclass
class PackPlan:
    """Everything a pack will write, decided from its inputs and options alone (nothing written yet)."""

    opts: PackOptions
    log: ParseLog  # bad rows, skipped files and warnings met while reading the inputs
    per_split: dict[str, list[PackedVideo]]
    test: ListedTestSet | None
    unlabeled_videos: list[str]  # image folders no split lists
    params: PackParams
    fingerprint: str  # of the parameters and every video's labels and image files
    samples: dict[str, list[tuple[int, int, int]]]  # split -> (video index, start, stop) in shard order
    jobs: list[dict]  # one per shard, all splits


def _videos(opts: PackOptions, log: ParseLog) -> tuple[dict[str, list[PackedVideo]], ListedTestSet | None, set[str]]:
    """Each split's videos with their labels and images, the test split, and the image folders found."""
    images = Path(opts.images)
    use_labels = opts.annotations or opts.mtl_files or not opts.test_lists
    labels = _read_labels(opts.annotations, opts.mtl_files, log) if use_labels else {}
    image_dirs = {e.name for e in os.scandir(images) if e.is_dir()}
    per_split: dict[str, list[PackedVideo]] = {}
    for split, vids in labels.items():
        if vids:
            per_split[split] = [build_video(name, vids[name], scan_video(images / name)) for name in sorted(vids)]
    test = None
    if opts.test_lists:
        labelled = {v.name: split for split, vs in per_split.items() for v in vs}
        test = build_test_split(images, opts.test_lists, opts.videos_dir, opts.frame_counts, labelled, log)
        per_split[testset.SPLIT] = test.videos
    if not per_split:
        raise DataError(f"no labelled video found in {opts.annotations or opts.mtl_files}")
    return per_split, test, image_dirs


def _warn_imageless(images: Path, videos: list[PackedVideo], log: ParseLog) -> None:
    """A video without any image (no folder, or an empty one) packs, all frames masked, with a warning; if no
    video has an image there is nothing to learn from: an error."""
    if all(not len(v.images.frames) for v in videos):
        raise DataError(f"{images}: none of the {len(videos)} labelled videos has an image here")
    for v in videos:
        if v.images.folder is None:
            log.warnings.append(f"{images / v.name}: no image folder; all {v.n} frames of {v.name} have no image")
        elif not len(v.images.frames):
            log.warnings.append(f"{images / v.name}: empty image folder; all {v.n} frames of {v.name} have no image")


def plan_pack(opts: PackOptions) -> PackPlan:
    """Read the labels and scan the images; cut every split into samples and the samples into shards."""
    opts.check()
    log = ParseLog(skip_bad_rows=opts.skip_bad_rows)
    per_split, test, image_dirs = _videos(opts, log)
    all_videos = [v for vs in per_split.values() for v in vs]
    _warn_imageless(Path(opts.images), all_videos, log)
    params = opts.params()
    fp = hashlib.sha256(json.dumps(params.model_dump(exclude_none=True), sort_keys=True).encode())
    for split, vids in sorted(per_split.items()):
        fp.update(split.encode())
        for v in vids:
            fp.update(v.digest().encode())
    out = Path(opts.out)
    samples = {s: plan_split(v, opts.segment_len, s == "train", opts.shuffle_seed) for s, v in per_split.items()}
    jobs = [j for s, vids in per_split.items()
            for j in _shard_jobs(out, s, vids, samples[s], opts.shard_size, opts.skip_bad_rows)]  # fmt: skip
    unlabeled = sorted(image_dirs - {v.name for v in all_videos})
    return PackPlan(opts, log, per_split, test, unlabeled, params, fp.hexdigest(), samples, jobs)


# ------------------------------------------------------------------------------------------------ write


def write_pack_shards(plan: PackPlan) -> dict[str, list[str]]:
    """Write the plan's shards into ``opts.out`` (keeping the complete ones an interrupted run left); each job gets
    its shard's ``bytes`` and ``sha256``. Returns each split's undecodable images skipped (``skip_bad_rows``)."""
    opts, out = plan.opts, Path(plan.opts.out)
    _prepare_out(out, plan.fingerprint, opts.overwrite, list(plan.per_split))
    done: dict[str, dict] = {}
    for job in plan.jobs:  # complete shards from an interrupted run: kept as they are, only hashed
        if Path(job["path"]).is_file():
            done[job["rel"]] = finished_shard(job)
    _run_jobs(plan.jobs, opts.workers, opts.progress, done)
    for job in plan.jobs:
        job["bytes"], job["sha256"] = done[job["rel"]]["bytes"], done[job["rel"]]["sha256"]
    return _drop_bad_images(plan.jobs, done, plan.per_split)


# ------------------------------------------------------------------------------------------------ manifest


def pack_manifest(plan: PackPlan, bad_images: dict[str, list[str]]) -> PackManifest:
    """The manifest of the written shards: per split its shards and statistics, the inputs and parameters."""
    log, out = plan.log, Path(plan.opts.out)
    splits: dict[str, LabelledSplit | UnlabelledSplit] = {}
    for split, vids in plan.per_split.items():
        shards = [
            ShardRecord(
                path=j["rel"],
                samples=len(j["frames"]),
                frames=sum(j["frames"]),
                images=j["images"],
                bytes=j["bytes"],
                sha256=j["sha256"],
                sample_frames=j["frames"],
            )
            for j in plan.jobs
            if j["rel"].startswith(split + "/")
        ]
        if plan.test is not None and split == testset.SPLIT:
            splits[split] = unlabelled_entry(out, plan.test, len(plan.samples[split]), shards)
            continue
        splits[split] = LabelledSplit(
            samples=len(plan.samples[split]),
            shards=shards,
            **split_stats(vids),
            bad_rows_skipped=log.bad_rows.get(split, 0),
            bad_rows=log.listed.get(split, []),
            skipped_files=log.skipped_files.get(split, []),
            bad_images_skipped=len(bad_images[split]),
            bad_images=bad_images[split][:MAX_LISTED_BAD_ROWS],
        )
    inputs = plan.opts.inputs()
    if plan.test is not None:
        inputs.test_lists = [lst.source for lst in plan.test.lists]
    return PackManifest(
        params=plan.params, inputs=inputs, splits=splits, unlabeled_videos=plan.unlabeled_videos,
        warnings=log.warnings,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ entry


def pack(opts: PackOptions) -> PackManifest:
    """Pack a release into ``opts.out`` and return the manifest written to ``out/manifest.json``: plan (read and
    cut, nothing written), write the shards, then the manifest, last, once every shard it lists is complete."""
    plan = plan_pack(opts)
    bad_images = write_pack_shards(plan)
    manifest = pack_manifest(plan, bad_images)
    write_manifest(Path(opts.out), manifest)
    warnings = plan.log.warnings
    for w in warnings[:20]:
        print(f"mtl pack: warning: {w}", file=sys.stderr)
    if len(warnings) > 20:
        print(f"mtl pack: {len(warnings) - 20} more warnings in {Path(opts.out) / MANIFEST}", file=sys.stderr)
    return manifest
