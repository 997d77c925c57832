"""`mtl demo`: the whole pipeline on the embedded default, so a newcomer sees it work in minutes on a CPU."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mtl.config import load_config
from mtl.tracking.mlflow_run import resolve_uri
from mtl.tracking.runs import client
from mtl.tracking.ui import experiment_address, run_address, ui_lines

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def pack_demo_data(
    synth_dir: Path, shards: Path, clip_len: int, seed: int = 0, videos: int | None = None, frames: int | None = None
) -> Path:
    """The demo's data set: `mtl synth` (``seed``: other videos) packed into ``shards`` in segments of 2 x
    ``clip_len`` frames: many samples per epoch (each a random clip window), so batches stay varied."""
    from mtl.data.pack import PackOptions, pack
    from mtl.data.synth import make_synth

    sizes = {k: v for k, v in (("videos", videos), ("frames", frames)) if v is not None}
    root = make_synth(synth_dir, seed=seed, **sizes)
    pack(PackOptions(root / "cropped_aligned", root / "annotations", shards, segment_len=2 * clip_len,
                     workers=min(2, os.cpu_count() or 1)))  # fmt: skip
    return shards


def run_demo(workdir: Path, overrides: list[str], videos: int | None = None, frames: int | None = None) -> dict:
    from mtl.engine.trainer import train
    from mtl.evaluation.offline import run_eval
    from mtl.metrics import summary_line

    workdir = Path(workdir).resolve()
    shards = workdir / "shards"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"
    run_dir = workdir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(  # validated before any data is made
        DEMO_CONFIG,
        [f"data.shards={shards}", f"train.output_dir={run_dir}", f"tracking.uri={uri}", *overrides],
    )
    if not (shards / "manifest.json").is_file():
        print(f"[1-2/4] synthetic Aff-Wild2-style data -> {workdir / 'synth'}, packed -> {shards}", flush=True)
        pack_demo_data(workdir / "synth", shards, cfg.data.clip_len, videos=videos, frames=frames)
    else:
        print(f"[1-2/4] reusing packed shards in {shards}", flush=True)
    print(f"[3/4] training ({cfg.model.backbone}, {cfg.train.max_steps} steps) -> {run_dir}", flush=True)
    result = train(cfg)
    print("[4/4] evaluating the best checkpoint on the validation split", flush=True)
    scores = run_eval(run_dir, cfg.data.val_split, None, [])
    if result.run_id:  # None with tracking.enabled=false
        store = resolve_uri(cfg.tracking)
        exp = client(store).get_run(result.run_id).info.experiment_id
        pages = [("this run", run_address(store, exp, result.run_id)), ("all runs", experiment_address(store, exp))]
        print(f"MLflow run {result.run_id} in {store}", flush=True)
        for line in ui_lines(store, pages):
            print(line, flush=True)
    print(summary_line(scores), flush=True)
    return scores
