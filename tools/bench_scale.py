"""What a run on cached features costs as the cache grows: each rank's peak memory, start-up, checkpoint save, resume.

usage: python tools/bench_scale.py --out scale.json [--big-mb 1100 --small-mb 30 --dim 4096 --work DIR]

Two caches written directly in the feature-cache format (``mtl.features.shards``: wide fp16 features, random labels;
one of ``--big-mb`` and one of ``--small-mb``, 90% train, 10% val) from the same small synthetic pack. On each: a
2-rank ZeRO-2 run on the CPU (gloo) of a few steps with a checkpoint and an evaluation, then, on the big one, a
resume. Per rank: peak resident memory (``ru_maxrss``), the time to index the cache's splits, the time to build the
trainer, each checkpoint save (``mtl.engine.checkpoint.save``: what training waits for) against DeepSpeed writing
the same checkpoint bare (``engine.save_checkpoint`` and the RNG file, no marker, no hashes; in turns, each first
every other time), the part of each save that is DeepSpeed's own write (so what mtl adds is measured apart from the
write's noise: ``save_added_by_mtl_median_s``), the time each rank's background hashing takes after it (waited for
here, so it never overlaps a timed write), and the checkpoint load of the resume. Goals (issue 21): a rank's peak
grows by at most 35% of the caches' size difference + 200 MB; a save takes at most 1.2x the bare write. Prints and
writes JSON; not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
VIDEO_FRAMES = 2000  # frames per synthetic video (a long Aff-Wild2 video has ~10k)
SHARD_MB = 128


# ------------------------------------------------------------------------------------------------ the caches


def _labels(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from mtl.tasks import tasks

    out = {}
    for t in tasks():
        e = t.empty(n, t.batch_dtype)
        if np.issubdtype(e.dtype, np.integer):
            out[t.name] = rng.integers(0, t.width, e.shape).astype(e.dtype)
        elif getattr(t, "low", None) is not None:
            out[t.name] = rng.uniform(t.low, t.high, e.shape).astype(e.dtype)
        else:
            out[t.name] = rng.integers(0, 2, e.shape).astype(e.dtype)
        out[t.valid_key] = np.ones(n, bool)
    return out


def write_cache(root: Path, source: Path, mb: float, dim: int, seed: int = 0) -> Path:
    """A feature cache of about ``mb`` MB of fp16 features of width ``dim``, made from ``source``, as `mtl features`
    would lay it out (shards hashed once, as written)."""
    from mtl.data.manifest import MANIFEST, file_sha256
    from mtl.features.manifest import (
        Extractor,
        FeatureManifest,
        FeatureShardRecord,
        FeatureSource,
        FeatureSplitRecord,
        write_feature_manifest,
    )
    from mtl.features.shards import FeatureSample, write_feature_shard

    rng = np.random.default_rng(seed)
    block = rng.standard_normal((VIDEO_FRAMES + 64, dim), np.float32).astype(np.float16)
    row = dim * 2
    splits = {}
    for split, share in (("train", 0.9), ("val", 0.1)):
        frames_left = max(1, int(mb * share * 2**20 / row))
        records, samples, size, shard, video, n_videos = [], [], 0, 0, 0, 0
        while frames_left > 0:
            n = min(VIDEO_FRAMES, frames_left)
            frames_left -= n
            s = block[video % 64 : video % 64 + n]
            samples.append(FeatureSample(f"{split}_{video:05d}", np.arange(1, n + 1), np.ones(n, bool), s,
                                         _labels(n, rng)))  # fmt: skip
            video, n_videos, size = video + 1, n_videos + 1, size + n * row
            if size >= SHARD_MB * 2**20 or frames_left <= 0:
                rel = f"{split}/{shard:06d}.tar"
                (root / split).mkdir(parents=True, exist_ok=True)
                write_feature_shard(root / rel, samples)
                p = root / rel
                records.append(FeatureShardRecord(path=rel, bytes=p.stat().st_size, sha256=file_sha256(p),
                                                  samples=len(samples), frames=sum(len(x) for x in samples),
                                                  sample_frames=[len(x) for x in samples]))  # fmt: skip
                samples, size, shard = [], 0, shard + 1
        frames = sum(r.frames for r in records)
        splits[split] = FeatureSplitRecord(videos=n_videos, frames=frames, frames_with_image=frames, shards=records)
    manifest = FeatureManifest(
        source=FeatureSource(shards=str(source), manifest_sha256=file_sha256(source / MANIFEST)),
        extractor=Extractor(backbone="synthetic", weights_sha256="0" * 64, pool="avg", image_size=112,
                            mean=[0.0] * 3, std=[1.0] * 3, hflip_tta=False),  # fmt: skip
        dim=dim, dtype="float16", splits=splits,
    )  # fmt: skip
    write_feature_manifest(root, manifest)
    return root


def cache_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*/*.tar"))


# ------------------------------------------------------------------------------------------------ one rank


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: of this program alone, unlike ru_maxrss, which an exec keeps)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(report: Path, config: str, overrides: list[str], saves: int) -> None:
    """Under torchrun: train, evaluate, then time saves against bare DeepSpeed writes; JSON per rank."""
    t_begin = time.perf_counter()
    import torch

    from mtl.config import load_config
    from mtl.engine import checkpoint as ckpt
    from mtl.engine import trainer as trainer_mod
    from mtl.engine.distributed import barrier
    from mtl.features.loader import FeatureSplit

    timings: dict[str, list[float]] = {"index_s": [], "save_s": [], "load_s": []}

    def timed(key: str, fn):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timings[key].append(time.perf_counter() - t0)

        return wrapped

    FeatureSplit.load = classmethod(timed("index_s", FeatureSplit.load.__func__))
    ckpt.load = timed("load_s", ckpt.load)

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    t = trainer_mod.Trainer(cfg)
    t_built = time.perf_counter()
    step0 = t.state.step
    t.run()
    t_ran = time.perf_counter()
    rank, engine = t.env.rank, t.engine.ds
    peak_mb = _peak_rss_mb()

    # saves: ours (marker, background hashes) against DeepSpeed's bare write of the same checkpoint, in turns (ours
    # first, then bare first) so that neither always meets the page cache the other left; and, inside ours, the
    # time DeepSpeed's own write took, so what mtl adds to it is measured apart from the write's noise
    bare_dir = Path(cfg.train.output_dir) / "bare"
    ours, bare, inner, hash_wait = [], [], [], []
    ds_save = engine.save_checkpoint

    def inner_timed(*a, **kw):
        t_in = time.perf_counter()
        try:
            return ds_save(*a, **kw)
        finally:
            inner.append(time.perf_counter() - t_in)

    def ours_once() -> None:
        t.state.step += 1  # a new tag each time
        barrier()
        a = time.perf_counter()
        engine.save_checkpoint = inner_timed
        ckpt.save(engine, t.run_dir.checkpoints, t.state, rank, keep_last=1)
        engine.save_checkpoint = ds_save
        ours.append(time.perf_counter() - a)
        a = time.perf_counter()
        ckpt.wait_hashes()
        hash_wait.append(time.perf_counter() - a)

    def bare_once(i: int) -> None:
        barrier()
        a = time.perf_counter()
        engine.save_checkpoint(str(bare_dir), tag=f"b{i}", save_latest=False)
        torch.save(ckpt._rng_state(), bare_dir / f"b{i}" / f"rng_rank{rank:05d}.pt")
        barrier()
        bare.append(time.perf_counter() - a)
        if rank == 0 and i:  # as ours prunes the tag before
            shutil.rmtree(bare_dir / f"b{i - 1}", ignore_errors=True)

    for i in range(saves):
        if i % 2 == 0:
            ours_once()
            bare_once(i)
        else:
            bare_once(i)
            ours_once()
    ckpt_bytes = sum(p.stat().st_size for p in (bare_dir / f"b{saves - 1}").rglob("*") if p.is_file()) if saves else 0
    out = {
        "rank": rank, "peak_rss_mb": round(peak_mb, 1), "process_to_trainer_s": round(t_built - t_begin, 2),
        "trainer_build_s": round(t_built - t0, 2), "index_s": [round(x, 3) for x in timings["index_s"]],
        "resumed_from_step": step0, "load_s": [round(x, 3) for x in timings["load_s"]],
        "run_s": round(t_ran - t_built, 2), "save_s": [round(x, 3) for x in ours],
        "bare_save_s": [round(x, 3) for x in bare],
        "hash_after_save_s": [round(x, 3) for x in hash_wait],
        "deepspeed_write_in_save_s": [round(x, 3) for x in inner], "checkpoint_bytes": ckpt_bytes,
    }  # fmt: skip
    Path(f"{report}.{rank}").write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------ the driver


def _launch(work: Path, name: str, overrides: list[str], saves: int) -> list[dict]:
    from mtl.engine.distributed import free_port

    report = work / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           __file__, "--worker", str(report), "--saves", str(saves), str(SMOKE), *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"bench_scale: the {name} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads(Path(f"{report}.{r}").read_text()) for r in (0, 1)]


def bench(args: argparse.Namespace) -> dict:
    from mtl.data.pack import PackOptions, pack
    from mtl.data.synth import make_synth

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale_"))
    synth = make_synth(work / "synth", videos=2, frames=16, seed=3)
    source = work / "shards"
    if not (source / "manifest.json").is_file():
        pack(PackOptions(synth / "cropped_aligned", synth / "annotations", source, workers=1))
    caches, t_write = {}, {}
    for name, mb in (("small", args.small_mb), ("big", args.big_mb)):
        t0 = time.perf_counter()
        caches[name] = write_cache(work / f"cache_{name}", source, mb, args.dim)
        t_write[name] = round(time.perf_counter() - t0, 1)
    common = [f"data.shards={source}", "data.clip_len=32", "data.batch_size=4", "data.eval_batch_size=8",
              f"model.temporal.dim={args.width}", "model.temporal.layers=2", "model.temporal.heads=4",
              "model.temporal.max_len=64", "train.ckpt_every=1000", f"train.eval_every={args.steps}",
              "train.log_every=1", "tracking.enabled=false", "train.zero_stage=2"]  # fmt: skip
    runs = {}
    for name in ("small", "big"):
        out = work / f"run_{name}"
        runs[name] = _launch(work, name, [*common, f"data.features=[{caches[name]}]", f"train.output_dir={out}",
                                          f"train.max_steps={args.steps}"], args.saves)  # fmt: skip
    # resume on the big cache: from the last checkpoint the saves above left
    runs["resume"] = _launch(work, "resume", [*common, f"data.features=[{caches['big']}]",
                                              f"train.output_dir={work / 'run_big'}",
                                              f"train.max_steps={args.steps + args.saves + 1}"], 0)  # fmt: skip
    size = {k: cache_bytes(v) for k, v in caches.items()}
    diff_mb = (size["big"] - size["small"]) / 2**20
    growth = [b["peak_rss_mb"] - s["peak_rss_mb"] for s, b in zip(runs["small"], runs["big"])]
    saves = [x for r in runs["big"] for x in r["save_s"]]
    bare = [x for r in runs["big"] for x in r["bare_save_s"]]
    ratio = statistics.median(saves) / statistics.median(bare) if saves else None
    added = [s - w for r in runs["big"] for s, w in zip(r["save_s"], r["deepspeed_write_in_save_s"])]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "dim": args.dim, "steps": args.steps,
        "cache_mb": {k: round(v / 2**20, 1) for k, v in size.items()}, "cache_write_s": t_write,
        "runs": runs,
        "peak_rss_growth_mb": [round(g, 1) for g in growth],
        "growth_goal_mb": round(0.35 * diff_mb + 200, 1),
        "growth_share_of_size_difference": [round(g / diff_mb, 3) for g in growth],
        "start_index_s": {k: max(sum(r["index_s"]) for r in runs[k]) for k in ("small", "big")},
        "start_trainer_s": {k: max(r["trainer_build_s"] for r in runs[k]) for k in ("small", "big")},
        "checkpoint_mb": round(runs["big"][0]["checkpoint_bytes"] / 2**20, 1),
        "save_over_bare": round(ratio, 3) if ratio else None,
        "save_added_by_mtl_median_s": round(statistics.median(added), 3) if added else None,
        "save_added_share_of_deepspeed_write": round(statistics.median(added) / statistics.median(
            x for r in runs["big"] for x in r["deepspeed_write_in_save_s"]), 3) if added else None,
        "save_median_s": round(statistics.median(saves), 3) if saves else None,
        "bare_median_s": round(statistics.median(bare), 3) if bare else None,
        "hash_after_save_median_s": round(statistics.median(x for r in runs["big"] for x in r["hash_after_save_s"]), 3)
        if saves else None,
        "resume_load_s": max(sum(r["load_s"]) for r in runs["resume"]),
        "resume_trainer_s": max(r["trainer_build_s"] for r in runs["resume"]),
        "work": str(work),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--big-mb", type=float, default=1100)
    ap.add_argument("--small-mb", type=float, default=30)
    ap.add_argument("--dim", type=int, default=4096, help="feature width (fp16)")
    ap.add_argument("--width", type=int, default=256, help="temporal trunk width (sets the checkpoint's size)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--saves", type=int, default=5, help="timed saves per run, each against a bare write")
    ap.add_argument("--work", type=Path, default=None, help="folder for the caches and runs (default: a temp dir)")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker is not None:
        import torch

        torch.set_num_threads(1)
        worker(args.worker, rest[0], rest[1:], args.saves)
        return
    result = bench(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
