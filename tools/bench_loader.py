#!/usr/bin/env python
"""Loader throughput: decoded + augmented frames per second per CPU core, shard loader vs the usual baseline.

Both sides deliver the same thing: batches of [B, T, 3, S, S] float clips (random window per segment, one random
crop / flip / brightness / contrast per clip, normalised) with per-frame labels, through a torch DataLoader with
the same batch size and the same number of worker processes.

- ``shards``: `mtl`'s loader (`make_train_loader`) reading the packed WebDataset shards.
- ``baseline``: the usual `torch.utils.data.Dataset`: one item per clip, each frame opened from
  ``cropped_aligned/<video>/<NNNNN>.jpg`` with PIL, then torchvision's functional transforms per frame (the clip's
  shared parameters), ``to_image``/``to_dtype`` and ``normalize``, stacked; labels parsed once up front.
- ``baseline_clip_tf`` (reported for honesty): the same PIL file reads, but the shard loader's batched clip transform,
  so the gap can be split into "file reads + PIL decode" and "per-frame transforms".

Per core = frames / CPU seconds of the main process and its workers (user + system, from getrusage), so a run that
keeps two cores busy counts both. The machine may be shared: every side runs ``--repeats`` times, interleaved, and
the median is reported. Writes JSON (``--out``, default bench-results/loader.json) and prints it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as tv_decode_jpeg

from mtl.allocator import keep_freed_memory
from mtl.config import AugmentConfig, DataConfig
from mtl.data.abaw import parse_abaw
from mtl.data.labels import ParseLog
from mtl.data.loader import make_train_loader
from mtl.data.manifest import read_manifest
from mtl.data.transforms import ClipAugment, ClipTransform, decode_jpeg

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class PILClipDataset(Dataset):
    """The usual baseline: one clip per item, frames opened one by one from the image folders with PIL."""

    def __init__(self, images: Path, annotations: Path, segment_len: int, cfg: DataConfig, clip_tf: bool, seed: int):
        labels = parse_abaw(annotations, ParseLog())["train"]
        self.images, self.cfg, self.clip_tf = images, cfg, clip_tf
        self.tf = ClipTransform(cfg.image_size, MEAN, STD)
        self.items, self.videos = [], {}
        rng = np.random.default_rng(seed)
        for name, vl in sorted(labels.items()):
            present = {int(p.stem) for p in (images / name).glob("*.jpg")}
            n = max(vl.rows, max(present, default=0))
            self.videos[name] = (vl.dense(n), present)
            for a in range(0, n, segment_len):  # one random window per segment, as the shard loader draws
                length = min(segment_len, n - a)
                off = int(rng.integers(0, length - cfg.clip_len + 1)) if length > cfg.clip_len else 0
                self.items.append((name, a + off, min(cfg.clip_len, length)))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        name, a, n = self.items[i]
        dense, present = self.videos[name]
        t, s = self.cfg.clip_len, self.cfg.image_size
        rng = np.random.default_rng([self.seed, i])
        frames = torch.zeros(t, 3, s, s)
        aug, imgs, pos = None, [], []
        for k in range(n):
            f = a + k + 1
            if f not in present:
                continue
            img = Image.open(self.images / name / f"{f:05d}.jpg").convert("RGB")
            if aug is None:
                aug = ClipAugment.draw(img.height, img.width, self.cfg.augment, rng)
            pos.append(k)
            if self.clip_tf:
                imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
                continue
            top, left, h, w = aug.box
            img = TF.resized_crop(img, top, left, h, w, [s, s], antialias=True)
            if aug.flip:
                img = TF.horizontal_flip(img)
            img = TF.adjust_brightness(img, aug.brightness)
            img = TF.adjust_contrast(img, aug.contrast)
            x = TF.to_dtype(TF.to_image(img), torch.float32, scale=True)
            frames[k] = TF.normalize(x, list(MEAN), list(STD))
        if self.clip_tf and imgs:
            frames[pos] = self.tf.train(torch.stack(imgs), aug)
        lab = {k: torch.from_numpy(np.ascontiguousarray(v[a : a + t])) for k, v in dense.items()}
        out = {"frames": frames, "has_image": torch.zeros(t, dtype=torch.bool), "pad": torch.ones(t, dtype=torch.bool)}
        out["has_image"][pos] = True
        out["pad"][:n] = False
        for k, v in lab.items():
            full = torch.zeros((t,) + tuple(v.shape[1:]), dtype=torch.float32 if k in ("va", "au") else v.dtype)
            full[: len(v)] = v
            out[k] = full
        return out


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(make_iter, min_seconds: float) -> dict:
    """Run whole epochs until ``min_seconds`` have passed; frames = image frames delivered in the batches."""
    gc.collect()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    frames = clips = epochs = 0
    while True:
        it = make_iter(epochs)
        for batch in it:
            frames += int(batch["has_image"].sum())
            clips += batch["frames"].shape[0]
        del it  # shuts the DataLoader workers down and joins them, so their CPU time lands in RUSAGE_CHILDREN
        epochs += 1
        if time.perf_counter() - t0 >= min_seconds:
            break
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {"frames": frames, "clips": clips, "epochs": epochs, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "frames_per_s": round(frames / wall, 1), "frames_per_cpu_s": round(frames / cpu, 1),
            "cores_busy": round(cpu / wall, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a synth/ABAW root with cropped_aligned/ and annotations/ (default: make one)")
    ap.add_argument("--shards", help="its packed shards (default: pack it into a temp folder)")
    ap.add_argument("--videos", type=int, default=24)
    # Long enough videos that an epoch (a fresh set of workers, as in training) lasts seconds, not a fraction of one:
    # real epochs are millions of frames, so worker start-up is not what a per-frame figure should show.
    ap.add_argument("--frames", type=int, default=1600)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, same on both sides")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--clip-len", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument(
        "--segment-len",
        type=int,
        default=16,
        help="pack segment length (default 16 = clip length: each epoch decodes every frame once)",
    )
    ap.add_argument("--seconds", type=float, default=8.0, help="minimum measuring time per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-results/loader.json")
    args = ap.parse_args(argv)
    # Both sides: main-process tensor ops on one thread, so OpenMP threads spinning between ops don't count as work
    # (workers run on one thread anyway).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def decode_only_rates(images: Path, limit: int = 2000) -> dict[str, float]:
    """JPEG decodes per CPU second of this machine (one thread, bytes already in memory), with the loader's decoder
    and with torchvision's: the yardstick that per-core loader targets are relative to, since machines differ."""
    paths = sorted(images.rglob("*.jpg"))[:limit]
    blobs = [p.read_bytes() for p in paths]
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    decoders = {
        "loader (simplejpeg)": lambda: [decode_jpeg(b) for b in blobs],
        "torchvision": lambda: tv_decode_jpeg(tensors, mode=ImageReadMode.RGB),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    try:
        for name, run in decoders.items():
            run()  # warm up
            t0 = time.process_time()
            run()
            rates[name] = round(len(blobs) / (time.process_time() - t0), 1)
        return rates
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    # As in training (init_distributed on CPU, and every loader worker): freed memory stays in the heap. Set in
    # this process, forked DataLoader workers of both sides inherit it, so the comparison stays like for like.
    keep_freed_memory()

    tmp = tempfile.TemporaryDirectory(prefix="mtl-bench-")
    if args.data:
        data = Path(args.data)
    else:
        from mtl.data.synth import make_synth

        data = make_synth(Path(tmp.name) / "synth", videos=args.videos, frames=args.frames, seed=0)
    if args.shards:
        shards = Path(args.shards)
    else:
        from mtl.data.pack import PackOptions, pack

        shards = Path(tmp.name) / "shards"
        pack(PackOptions(data / "cropped_aligned", data / "annotations", shards, segment_len=args.segment_len,
             shard_size=16, workers=1, progress=False))  # fmt: skip
    seg = read_manifest(shards).params.segment_len
    cfg = DataConfig(shards=str(shards), clip_len=args.clip_len, batch_size=args.batch_size,
                     num_workers=args.workers, image_size=args.image_size, augment=AugmentConfig())  # fmt: skip

    def shard_iter(epoch: int):
        return iter(make_train_loader(cfg, mean=MEAN, std=STD, rank=0, world_size=1, epoch=epoch, seed=0))

    def baseline_iter(clip_tf: bool):
        ds = PILClipDataset(data / "cropped_aligned", data / "annotations", seg, cfg, clip_tf, seed=0)

        def make(epoch: int):
            return iter(DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                   drop_last=True, generator=torch.Generator().manual_seed(epoch)))  # fmt: skip

        return make

    sides = {"shards": shard_iter, "baseline": baseline_iter(False), "baseline_clip_tf": baseline_iter(True)}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.repeats):
        for name, make in sides.items():
            res = _measure(make, args.seconds)
            runs[name].append(res)
            print(f"[{r + 1}/{args.repeats}] {name:17s} {res['frames_per_cpu_s']:8.1f} frames/s/core  "
                  f"({res['frames_per_s']:.1f} frames/s on {res['cores_busy']} cores)", file=sys.stderr)  # fmt: skip

    decode_rates = decode_only_rates(data / "cropped_aligned")
    decode_rate = decode_rates["loader (simplejpeg)"]

    def med(name: str, key: str) -> float:
        return round(statistics.median(x[key] for x in runs[name]), 1)

    result = {
        "what": "decoded + augmented frames per second per CPU core (median of repeats)",
        "config": {
            k: getattr(args, k) for k in ("workers", "batch_size", "clip_len", "image_size", "repeats", "seconds")
        }
        | {"segment_len": seg, "data": str(data)},  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg(),
        },  # fmt: skip
        "frames_per_s_per_core": {k: med(k, "frames_per_cpu_s") for k in sides},
        "jpeg_decode_only_per_core": decode_rates,
        "shards_vs_decode_only": round(med("shards", "frames_per_cpu_s") / decode_rate, 3),
        "frames_per_s_wall": {k: med(k, "frames_per_s") for k in sides},
        "speedup_vs_baseline": round(med("shards", "frames_per_cpu_s") / med("baseline", "frames_per_cpu_s"), 2),
        "speedup_vs_baseline_clip_tf": round(
            med("shards", "frames_per_cpu_s") / med("baseline_clip_tf", "frames_per_cpu_s"), 2
        ),
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("frames_per_s_per_core", "speedup_vs_baseline",
                                              "speedup_vs_baseline_clip_tf", "jpeg_decode_only_per_core",
                                              "shards_vs_decode_only")}))  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
