#!/usr/bin/env python
"""GPU check: what one GPU machine does with `mtl`, in about ten minutes, as one JSON file.

    python tools/gpu_check.py --out gpu.json                 # on a GPU machine
    python tools/gpu_check.py --out gpu.json --fused-adamw --compile
    python tools/gpu_check.py --out smoke.json --smoke       # every part at toy size on the CPU (CI)

Parts (each a key of the JSON; a part that fails records its error and the others still run):

- ``step``: for ZeRO stages 0, 2 and 3 (one rank), the bf16 step time, peak GPU memory and MFU of ViT-B/16 at
  224 px with the temporal trunk, T=16, batch 16 (``mtl.engine.step``, what `mtl train` steps; FLOPs counted by
  torch's FlopCounterMode, over ``--peak-tflops``), the same for a bare PyTorch loop, and the largest batch that
  fits (doubling until out of memory). ``--compile``: torch.compile on the model; ``--fused-adamw``:
  ``optim.fused=true``. The options used are in ``options``.
- ``loader``: frames/s the training loader delivers to the device at 224 px (uint8, pinned, prefetched).
- ``train``: `mtl train` (a subprocess, as a user runs it) steady-state frames/s from its MLflow log, against the
  bare step of the same model and batch (``efficiency``).
- ``features``: `mtl features` frames/s, ViT-B at 112 px, bf16 (tools/bench_features.py's extraction part).
- ``predict``: `mtl predict` frames/s on a 640x480 video, configs/paper.yaml's model with random weights
  (tools/bench_predict.py's inputs and command; face detection runs on the CPU).
- ``multi_gpu``: with two or more GPUs, a 2-rank ZeRO-2 and ZeRO-3 `mtl train` killed (SIGKILL) after its first
  checkpoint and resumed to the end; skipped with fewer (with ``--smoke``: 2 CPU ranks, ZeRO-3 only).

Without a usable GPU (and without ``--smoke``) it says so in one line and exits 2. Goals on one H100/H200: MFU >= 40%
at ZeRO-2, trainer efficiency >= 90%, extraction >= 10,000 frames/s, predict >= 200 frames/s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))  # bench_step, bench_features, bench_predict: imported, not copied

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100/H200 SXM
FULL = {
    "backbone": "vit_base_patch16_224", "backbone_kwargs": {}, "temporal": {}, "image_size": 224, "clip_len": 16,
    "batch_size": 16, "stages": [0, 2, 3], "warmup": 3, "iters": 10, "max_batch": 1024,
    "synth": {"videos": 24, "frames": 160}, "loader_batches": 60, "train_steps": 60, "log_every": 10,
    "features": {"backbone": "vit_base_patch16_224", "backbone_kwargs": "{}", "image_size": 112, "batch_size": 512,
                 "videos": 40, "frames": 250},
    "predict": {"frames": 300, "model_cfg": "paper.yaml"}, "multi_steps": 12, "multi_stages": [2, 3], "workers": 8,
}  # fmt: skip
SMOKE = {
    "backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "temporal": {"dim": 32, "heads": 2, "layers": 1}, "image_size": 32, "clip_len": 4, "batch_size": 2,
    "stages": [0, 2, 3], "warmup": 1, "iters": 2, "max_batch": 8,
    "synth": {"videos": 4, "frames": 32}, "loader_batches": 8, "train_steps": 6, "log_every": 2,
    "features": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
                 "image_size": 32, "batch_size": 64, "videos": 3, "frames": 24},
    "predict": {"frames": 20, "model_cfg": "smoke.yaml"}, "multi_steps": 8, "multi_stages": [3], "workers": 1,
}  # fmt: skip


def _log(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--smoke", action="store_true", help="every part at toy size on the CPU (same JSON keys)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the step part")
    p.add_argument("--fused-adamw", action="store_true", help="optim.fused=true (torch's fused AdamW kernel)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="the GPU's dense bf16 peak")
    p.add_argument("--parts", nargs="+", default=["step", "loader", "train", "features", "predict", "multi_gpu"])
    p.add_argument("--workdir", type=Path, help="data and runs (default: a temporary folder)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ helpers


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(size: dict, device: str, **train: Any) -> Any:
    """The project's Config for the model and batch of ``size`` on ``device``."""
    from mtl.config import from_dict

    return from_dict({
        "data": {"image_size": size["image_size"], "clip_len": size["clip_len"], "batch_size": size["batch_size"]},
        "model": {"backbone": size["backbone"], "backbone_kwargs": size["backbone_kwargs"],
                  "temporal": size["temporal"]},
        "optim": {"fused": size.get("fused", False)},
        # precision explicit: the bare loop reads it from the config too (bf16 on the GPU, fp32 on the CPU)
        "train": {"device": device, "precision": "bf16" if device == "cuda" else "fp32", "max_steps": 10_000,
                  **train},
    })  # fmt: skip


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: Any) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _timed(step: Callable[[], Any], device: Any, warmup: int, iters: int) -> float:
    """Seconds per step, after ``warmup`` untimed steps (synchronised at both ends only)."""
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - t) / iters


