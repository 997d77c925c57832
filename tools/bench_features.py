#!/usr/bin/env python
"""Feature extraction: frames per second of `mtl features`, and the cache's bytes on disk next to the pixel shards.

A synthetic release (``mtl synth``) is packed, then extracted with the given backbone (default: a small ViT-S/16
at 112, random weights, which costs what trained ones cost). Frames/s counts frames with an image (the ones the
encoder runs on) over the wall time of ``extract`` (model load and source scan included, reported apart too).
Writes JSON (``--out``, default bench-results/features.json) and prints it.

The training-epoch comparison (trunk on cached features vs frozen backbone from pixels) belongs to the feature
loader: ``epoch_seconds`` is where it goes, and ``"epoch"`` in the JSON stays null until it is filled.
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


def epoch_seconds(cache: Path, shards: Path) -> dict | None:
    """Seconds per training epoch of the trunk on ``cache`` vs a frozen backbone on ``shards`` (the feature-loader
    side fills this in; None until then)."""
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit_small_patch16_224")
    ap.add_argument("--backbone-kwargs", default="{}", help="JSON for timm.create_model")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--hflip-tta", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="bench-results/features.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

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
            "epoch": epoch_seconds(tmp / "features", shards),
            "host": platform.node(),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
