"""`mtl features`: cache per-frame features of a pixel pack (one process, torchrun, or a SLURM array)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _spec(args: argparse.Namespace):
    from mtl.errors import ConfigError
    from mtl.extraction.extract import ExtractSpec

    try:
        kwargs = json.loads(args.backbone_kwargs) if args.backbone_kwargs else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--backbone-kwargs: not JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--backbone-kwargs: expected a JSON object, got {args.backbone_kwargs}")
    if args.checkpoint is not None:
        for flag, value in (("--pool", args.pool), ("--image-size", args.image_size)):
            if value is not None:
                raise ConfigError(f"{flag}: --checkpoint RUN uses its own (the run's config); drop {flag}")
    return ExtractSpec(
        backbone=args.backbone,
        weights=args.weights,
        checkpoint=args.checkpoint,
        pool=args.pool or "avg",
        image_size=args.image_size or 112,
        backbone_kwargs=kwargs,
        hflip_tta=args.hflip_tta,
        dtype=args.dtype,
        max_frames=args.max_frames,
        shard_frames=args.shard_frames,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
    )


def _features(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.array is not None:
        from mtl.launch.features_job import submit_features

        keys = ("gpus_per_node", "cpus_per_task", "mem_gb", "partition", "time", "folder")
        flags = {k: getattr(args, k) for k in keys}
        return submit_features(Path(args.shards), Path(args.out), spec, args.array, flags,
                               overwrite=args.overwrite, wait=args.wait)  # fmt: skip
    from mtl.extraction.extract import extract

    t = time.time()
    m = extract(Path(args.shards), Path(args.out), spec, overwrite=args.overwrite, progress=not args.no_progress)
    if m is not None and int(os.environ.get("RANK", "0")) == 0:
        for name, s in m.splits.items():
            print(f"{name}: {s.videos} videos, {s.frames} frames ({s.frames_with_image} with image) in "
                  f"{len(s.shards)} shards")  # fmt: skip
        print(f"wrote {Path(args.out) / 'manifest.json'} ({m.dim} x {m.dtype}, {time.time() - t:.1f}s)")
    return 0


DESCRIPTION = (
    "Every frame with an image of every split, through a frame encoder, into WebDataset feature shards with the "
    "source's per-frame ids, labels and masks, and a manifest.json. Runs on one process, under torchrun (ranks share "
    "the shards), or as a SLURM job array (--array K). Rerun the same command to resume."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="cache per-frame features of packed shards (any timm backbone, or a trained run's)",
        description=DESCRIPTION,
    )
    p.add_argument("--shards", required=True, help="a folder written by `mtl pack`")
    p.add_argument("--out", required=True, help="the feature cache folder to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbone", metavar="NAME", help="a timm model name")
    src.add_argument("--checkpoint", metavar="RUN", help="a trained `mtl` run (its fine-tuned backbone)")
    p.add_argument("--weights", metavar="FILE", help="local weights for --backbone (.safetensors or state dict)")
    p.add_argument("--backbone-kwargs", metavar="JSON", help="passed to timm.create_model, e.g. '{\"depth\": 6}'")
    p.add_argument("--pool", choices=("avg", "cls", "flatten"), help="frame feature from the tokens (default avg)")
    p.add_argument("--image-size", type=int, metavar="N", help="frames resized to N x N (default 112)")
    p.add_argument("--hflip-tta", action="store_true", help="average each frame's feature with its mirror image's")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--max-frames", type=int, default=4096, help="frames per sample at most (longer videos: parts)")
    p.add_argument("--shard-frames", type=int, default=32768, help="about this many frames per output shard")
    p.add_argument("--batch-size", type=int, default=256, help="frames per encoder call")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes decoding JPEGs for the encoder (default: this process's CPUs but one, at most 8)",
    )
    p.add_argument("--device", default="auto",
                   help="auto (CUDA where torch sees a GPU: this rank's), cuda (a GPU or stop saying why), cpu, "
                        "cuda:N; bf16 autocast on a GPU")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace features of other input or settings in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("SLURM (with --array K: K tasks of one job array, queued as `mtl submit` does)")
    g.add_argument("--array", type=int, metavar="K", help="submit K tasks, each a disjoint set of output shards")
    g.add_argument("--partition", "-p", metavar="P")
    g.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per task (default 0)")
    g.add_argument("--cpus-per-task", type=int, metavar="C")
    g.add_argument("--mem-gb", type=int, metavar="M")
    g.add_argument("--time", type=int, metavar="MIN", help="time limit per task in minutes")
    g.add_argument("--folder", metavar="DIR", help="submitit's files and the logs (%%j: job id)")
    g.add_argument("--wait", action="store_true", help="block until every task ends; exit 0 only if all completed")
    p.set_defaults(func=_features)