def _largest_batch(step_with: Callable[[int], Any], start: int, cap: int, device: Any) -> dict[str, Any]:
    """The largest batch (clips) that trains one step, doubling from ``start`` until out of memory or ``cap``."""
    import torch

    fits, tried = start, start
    while tried * 2 <= cap:
        tried *= 2
        try:
            step_with(tried)
            _sync(device)
            fits = tried
        except torch.OutOfMemoryError:
            break
        finally:
            _free()
    return {"largest_batch": fits, "searched_up_to": tried, "cap": cap, "hit_cap": fits * 2 > cap}


# ------------------------------------------------------------------------------------------------ parts


def part_step(args: argparse.Namespace, size: dict, device: Any) -> dict[str, Any]:
    import bench_step
    import torch

    from mtl.engine.ds_config import compute_dtype, resolve_precision
    from mtl.model import build_model
    from mtl.objectives import MultiTaskLoss

    cfg0 = _config(size, device.type)
    precision = resolve_precision(cfg0, device)
    dtype = compute_dtype(precision)
    b, t, px = size["batch_size"], size["clip_len"], size["image_size"]
    batch = bench_step.make_batch(b, t, px, 0, device)
    loss_fn = MultiTaskLoss(cfg0.loss, bench_step.train_stats(batch)).to(device)
    torch.manual_seed(0)
    base = build_model(cfg0.model, image_size=px).to(device)
    flops = bench_step.count_step_flops(base, batch, loss_fn, dtype)
    frames = b * t
    peak = args.peak_tflops * 1e12

    def figures(s_per_step: float) -> dict[str, Any]:
        mfu = flops / s_per_step / peak if device.type == "cuda" else None
        return {"s_per_step": round(s_per_step, 5), "frames_per_s": round(frames / s_per_step, 1),
                "achieved_tflops": round(flops / s_per_step / 1e12, 3),
                "mfu": None if mfu is None else round(mfu, 4)}  # fmt: skip

    out: dict[str, Any] = {"backbone": size["backbone"], "image_size": px, "clip_len": t, "batch_size": b,
                           "precision": precision, "flops_per_step": flops,
                           "params": sum(p.numel() for p in base.parameters()), "stages": {}}  # fmt: skip
    _peak_reset(device)
    bare = bench_step.BareLoop(copy.deepcopy(base), cfg0, loss_fn)
    out["bare"] = {**figures(_timed(partial(bare.step, batch), device, size["warmup"], size["iters"])),
                   "peak_mem_gb": _peak_gb(device)}  # fmt: skip
    del bare
    _free()
    for stage in size["stages"]:
        _log(f"step: ZeRO-{stage}")
        cfg = _config(size, device.type, zero_stage=stage)
        model = copy.deepcopy(base)
        if args.compile:
            model.compile()
        _peak_reset(device)
        loop = bench_step.EngineLoop(model, cfg, loss_fn, device)
        entry = figures(_timed(partial(loop.step, batch), device, size["warmup"], size["iters"]))
        entry["peak_mem_gb"] = _peak_gb(device)
        step = loop.step
        entry.update(_largest_batch(lambda n, step=step: step(bench_step.make_batch(n, t, px, 1, device)),
                                    b, size["max_batch"], device))  # fmt: skip
        out["stages"][f"zero{stage}"] = entry
        del loop, model, step
        _free()
    return out


