"""The winners' recipe on the demo data: K folds, their ensemble, post-processing fitted out of fold.

usage: python tools/demo_recipe.py --out recipe.json [--work DIR --folds 3 --seed 0] [key=value ...]

1. The demo's synthetic data set, packed as `mtl demo` packs it (``<work>/shards``), and a second one made with
   another seed (``<work>/fresh``): videos no fold ever saw, whose validation split scores everything below.
2. ``mtl cv --config configs/demo.yaml --folds K`` over the first one's train + val videos (``<work>/cv``): K runs,
   each scored on its held-out videos (the cv's own estimate, printed as its summary line).
3. ``mtl eval --checkpoint <work>/cv`` on val: the folds' out-of-fold predictions joined; ``mtl postprocess fit``
   on them: per task a smoothing and per AU a threshold (``<work>/cv/postprocess.json``).
4. On the fresh videos: each fold run alone, the fold ensemble (per-frame mean of the K runs), and the ensemble
   with the post-processing fitted in 3 (fitted on other videos than it is scored on).

Prints and writes JSON: per-fold and mean single-run scores, the ensemble's, the ensemble's with post-processing,
and whether the last is at least the mean single run on every headline metric. Takes about K x 6 minutes on 2
CPU cores (each fold trains the demo's 600 steps); key=value overrides go to every run (e.g. train.max_steps=50).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
HEADLINES = ("va_ccc", "expr_f1", "au_f1", "mtl_score")


def _pack(work: Path, name: str, seed: int, clip_len: int) -> Path:
    from mtl.engine.demo import pack_demo_data

    shards = work / name
    if not (shards / "manifest.json").is_file():
        pack_demo_data(work / f"synth_{name}", shards, clip_len, seed=seed)
    return shards


def _mtl(*args: str) -> str:
    """One `mtl` command in this process (no second start-up of torch); its printed output; exit 0 or raise."""
    from mtl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    if code != 0:
        raise SystemExit(f"mtl {' '.join(args)}: exit {code}\n{out.getvalue()[-2000:]}")
    return out.getvalue()


def _scores(eval_dir: Path) -> dict[str, float]:
    got = json.loads((eval_dir / "metrics.json").read_text())
    return {k: round(float(got[k]), 4) for k in HEADLINES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON written")
    ap.add_argument("--work", type=Path, default=Path("mtl-recipe"))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="the folds' seed")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of configs/demo.yaml")
    args = ap.parse_args()

    from mtl.config import load_config

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clip_len = load_config(DEMO, args.overrides).data.clip_len
    shards, fresh = _pack(work, "shards", 0, clip_len), _pack(work, "fresh", 1, clip_len)
    cv = work / "cv"
    common = [f"tracking.uri=sqlite:///{work / 'mlflow.db'}", *args.overrides]
    print(f"[1/4] packed {shards} and the fresh videos {fresh}; [2/4] mtl cv --folds {args.folds} -> {cv}", flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mtl.cli", "cv", "--config", str(DEMO), "--folds", str(args.folds), "--seed",
         str(args.seed), "--out", str(cv), f"data.shards={shards}", *common],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"mtl cv: exit {proc.returncode}\n{proc.stdout[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    held_out = [{k: round(f["metrics"][k], 4) for k in HEADLINES} for f in summary["per_fold"]]

    print("[3/4] out-of-fold predictions of the folds and post-processing fitted on them", flush=True)
    own = [f"data.shards={shards}", *common]
    _mtl("eval", "--checkpoint", str(cv), "--postprocess", "none", "--out", str(work / "oof"), *own)
    _mtl("postprocess", "fit", "--checkpoint", str(cv), *own)
    fitted = json.loads((cv / "postprocess.json").read_text())

    print("[4/4] the fold runs, their ensemble, and the ensemble post-processed, on the fresh videos", flush=True)
    other = [f"data.shards={fresh}", "data.folds.file=null", "data.folds.fold=null", *common]
    single = []
    for k in range(args.folds):
        out = work / "fresh_eval" / f"fold_{k}"
        _mtl("eval", "--checkpoint", str(cv / f"fold_{k}"), "--postprocess", "none", "--out", str(out), *other)
        single.append(_scores(out))
    _mtl("eval", "--checkpoint", str(cv), "--postprocess", "none", "--out", str(work / "fresh_eval" / "ens"), *other)
    _mtl("eval", "--checkpoint", str(cv), "--out", str(work / "fresh_eval" / "ens_pp"), *other)
    ensemble, ensemble_pp = _scores(work / "fresh_eval" / "ens"), _scores(work / "fresh_eval" / "ens_pp")
    mean = {k: round(sum(s[k] for s in single) / len(single), 4) for k in HEADLINES}
    result = {
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "folds": args.folds,
        "seed": args.seed,
        "overrides": args.overrides,
        "work": str(work),
        "cv_held_out": {"per_fold": held_out, "mean": summary["mean"], "std": summary["std"]},
        "cv_out_of_fold_joined": _scores(work / "oof"),
        "postprocess": {
            t: {"smoothing": f["smoothing"], "gain_out_of_fold": round(f["gain"], 4)}
            for t, f in fitted["tasks"].items()
        },  # fmt: skip
        "fresh": {
            "single_runs": single,
            "single_mean": mean,
            "ensemble": ensemble,
            "ensemble_postprocessed": ensemble_pp,
        },  # fmt: skip
        "ensemble_postprocessed_at_least_mean_single": {k: ensemble_pp[k] >= mean[k] for k in HEADLINES},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
