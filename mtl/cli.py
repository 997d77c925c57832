"""The `mtl` command. Each area registers its own subcommands; heavy imports happen only when one runs."""

from __future__ import annotations

import argparse
import sys

from mtl.errors import MtlError, os_error_line


def build_parser() -> argparse.ArgumentParser:
    from mtl.commands import data as data_cli
    from mtl.commands import features as features_cli
    from mtl.commands import launch as launch_cli
    from mtl.commands import postprocess as postprocess_cli
    from mtl.commands import predict as predict_cli
    from mtl.commands import train as engine_cli

    parser = argparse.ArgumentParser(prog="mtl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_cli.register(sub)  # synth, pack, shards
    engine_cli.register(sub)  # train, eval, demo
    launch_cli.register(sub)  # submit (and submit --sweep), cv
    predict_cli.register(sub)  # predict (raw videos and frame folders)
    features_cli.register(sub)  # features (cache per-frame features: stage one of the two-stage recipe)
    postprocess_cli.register(sub)  # postprocess fit (smoothing and thresholds on held-out predictions)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MtlError as exc:
        print(f"mtl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a missing permission: the path and the reason, not a traceback
        print(f"mtl {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mtl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