def _synth_pack(work: Path, size: dict, videos: int, frames: int) -> Path:
    from mtl.data.pack import PackOptions, pack
    from mtl.data.synth import make_synth

    shards = work / f"shards-{videos}x{frames}-T{size['clip_len']}"
    if not (shards / "manifest.json").is_file():
        root = make_synth(work / f"synth-{videos}x{frames}", videos=videos, frames=frames, seed=0)
        pack(PackOptions(root / "cropped_aligned", root / "annotations", shards, segment_len=size["clip_len"],
                         workers=min(4, os.cpu_count() or 1), progress=False))  # fmt: skip
    return shards


def part_loader(args: argparse.Namespace, size: dict, device: Any, work: Path) -> dict[str, Any]:
    import torch

    from mtl.config import replace
    from mtl.data.loader import make_train_loader
    from mtl.data.prefetch import prefetch

    shards = _synth_pack(work, size, **size["synth"])
    cfg = _config(size, device.type)
    data = replace(cfg.data, shards=str(shards), num_workers=size["workers"])
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    frames, batches, epoch = torch.zeros((), dtype=torch.int64, device=device), 0, 0
    t = None
    loader = make_train_loader(data, mean=mean, std=std, rank=0, world_size=1, epoch=0, seed=0)  # as Trainer
    while batches < size["loader_batches"]:
        loader.set_epoch(epoch)  # the same workers, on to the next epoch
        for batch in prefetch(loader, device):
            if t is None:  # the first batch waits for the workers to start: not the steady rate
                _sync(device)
                t = time.perf_counter()
            else:
                frames += (~batch["pad"]).sum()
                batches += 1
            if batches >= size["loader_batches"]:
                break
        epoch += 1
    n = int(frames)
    loader.close()
    wall = time.perf_counter() - t
    return {"frames_per_s": round(n / wall, 1), "frames": n, "batches": batches, "image_size": size["image_size"],
            "workers": size["workers"], "frames_dtype": "uint8 (normalised on the device)"}  # fmt: skip


def _mlflow_series(db: Path, key: str) -> tuple[list[float], dict[str, str]]:
    """The values of ``key`` (step order) of the single run in the store, and its tags."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    if not runs:
        return [], {}
    run = runs[0]
    history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    return [m.value for m in history], dict(run.data.tags)


def _train_yaml(path: Path, size: dict, device: str, shards: Path, out: Path, db: Path, ckpt_every: int = 10**6,
                **train: Any) -> Path:  # fmt: skip
    import yaml

    from mtl.config import to_dict

    cfg = to_dict(_config(size, device, **train))
    cfg["data"].update(shards=str(shards), num_workers=size["workers"])
    cfg["train"].update(output_dir=str(out), eval_every=10**6, ckpt_every=ckpt_every, progress=False)
    cfg["tracking"].update(uri=f"sqlite:///{db}", experiment="gpu-check")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def child_env(**extra: str) -> dict[str, str]:
    """This environment without this process's own process group (RANK, MASTER_PORT...: init_distributed set
    them here), so a child `mtl` forms its own."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def _mtl(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run([sys.executable, "-m", "mtl.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)  # fmt: skip


