"""`mtl train`, `mtl eval`, `mtl demo`, `mtl runs verify`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mtl.engine.preemption import EXIT_PREEMPTED

if TYPE_CHECKING:
    from mtl.engine.trainer import TrainResult


def _train(args: argparse.Namespace) -> int:
    from mtl.config import load_config

    cfg = load_config(args.config, args.overrides)  # validated before any process group or model exists
    if cfg.tracking.enabled and int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        from mtl.tracking.mlflow_run import resolve_uri
        from mtl.tracking.store import check_store

        check_store(resolve_uri(cfg.tracking))  # and so is the MLflow store (rank 0 logs)
    from mtl.engine.trainer import train

    result = train(cfg)
    print_result(result)
    return EXIT_PREEMPTED if result.status == "preempted" else 0


def print_result(result: TrainResult) -> None:
    """The run's outcome and final scores, once (from global rank 0)."""
    from mtl.metrics import summary_line

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run {result.run_id}: {result.status} at step {result.step}; outputs in {result.output_dir}")
        if result.metrics:
            print(summary_line(result.metrics))


def split_overrides(paths: list[str], overrides: list[str]) -> tuple[list[Path], list[str]]:
    """``--checkpoint A B key=value``: argparse hands the overrides that follow a list of paths to the list; a
    ``key=value`` that is no existing path is an override (kept as typed: a Path would fold ``sqlite:////``)."""
    moved = [p for p in paths if "=" in p and not Path(p).exists()]
    return [Path(p) for p in paths if p not in moved], moved + list(overrides)


def _eval(args: argparse.Namespace) -> int:
    from mtl.errors import MtlError
    from mtl.evaluation.offline import run_eval
    from mtl.metrics import summary_line

    paths, overrides = split_overrides(args.checkpoint, args.overrides)
    if not paths:
        raise MtlError("--checkpoint: no run given (only key=value overrides)")
    scores = run_eval(paths, args.split, args.out, overrides, device=args.device, weights=args.weights,
                      postprocess=args.postprocess)  # fmt: skip
    if scores:  # an unlabelled split (the test set) has none
        print(summary_line(scores))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mtl.engine.demo import run_demo

    run_demo(args.workdir, args.overrides, videos=args.videos, frames=args.frames)
    return 0


def _verify_run(args: argparse.Namespace) -> int:
    from mtl.runs.layout import CHECKPOINTS, unhashed, verify_run

    bad = 0
    root = args.dir / CHECKPOINTS if (args.dir / CHECKPOINTS).is_dir() else args.dir
    for tag, problem in verify_run(args.dir).items():
        sizes_only = [] if problem else unhashed(root / tag)
        note = f" ({len(sizes_only)} file(s) never hashed, their writer stopped first: sizes only)" * bool(sizes_only)
        print(f"{tag}: {problem or 'ok'}{note}")
        bad += problem is not None
    return 1 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train (any launcher: python, torchrun, accelerate launch, srun)")
    p.add_argument("--config", type=Path, default=None, help="YAML config (defaults: mtl/config.py)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a trained run on one process; write predictions and ABAW files")
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="RUN",
                   help="run dir, checkpoint tag dir or .safetensors; several: an ensemble (per-frame predictions "
                        "averaged); a folds dir (folds.json + fold_<k>/): its folds")  # fmt: skip
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="an ensemble's weight per --checkpoint path (normalised; default equal)")  # fmt: skip
    p.add_argument("--split", default="val", help="a packed split; on the unlabelled 'test': the submission files")
    p.add_argument("--out", type=Path, default=None,
                   help="output dir (default: <checkpoint>/eval_<split>; required for several paths)")  # fmt: skip
    p.add_argument("--postprocess", default=None, metavar="FILE|none",
                   help="a `mtl postprocess fit` file to apply (default: <checkpoint>/postprocess.json where there "
                        "is one and one path is given; none: do not apply it)")  # fmt: skip
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="auto: CUDA where torch sees a GPU; cuda: a GPU or stop saying why (bf16 autocast there)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. data.shards=DIR")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="synthetic data -> pack -> train on CPU -> evaluate, with MLflow")
    p.add_argument("--workdir", type=Path, default=Path("mtl-demo"))
    p.add_argument("--videos", type=int, default=None, help="synthetic videos (default: mtl synth's)")
    p.add_argument("--frames", type=int, default=None, help="frames per synthetic video (default: mtl synth's)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of configs/demo.yaml")
    p.set_defaults(func=_demo)

    p = sub.add_parser("runs", help="inspect trained runs")
    runs = p.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    v = runs.add_parser("verify", help="every complete checkpoint's files against the sha256 their writers recorded")
    v.add_argument("dir", type=Path, help="a run dir (train.output_dir) or its checkpoints dir")
    v.set_defaults(func=_verify_run)
