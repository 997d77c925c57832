"""Helpers the tests share: the repo's paths, and running `mtl` (one process or torchrun) as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mtl.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
DRIVER = REPO / "tests" / "drivers" / "train_driver.py"


def smoke_overrides(shards: Path, out: Path, db: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"train.output_dir={out}", f"tracking.uri=sqlite:///{db}", *extra]


def run(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=kw.pop("cwd", REPO), **kw)


def torchrun(nproc: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *args]  # fmt: skip
    return run(cmd, timeout=timeout)


def mtl(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mtl.cli", *args], timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    tail = f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail}"
    return proc


def ctrl_c_as_in_a_terminal() -> None:
    """``preexec_fn`` for a command a test sends Ctrl-C: SIGINT at its default, as under a terminal. A shell's
    background job (``cmd &``, as a CI runner may start pytest) ignores SIGINT, and that is inherited; Python then
    leaves it ignored, and only workers that reset it would end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