def part_train(args: argparse.Namespace, size: dict, device: Any, work: Path, bare: dict | None) -> dict[str, Any]:
    shards = _synth_pack(work, size, **size["synth"])
    run, db = work / "train-run", work / "train.db"
    steps, every = size["train_steps"], size["log_every"]
    cfg = _train_yaml(work / "train.yaml", size, device.type, shards, run, db, zero_stage=2, max_steps=steps,
                      log_every=every)  # fmt: skip
    t = time.perf_counter()
    proc = _mtl("train", "--config", str(cfg), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"mtl train exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    rates, _ = _mlflow_series(db, "train/frames_per_s")
    steady = rates[1:] or rates  # the first window holds start-up (workers, compilation of kernels)
    out: dict[str, Any] = {"steps": steps, "log_every": every, "zero_stage": 2,
                           "command_s": round(time.perf_counter() - t, 1),
                           "frames_per_s_windows": [round(r, 1) for r in rates],
                           "frames_per_s": round(statistics.median(steady), 1) if steady else None}  # fmt: skip
    if bare and out["frames_per_s"]:
        out["bare_frames_per_s"] = bare["frames_per_s"]
        out["efficiency"] = round(out["frames_per_s"] / bare["frames_per_s"], 4)
    return out


def part_features(args: argparse.Namespace, size: dict, device: Any) -> dict[str, Any]:
    import bench_features

    f = size["features"]
    ns = argparse.Namespace(backbone=f["backbone"], backbone_kwargs=f["backbone_kwargs"], image_size=f["image_size"],
                            batch_size=f["batch_size"], dtype="float16", hflip_tta=False, device=device.type,
                            videos=f["videos"], frames=f["frames"])  # fmt: skip
    with contextlib.redirect_stdout(sys.stderr):  # it prints its own JSON; ours is the only one on stdout
        r = bench_features.bench_extract(ns)
    keep = ("backbone", "image_size", "device", "frames_encoded", "extract_s", "model_load_s", "frames_per_s",
            "frames_per_s_excluding_load")  # fmt: skip
    return {k: r[k] for k in keep} | {"autocast": "bf16" if device.type == "cuda" else None}


def part_predict(args: argparse.Namespace, size: dict, device: Any, work: Path) -> dict[str, Any]:
    import bench_predict

    p = size["predict"]
    checkpoint, video, _ = bench_predict.make_inputs(work, REPO / "configs" / p["model_cfg"], p["frames"])
    r = bench_predict.run_predict(checkpoint, video, work / "predict-out", None, "--device", device.type)
    return r | {"video": "640x480 H.264, one moving face", "model": p["model_cfg"]}


def part_multi(args: argparse.Namespace, size: dict, device: Any, work: Path) -> dict[str, Any]:
    """2 ranks (GPUs, or CPUs with --smoke) per ZeRO stage: killed after the first checkpoint, then resumed."""
    import psutil
    import torch

    from mtl.engine.distributed import free_port
    from mtl.runs.layout import latest_complete

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, torch sees {torch.cuda.device_count()}"}
    shards = _synth_pack(work, size, **size["synth"])
    out: dict[str, Any] = {}
    for stage in size["multi_stages"]:  # --smoke: ZeRO-3 only (the same code; tests/test_resume.py kills ZeRO-2)
        run, db = work / f"multi-{stage}", work / f"multi-{stage}.db"
        steps = size["multi_steps"]
        cfg = _train_yaml(work / f"multi-{stage}.yaml", size, device.type, shards, run, db, zero_stage=stage,
                          max_steps=steps, log_every=1, ckpt_every=max(1, steps // 4))  # fmt: skip
        env = child_env(OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "mtl.cli", "train", "--config", str(cfg)]  # fmt: skip
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)  # fmt: skip
        deadline, killed_at = time.time() + 600, None
        while time.time() < deadline and first.poll() is None:
            tag = latest_complete(run / "checkpoints")
            if tag is not None:  # SIGKILL to torchrun and its ranks (each rank runs in a session of its own)
                for proc in [*psutil.Process(first.pid).children(recursive=True), psutil.Process(first.pid)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.send_signal(signal.SIGKILL)
                killed_at = int(tag[5:])
                break
            time.sleep(0.05)
        first.communicate()
        cmd[4] = f"--master_port={free_port()}"
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        _, tags = _mlflow_series(db, "train/loss")
        final = latest_complete(run / "checkpoints")
        out[f"zero{stage}"] = {
            "killed_after_checkpoint_step": killed_at, "resumed_from": tags.get("resumed_from"),
            "resume_exit_code": second.returncode, "final_step": int(final[5:]) if final else None,
            "max_steps": steps,
            "ok": killed_at is not None and second.returncode == 0 and final == f"step_{steps:08d}"
            and tags.get("resumed_from") is not None and int(tags["resumed_from"][5:]) < steps,
        }  # fmt: skip
        if second.returncode != 0:
            out[f"zero{stage}"]["error"] = second.stderr.strip()[-1500:]
    return out


# ------------------------------------------------------------------------------------------------ main


def _device_or_exit(smoke: bool) -> Any:
    import torch

    from mtl.device import probe_cuda, unusable_line

    if smoke:
        return torch.device("cpu")
    facts = probe_cuda()
    if not (facts.available and facts.count > 0):
        print(f"gpu_check: no usable GPU, nothing to measure: {unusable_line(facts, os.environ, 'gpu_check')}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    return torch.device("cuda", 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = _device_or_exit(args.smoke)
    if args.smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.stdout.flush()
    stdout = os.fdopen(os.dup(1), "w")  # the JSON's alone; what libraries and children print goes to stderr
    os.dup2(2, 1)
    import torch

    from mtl.engine.distributed import init_distributed

    size = dict(SMOKE if args.smoke else FULL)
    size["fused"] = args.fused_adamw
    if not args.smoke:
        size["workers"] = max(1, min(size["workers"], (os.cpu_count() or 2) - 2))
    init_distributed(device=device.type)  # the engine parts run on this process's decided device (world size 1)
    import deepspeed  # (after: DeepSpeed's accelerator is the decided device's)

    bench_step_quiet()
    result: dict[str, Any] = {
        "tool": "gpu_check", "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__},
        "options": {"compile": args.compile, "fused_adamw": args.fused_adamw, "peak_tflops": args.peak_tflops},
        "goals": {"mfu_zero2": 0.40, "train_efficiency": 0.90, "features_frames_per_s": 10_000,
                  "predict_frames_per_s": 200},
        "step": None, "loader": None, "train": None, "features": None, "predict": None, "multi_gpu": None,
        "seconds": {},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        parts: dict[str, Callable[[], dict]] = {
            "step": lambda: part_step(args, size, device),
            "loader": lambda: part_loader(args, size, device, work),
            "train": lambda: part_train(args, size, device, work, (result["step"] or {}).get("bare")),
            "features": lambda: part_features(args, size, device),
            "predict": lambda: part_predict(args, size, device, work),
            "multi_gpu": lambda: part_multi(args, size, device, work),
        }
        for name, run in parts.items():
            if name not in args.parts:
                result[name] = {"skipped": "not in --parts"}
                continue
            _log(f"{name} ...")
            t = time.perf_counter()
            try:
                result[name] = run()
            except Exception as exc:  # one part's failure is a figure too; the others still run
                result[name] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:1500]}"}
            result["seconds"][name] = round(time.perf_counter() - t, 1)
            args.out.write_text(json.dumps(result, indent=1) + "\n")  # what is measured survives a timeout
    print(json.dumps(result, indent=1), file=stdout, flush=True)
    return 0


def bench_step_quiet() -> None:
    import bench_step

    bench_step._quiet_deepspeed()


if __name__ == "__main__":
    sys.exit(main())
