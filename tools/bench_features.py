#!/usr/bin/env python
"""Benchmark of the two-stage recipe: extraction speed, cache size, and the training epoch it buys.

- ``extract``: frames/s of `mtl features` (``mtl.features.extract``) on a packed synthetic release, and the cache's
  bytes on disk next to the pixel shards. Frames/s counts frames with an image (the ones the encoder runs on) over
  the wall time of ``extract`` (model load and source scan included, reported apart too).
- ``train_epoch``: seconds of one training epoch of the temporal trunk and heads on cached features, against one
  epoch with ``model.freeze_backbone=true`` from pixels, on the same shards, the same trunk and heads, the same
  DeepSpeed step. An epoch covers every training frame about once in both (pixel segments of ``clip_len`` frames,
  one clip each; feature windows tiling every video). Target: at least 20x on CPU with the demo backbone at 64 px.

    python tools/bench_features.py                       # both parts, JSON in bench-results/features.json
    python tools/bench_features.py --parts train_epoch --cases demo-64

Prints what it measures and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from mtl.data.pack import pack
from mtl.data.synth import make_synth
from mtl.features.extract import ExtractSpec, extract, load_encoder


def du(root: Path, pattern: str = "*/*.tar") -> int:
    return sum(p.stat().st_size for p in root.glob(pattern))


def bench_extract(args: argparse.Namespace) -> dict:
    """The extraction part (see the module docstring)."""
    spec = ExtractSpec(backbone=args.backbone, backbone_kwargs=json.loads(args.backbone_kwargs),
                       image_size=args.image_size, batch_size=args.batch_size, dtype=args.dtype,
                       hflip_tta=args.hflip_tta, device=args.device)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        release = make_synth(tmp / "synth", videos=args.videos, frames=args.frames, seed=0)
        shards = tmp / "shards"
        pack(release / "cropped_aligned", release / "annotations", shards, workers=1, progress=False)
        t = time.perf_counter()
        encoder = load_encoder(spec)
        load_s = time.perf_counter() - t
        del encoder
        t = time.perf_counter()
        m = extract(shards, tmp / "features", spec, progress=False)
        wall = time.perf_counter() - t
        encoded = sum(s["frames_with_image"] for s in m["splits"].values())
        frames = sum(s["frames"] for s in m["splits"].values())
        source_bytes, cache_bytes = du(shards), du(tmp / "features")
        result = {
            "backbone": args.backbone,
            "backbone_kwargs": spec.backbone_kwargs,
            "image_size": args.image_size,
            "dim": m["dim"],
            "dtype": m["dtype"],
            "hflip_tta": args.hflip_tta,
            "device": str(spec.device or ("cuda" if torch.cuda.is_available() else "cpu")),
            "threads": torch.get_num_threads(),
            "frames": frames,
            "frames_encoded": encoded,
            "extract_s": round(wall, 3),
            "model_load_s": round(load_s, 3),
            "frames_per_s": round(encoded / wall, 1),
            "frames_per_s_excluding_load": round(encoded / max(wall - load_s, 1e-9), 1),
            "source_bytes": source_bytes,
            "cache_bytes": cache_bytes,
            "cache_over_source": round(cache_bytes / source_bytes, 4),
            "bytes_per_frame": {"source": round(source_bytes / frames, 1), "cache": round(cache_bytes / frames, 1)},
            "host": platform.node(),
        }
    print(json.dumps(result, indent=1), flush=True)
    return result


# ------------------------------------------------------------------------------------------------ training epoch

CASES = {
    "demo-64": {"image_size": 64, "pool": "flatten", "model": {
        "backbone": "vit_tiny_patch16_224",
        "backbone_kwargs": {"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4}}},
    "vit_small-112": {"image_size": 112, "pool": "avg", "model": {"backbone": "vit_small_patch16_224"}},
}  # fmt: skip
TRUNK = {"temporal": {"dim": 128, "heads": 4, "layers": 2, "dropout": 0.1, "max_len": 512}}


def _epoch_seconds(cfg) -> tuple[float, int, int]:
    """(seconds, batches, frames) of one training epoch, rank 0 of 1, through the trainer's own parts."""
    import torch

    from mtl.data.manifest import read_manifest
    from mtl.engine.inputs import DataSource
    from mtl.engine.step import build_engine
    from mtl.objectives import MultiTaskLoss

    source = DataSource(cfg)
    model = source.build_model()
    engine = build_engine(model, cfg, 1, torch.device("cpu"))
    loss_fn = MultiTaskLoss(cfg.loss, read_manifest(cfg.data.shards)["splits"][cfg.data.train_split]["tasks"])
    engine.ds.train()
    loader = source.train_loader(rank=0, world_size=1, epoch=0, seed=0)
    if source.uses_features:
        source.split(cfg.data.train_split)  # read before timing, as the trainer does at start
    t0, frames, batches = time.perf_counter(), 0, 0
    for batch in loader:
        engine.forward_backward(loss_fn, batch)
        engine.step()
        frames += int((~batch["pad"]).sum())
        batches += 1
    return time.perf_counter() - t0, batches, frames


