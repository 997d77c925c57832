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
    root = make_synth(Path(args.out), videos=args.videos, frames=args.frames, seed=args.seed, workers=args.workers)
    print(f"synthetic release in {root} ({time.time() - t:.1f}s); pack it with:")
    print(f"  mtl pack --images {root / 'cropped_aligned'} --annotations {root / 'annotations'} --out shards/synth")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from mtl.data.pack import pack
    from mtl.errors import DataError
    from mtl.tasks import load_plugins

    load_plugins(args.task_plugin, key="--task-plugin")
    mtl_files = {k: Path(v) for k, v in (("train", args.mtl_train), ("val", args.mtl_val)) if v}
    if bool(args.annotations) == bool(mtl_files):
        raise DataError("give exactly one of --annotations DIR (ABAW tree) and --mtl-train/--mtl-val FILE (MTL track)")
    t = time.time()
    manifest = pack(
        Path(args.images),
        Path(args.annotations) if args.annotations else None,
        Path(args.out),
        segment_len=args.segment_len,
        shard_size=args.shard_size,
        workers=args.workers,
        skip_bad_rows=args.skip_bad_rows,
        mtl_files=mtl_files or None,
        shuffle_seed=args.seed,
        overwrite=args.overwrite,
    )
    for name, s in manifest["splits"].items():
        tasks = ", ".join(f"{t} {st['labeled_frames']}" for t, st in s["tasks"].items())
        skipped = f", {s['bad_rows_skipped']} bad rows skipped" if s["bad_rows_skipped"] else ""
        if s.get("bad_images_skipped"):
            skipped += f", {s['bad_images_skipped']} undecodable images skipped (listed in the manifest)"
        print(f"{name}: {s['videos']} videos, {s['frames']} frames ({s['images']} with image), {s['samples']} samples "
              f"in {len(s['shards'])} shards; labelled frames with image: {tasks}{skipped}")  # fmt: skip
    print(f"wrote {Path(args.out) / 'manifest.json'} ({time.time() - t:.1f}s)")
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
    p.add_argument("--overwrite", action="store_true", help="replace a different pack already in --out")
    p.add_argument("--task-plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: it registers more tasks (as the config's tasks.plugins)")  # fmt: skip
    p.set_defaults(func=_pack)

    p = sub.add_parser("shards", help="inspect packed shards")
    shards = p.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    v = shards.add_parser(
        "verify", help="read every shard back: counts, sha256, every JPEG decodes, the manifest's statistics"
    )
    v.add_argument("dir", help="a folder written by `mtl pack` or `mtl features`")
    v.add_argument("--workers", type=int, default=min(4, cpus))
    v.set_defaults(func=_verify)
