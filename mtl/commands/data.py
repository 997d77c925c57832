"""Subcommands of the data path: `mtl synth`, `mtl pack`, `mtl shards verify`. Heavy imports happen inside."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from mtl.data.synth import make_synth

    t = time.time()
    root = make_synth(Path(args.out), videos=args.videos, frames=args.frames, seed=args.seed, workers=args.workers,
                      test_videos=args.test_videos)  # fmt: skip
    print(f"synthetic release in {root} ({time.time() - t:.1f}s); pack it with:")
    test = "".join(f" --test-list {p}" for p in sorted((root / "test_set").glob("*.txt"))) if args.test_videos else ""
    videos = f" --videos {root / 'videos'}" if args.test_videos else ""
    print(f"  mtl pack --images {root / 'cropped_aligned'} --annotations {root / 'annotations'}{test}{videos} "
          f"--out shards/synth")  # fmt: skip
    return 0


def _pack(args: argparse.Namespace) -> int:
    from mtl.data.manifest import UnlabelledSplit
    from mtl.data.pack import PackOptions, pack
    from mtl.errors import DataError
    from mtl.tasks import load_plugins

    load_plugins(args.task_plugin, key="--task-plugin")
    mtl_files = {k: Path(v) for k, v in (("train", args.mtl_train), ("val", args.mtl_val)) if v}
    if args.annotations and mtl_files or not (args.annotations or mtl_files or args.test_list):
        raise DataError("give one of --annotations DIR (ABAW tree) and --mtl-train/--mtl-val FILE (MTL track), "
                        "and/or --test-list FILE (the organisers' test lists)")  # fmt: skip
    if (args.videos or args.frame_counts) and not args.test_list:
        raise DataError("--videos and --frame-counts count the frames of test videos; give --test-list too")
    t = time.time()
    opts = PackOptions(
        Path(args.images),
        Path(args.annotations) if args.annotations else None,
        Path(args.out),
        segment_len=args.segment_len,
        shard_size=args.shard_size,
        workers=args.workers,
        skip_bad_rows=args.skip_bad_rows,
        mtl_files=mtl_files or None,
        test_lists=args.test_list,
        videos_dir=Path(args.videos) if args.videos else None,
        frame_counts=Path(args.frame_counts) if args.frame_counts else None,
        shuffle_seed=args.seed,
        overwrite=args.overwrite,
    )
    manifest = pack(opts)
    for name, s in manifest.splits.items():
        if isinstance(s, UnlabelledSplit):
            skipped = f", {s.videos_skipped} listed videos skipped (no frames)" if s.videos_skipped else ""
            lists = ", ".join(f"{t} {e.videos} videos" for t, e in s.lists.items())
            print(f"{name} (unlabelled): {s.videos} videos, {s.frames} frames ({s.frames_without_image} "
                  f"without image), {s.samples} samples in {len(s.shards)} shards; lists: "
                  f"{lists}{skipped}")  # fmt: skip
            continue
        tasks = ", ".join(f"{t} {st.labeled_frames}" for t, st in s.tasks.items())
        skipped = f", {s.bad_rows_skipped} bad rows skipped" if s.bad_rows_skipped else ""
        if s.bad_images_skipped:
            skipped += f", {s.bad_images_skipped} undecodable images skipped (listed in the manifest)"
        print(f"{name}: {s.videos} videos, {s.frames} frames ({s.images} with image), {s.samples} samples "
              f"in {len(s.shards)} shards; labelled frames with image: {tasks}{skipped}")  # fmt: skip
    print(f"wrote {Path(args.out) / 'manifest.json'} ({time.time() - t:.1f}s)")
    return 0


def _check_submission(args: argparse.Namespace) -> int:
    from mtl.data.submission import check_submission

    problems, rows = check_submission(Path(args.dir), Path(args.shards), args.split)
    for msg in problems.shown:
        print(msg, file=sys.stderr)
    if problems.count:
        more = f" (first {len(problems.shown)} shown)" if problems.count > len(problems.shown) else ""
        print(f"mtl submission check: {problems.count} problems{more}; not ready to upload", file=sys.stderr)
        return 1
    print(f"{args.dir}: ready to upload ({', '.join(f'{name} {n} rows' for name, n in rows.items())})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from mtl.data.verify import stats_problems, stray_files, verify
    from mtl.features.manifest import manifest_format
    from mtl.features.shards import FORMAT as FEATURES_FORMAT

    if manifest_format(Path(args.dir)) == FEATURES_FORMAT:  # a feature cache (`mtl features`)
        from mtl.features.verify import verify_features

        reports = verify_features(Path(args.dir))
        bad = [r for r in reports if not r.ok]
        for r in bad:
            print(f"BAD {r.path}: {'; '.join(r.problems)}", file=sys.stderr)
        summary = {"shards": len(reports), "bad": [r.path for r in bad], "samples": sum(r.samples for r in reports),
                   "frames": sum(r.frames for r in reports)}  # fmt: skip
        print(json.dumps(summary))
        return 1 if bad else 0
    reports = verify(Path(args.dir), workers=args.workers)
    bad = [r for r in reports if not r.ok]
    for r in bad:
        print(f"BAD {r.path}: {'; '.join(r.problems)}", file=sys.stderr)
    stats = stats_problems(Path(args.dir), reports)
    for p in stats:
        print(f"BAD manifest.json statistics: {p}", file=sys.stderr)
    for rel in stray_files(Path(args.dir)):
        print(f"note: {rel} is not listed in the manifest", file=sys.stderr)
    summary = {
        "shards": len(reports),
        "bad": [r.path for r in bad],
        "samples": sum(r.samples for r in reports),
        "jpegs_decoded": sum(r.jpegs for r in reports),
        "stats_mismatches": stats,
    }
    print(json.dumps(summary))
    return 1 if bad or stats else 0


def register(sub: argparse._SubParsersAction) -> None:
    cpus = os.cpu_count() or 1

    p = sub.add_parser("synth", help="write a synthetic data set in the Aff-Wild2 layout (the embedded default)")
    p.add_argument("--out", required=True, help="folder to create (cropped_aligned/ and annotations/ inside)")
    p.add_argument("--videos", type=int, default=22, help="labelled video folders (default 22: 16 train, 6 val)")
    p.add_argument("--frames", type=int, default=240, help="about this many frames per video (default 240)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(2, cpus))
    p.add_argument(
        "--test-videos",
        type=int,
        default=0,
        help="also a test set: unlabelled videos, their raw videos and the organisers' lists (default 0)",
    )
    p.set_defaults(func=_synth)

    p = sub.add_parser("pack", help="pack an Aff-Wild2 release into WebDataset shards + manifest.json")
    p.add_argument("--images", required=True, help="the cropped_aligned folder (<video>/<NNNNN>.jpg)")
    p.add_argument("--annotations", help="folder with the <Task>_Challenge folders (ABAW layout)")
    p.add_argument("--mtl-train", metavar="FILE", help="MTL-track training file (image,valence,arousal,expression,aus)")
    p.add_argument("--mtl-val", metavar="FILE", help="MTL-track validation file")
    p.add_argument("--out", required=True, help="output folder, e.g. shards/affwild2")
    p.add_argument("--segment-len", type=int, default=64, help="frames per sample (default 64)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")
    p.add_argument("--workers", type=int, default=min(4, cpus), help="shards written in parallel")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip (and count) bad annotation rows, empty files and undecodable images")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the training split's sample order")
    p.add_argument(
        "--test-list",
        action="append",
        default=[],
        metavar="[TRACK=]FILE",
        help="an organisers' test list (repeat per track; track from the file name, e.g. "
        "Valence_Arousal_Estimation_Challenge_test_set_release.txt, or TRACK=FILE: va, expr, au, "
        "mtl for the MTL track's list of frames): packed as the unlabelled split 'test'",
    )
    p.add_argument("--videos", metavar="DIR", help="raw test videos (any depth): frames per test video")
    p.add_argument("--frame-counts", metavar="CSV", help="video,frames rows: frames per test video")
    p.add_argument("--overwrite", action="store_true", help="replace a different pack already in --out")
    p.add_argument("--task-plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: it registers more tasks (as the config's tasks.plugins)")  # fmt: skip
    p.set_defaults(func=_pack)

    p = sub.add_parser("submission", help="check ABAW test-set submission files before upload")
    sc = p.add_subparsers(dest="submission_command", required=True, metavar="ACTION")
    c = sc.add_parser("check", help="file names, headers, every listed frame once and in order, value ranges")
    c.add_argument("dir", help="the submission folder (e.g. <run>/eval_test/submission)")
    c.add_argument("--shards", required=True, help="the pack holding the test lists (`mtl pack --test-list ...`)")
    c.add_argument("--split", default="test", help="its unlabelled split (default test)")
    c.set_defaults(func=_check_submission)

    p = sub.add_parser("shards", help="inspect packed shards")
    shards = p.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    v = shards.add_parser(
        "verify", help="read every shard back: counts, sha256, every JPEG decodes, the manifest's statistics"
    )
    v.add_argument("dir", help="a folder written by `mtl pack` or `mtl features`")
    v.add_argument("--workers", type=int, default=min(4, cpus))
    v.set_defaults(func=_verify)