def bench_train_epoch(case: str, work: Path, *, videos: int, frames: int, clip_len: int, batch_size: int) -> dict:
    """One case: synthetic shards (segments of clip_len), features of the case's backbone, both epochs timed."""
    from mtl.config import from_dict
    from mtl.engine.distributed import init_distributed

    init_distributed()
    spec = CASES[case]
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        synth = make_synth(work / "synth", videos=videos, frames=frames, seed=0)
        pack(synth / "cropped_aligned", synth / "annotations", shards, segment_len=clip_len, workers=1)
    feats = work / f"features-{case}"
    t0 = time.perf_counter()
    if not (feats / "manifest.json").is_file():
        extract(shards, feats, ExtractSpec(backbone=spec["model"]["backbone"], pool=spec["pool"],
                                           backbone_kwargs=dict(spec["model"].get("backbone_kwargs", {})),
                                           image_size=spec["image_size"]), progress=False)  # fmt: skip
    extract_s = time.perf_counter() - t0
    common = {
        "data": {"shards": str(shards), "clip_len": clip_len, "batch_size": batch_size, "num_workers": 1,
                 "image_size": spec["image_size"], "shuffle_buffer": 64},
        "model": {**spec["model"], "pool": spec["pool"], **TRUNK},
        "train": {"zero_stage": 2, "max_steps": 10_000, "progress": False},
    }  # fmt: skip
    pixels = from_dict({**common, "model": {**common["model"], "freeze_backbone": True}})
    features = from_dict({**common, "data": {**common["data"], "features": [str(feats)]}})
    px_s, px_batches, px_frames = _epoch_seconds(pixels)
    ft_s, ft_batches, ft_frames = _epoch_seconds(features)
    out = {
        "case": case,
        "pixels_frozen_backbone": {"seconds": px_s, "batches": px_batches, "frames": px_frames},
        "features": {"seconds": ft_s, "batches": ft_batches, "frames": ft_frames},
        "extraction_seconds_once": extract_s,
        "speedup_per_epoch": px_s / max(ft_s, 1e-9),
        "speedup_per_frame": (px_s / max(px_frames, 1)) / max(ft_s / max(ft_frames, 1), 1e-12),
    }
    print(f"{case}: epoch from pixels (frozen backbone) {px_s:.2f} s ({px_frames} frames), from features "
          f"{ft_s:.2f} s ({ft_frames} frames): {out['speedup_per_epoch']:.1f}x per epoch, "
          f"{out['speedup_per_frame']:.1f}x per frame", flush=True)  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["extract", "train_epoch"], choices=["extract", "train_epoch"])
    g = ap.add_argument_group("extract")
    g.add_argument("--backbone", default="vit_small_patch16_224")
    g.add_argument("--backbone-kwargs", default="{}", help="JSON for timm.create_model")
    g.add_argument("--image-size", type=int, default=112)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--dtype", default="float16")
    g.add_argument("--hflip-tta", action="store_true")
    g.add_argument("--device", default=None)
    g = ap.add_argument_group("train_epoch")
    g.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    g.add_argument("--clip-len", type=int, default=32)
    g.add_argument("--train-batch-size", type=int, default=4)
    g.add_argument("--workdir", type=Path, default=None, help="keep its data here (default: a temporary directory)")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--out", default="bench-results/features.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    result: dict = {"host": platform.node()}
    if "extract" in args.parts:
        result["extract"] = bench_extract(args)
    if "train_epoch" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.workdir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            result["train_epoch"] = [
                bench_train_epoch(c, work, videos=args.videos, frames=args.frames, clip_len=args.clip_len,
                                  batch_size=args.train_batch_size)
                for c in args.cases
            ]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
