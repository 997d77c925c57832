#!/usr/bin/env python
"""Benchmark of the two-stage recipe: extraction speed, cache size, and the training epoch it buys.

- ``extract``: frames/s of `mtl features` (``mtl.extraction.extract``) on a packed synthetic release, and the cache's
  bytes on disk next to the pixel shards. Frames/s counts frames with an image (the ones the encoder runs on) over
  the wall time of ``extract`` (model load and source scan included, reported apart too).
- ``train_epoch``: seconds of one training epoch of the temporal trunk and heads on cached features, against one
  epoch with ``model.freeze_backbone=true`` from pixels, on the same shards, the same trunk and heads, the same
  DeepSpeed step, the same clip length and batch. An epoch covers every training frame about once in both (pixel
  segments of ``clip_len`` frames, one clip each; feature windows tiling every video). Each side is built once and
  timed over ``--repeats`` epochs after a warm-up epoch, interleaved; the median counts. Target: at least 20x on
  CPU with the demo backbone at 64 px. The default window is the recipe's (100 frames, configs/features-paper.yaml):
  at short windows a features step is bound by its fixed cost (optimizer step, dropout's random numbers, Python),
  not by frames. ``demo-64`` reads the backbone out as the recipe does (avg, a few hundred bytes a frame);
  ``demo-64-flatten`` as configs/features-demo.yaml does (all 64 tokens, 8192 values a frame), where the trunk's
  8192x128 input projection alone costs about 2M multiply-adds a frame (forward and weight gradient) against the
  frozen backbone's 50M, which keeps the speed-up well under 20x there.

    python tools/bench_features.py                       # both parts, JSON in bench-results/features.json
    python tools/bench_features.py --parts train_epoch --cases demo-64

Prints what it measures and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtl.config import read_yaml
from mtl.data.pack import PackOptions, pack
from mtl.data.prefetch import prefetch
from mtl.data.synth import make_synth
from mtl.extraction.extract import ExtractSpec, extract, load_encoder


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
        pack(PackOptions(release / "cropped_aligned", release / "annotations", shards, workers=1, progress=False))
        t = time.perf_counter()
        encoder = load_encoder(spec)
        load_s = time.perf_counter() - t
        device = str(encoder.device)  # what --device decided (mtl.device), as extract decides it too
        del encoder
        t = time.perf_counter()
        m = extract(shards, tmp / "features", spec, progress=False)
        wall = time.perf_counter() - t
        encoded = sum(s.frames_with_image for s in m.splits.values())
        frames = sum(s.frames for s in m.splits.values())
        source_bytes, cache_bytes = du(shards), du(tmp / "features")
        result = {
            "backbone": args.backbone,
            "backbone_kwargs": spec.backbone_kwargs,
            "image_size": args.image_size,
            "dim": m.dim,
            "dtype": m.dtype,
            "hflip_tta": args.hflip_tta,
            "device": device,
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

_demo_model = read_yaml(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")["model"]
DEMO = {k: _demo_model[k] for k in ("backbone", "backbone_kwargs")}  # the demo backbone, as `mtl demo` trains it
CASES = {
    "demo-64": {"image_size": 64, "pool": "avg", "model": DEMO},  # the recipe's readout: a few hundred bytes a frame
    "demo-64-flatten": {"image_size": 64, "pool": "flatten", "model": DEMO},  # configs/features-demo.yaml's
    "vit_small-112": {"image_size": 112, "pool": "avg", "model": {"backbone": "vit_small_patch16_224"}},
}  # fmt: skip
TRUNK = {"temporal": {"dim": 128, "heads": 4, "layers": 2, "dropout": 0.1, "max_len": 512}}


class EpochTimer:
    """One side of the comparison, built once (model, DeepSpeed engine, loss) through the trainer's own parts;
    ``run(epoch)`` times one training epoch, rank 0 of 1, loader creation included."""

    def __init__(self, cfg, device: torch.device) -> None:
        from mtl.data.manifest import read_manifest
        from mtl.engine.step import build_engine
        from mtl.objectives import MultiTaskLoss
        from mtl.runs.inputs import DataSource

        self.source = DataSource(cfg)
        self.device = device  # the one init_distributed decided, where DeepSpeed also put the model
        self.engine = build_engine(self.source.build_model(), cfg, 1, device)
        tasks = read_manifest(cfg.data.shards).splits[cfg.data.train_split].task_stats()
        self.loss_fn = MultiTaskLoss(cfg.loss, tasks)
        self.engine.ds.train()
        if self.source.uses_features:
            self.source.split(cfg.data.train_split)  # read once before timing, as the trainer does at start

    def run(self, epoch: int) -> dict:
        t0, batches = time.perf_counter(), 0
        frames = torch.zeros((), dtype=torch.int64, device=self.device)  # counted on the device: no sync a step
        loader = self.source.train_loader(rank=0, world_size=1, epoch=epoch, seed=0)
        for batch in prefetch(loader, self.device):  # as the trainer feeds its device
            self.engine.forward_backward(self.loss_fn, batch)
            self.engine.step()
            frames += (~batch["pad"]).sum()
            batches += 1
        n = int(frames)  # waits for the last step
        return {"seconds": time.perf_counter() - t0, "batches": batches, "frames": n}


def bench_train_epoch(case: str, work: Path, *, videos: int, frames: int, clip_len: int, batch_size: int,
                      repeats: int) -> dict:  # fmt: skip
    """One case: synthetic shards (segments of clip_len), features of the case's backbone, both epochs timed."""
    from mtl.config import from_dict
    from mtl.engine.distributed import init_distributed

    device = init_distributed().device
    spec = CASES[case]
    shards = work / f"shards-T{clip_len}"  # pixel segments of clip_len frames, one clip each per epoch
    if not (shards / "manifest.json").is_file():
        synth = make_synth(work / "synth", videos=videos, frames=frames, seed=0)
        pack(PackOptions(synth / "cropped_aligned", synth / "annotations", shards, segment_len=clip_len, workers=1))
    feats = work / f"features-{case}-T{clip_len}"
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
    sides = {"pixels_frozen_backbone": EpochTimer(pixels, device), "features": EpochTimer(features, device)}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for epoch in range(repeats + 1):  # interleaved, so load on the machine hits both alike; epoch 0 warms up
        for name, timer in sides.items():
            r = timer.run(epoch)
            if epoch:
                runs[name].append(r)
    out: dict = {"case": case, "clip_len": clip_len, "batch_size": batch_size, "repeats": repeats,
                 "threads": torch.get_num_threads()}  # fmt: skip
    for name, rs in runs.items():
        secs = sorted(r["seconds"] for r in rs)
        frames = int(statistics.median(r["frames"] for r in rs))
        out[name] = {"seconds": statistics.median(secs), "seconds_runs": [round(x, 4) for x in secs],
                     "batches": rs[0]["batches"], "frames": frames}  # fmt: skip
    px, ft = out["pixels_frozen_backbone"], out["features"]
    out["extraction_seconds_once"] = extract_s
    out["speedup_per_epoch"] = px["seconds"] / max(ft["seconds"], 1e-9)
    out["speedup_per_frame"] = (px["seconds"] / max(px["frames"], 1)) / max(ft["seconds"] / max(ft["frames"], 1), 1e-12)
    print(f"{case} (T={clip_len}, B={batch_size}, median of {repeats}): epoch from pixels (frozen backbone) "
          f"{px['seconds']:.2f} s ({px['frames']} frames), from features {ft['seconds']:.3f} s ({ft['frames']} "
          f"frames): {out['speedup_per_epoch']:.1f}x per epoch, {out['speedup_per_frame']:.1f}x per frame",
          flush=True)  # fmt: skip
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
    g.add_argument("--clip-len", type=int, default=100)
    g.add_argument("--train-batch-size", type=int, default=8)
    g.add_argument("--repeats", type=int, default=3, help="timed epochs per side, after one warm-up epoch each")
    g.add_argument("--workdir", type=Path, default=None, help="keep its data here (default: a temporary directory)")
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--frames", type=int, default=300)
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
                                  batch_size=args.train_batch_size, repeats=args.repeats)
                for c in args.cases
            ]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
