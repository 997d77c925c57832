"""Benchmark of the two-stage recipe.

Section "training epoch" (this file's part; the extraction part is written elsewhere and merged here): seconds of
one training epoch of the temporal trunk and heads on cached features, against one epoch with
``model.freeze_backbone=true`` from pixels, on the same shards, the same trunk and heads, the same DeepSpeed step.
An epoch covers every training frame about once in both (pixel segments of ``clip_len`` frames, one clip each;
feature windows tiling every video). Target: at least 20x on CPU with the demo backbone at 64 px.

    python tools/bench_features.py --out bench_features.json            # demo backbone at 64 px, then ViT-S at 112

Until `mtl features` is merged the features are made by tests/feature_fixtures.py (same file format).
Prints a line per case and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

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
    from feature_fixtures import make_features

    from mtl.config import from_dict
    from mtl.data.pack import pack
    from mtl.data.synth import make_synth
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
        make_features(shards, feats, pool=spec["pool"], image_size=spec["image_size"], model=spec["model"])
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--clip-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=None, help="keep data here (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=Path("bench_features.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [bench_train_epoch(c, work, videos=args.videos, frames=args.frames, clip_len=args.clip_len,
                                     batch_size=args.batch_size) for c in args.cases]  # fmt: skip
    args.out.write_text(json.dumps({"train_epoch": results}, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
