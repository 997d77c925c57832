"""`mtl postprocess fit`: temporal smoothing and per-unit thresholds fitted on held-out predictions."""

from __future__ import annotations

import argparse
from pathlib import Path


def _fit(args: argparse.Namespace) -> int:
    from mtl.commands.train import split_overrides
    from mtl.errors import MtlError
    from mtl.evaluation.tune import run_fit

    paths, overrides = split_overrides(args.checkpoint, args.overrides)
    if not paths:
        raise MtlError("--checkpoint: no run given (only key=value overrides)")
    run_fit(paths, args.split, args.out, overrides, device=args.device, weights=args.weights, kinds=args.kinds,
            widths=args.widths)  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mtl.evaluation.postprocess import KINDS, WIDTHS

    p = sub.add_parser("postprocess", help="post-processing of per-frame predictions (smoothing, AU thresholds)")
    inner = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = inner.add_parser("fit", help="fit per-task smoothing and per-unit thresholds on a labelled held-out split")
    f.add_argument("--checkpoint", required=True, nargs="+", metavar="RUN",
                   help="run dir, checkpoint or .safetensors; several: an ensemble; folds dir: its folds")  # fmt: skip
    f.add_argument("--weights", type=float, nargs="+", default=None, metavar="W", help="an ensemble's weights")
    f.add_argument("--split", default="val", help="a labelled split the runs were not trained on (default val)")
    f.add_argument("--out", type=Path, default=None,
                   help="the file (default: <checkpoint>/postprocess.json; required for several paths)")  # fmt: skip
    f.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="smoothings tried (and none)")
    f.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS), help="odd window widths in frames")
    f.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="as for mtl eval")
    f.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. data.shards=DIR")
    f.set_defaults(func=_fit)
