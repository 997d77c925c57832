"""A real one-node SLURM cluster for the tests, started through tools/slurm-local.sh (as a user would).

Use: ``from slurm_fixtures import slurm_cluster_fixture  # noqa: F401`` and a ``slurm_cluster`` argument (the
partition name). Skipped, with the reason, only where it cannot be started at all: not root and SLURM not already
up, or no apt-get to install it. Anywhere else (CI runs as root) a failure to start is a test error, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "slurm-local.sh"
PARTITION = os.environ.get("SLURM_LOCAL_PARTITION", "debug")


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "--noheader", "--format=%P %t"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and any(
        line.split()[0].rstrip("*") == PARTITION and line.split()[1].rstrip("*~#") in ("idle", "mix", "alloc")
        for line in proc.stdout.splitlines()
        if len(line.split()) == 2
    )


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[str]:
    """The partition of a running local cluster; stops the daemons afterwards only if it started them."""
    started = False
    if not _cluster_answers():
        if os.geteuid() != 0:
            pytest.skip("SLURM is not running and starting it (tools/slurm-local.sh up) needs root")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu only)")
        proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"tools/slurm-local.sh up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        started = True
    yield PARTITION
    if started and os.environ.get("MTL_KEEP_SLURM") != "1":
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)


def job_ids() -> set[str]:
    """Every job SLURM knows now (queued, running, or finished within MinJobAge)."""
    proc = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%i"], capture_output=True, text=True, check=True
    )
    return set(proc.stdout.split())


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True)
    info: dict[str, str] = {}
    for token in proc.stdout.split():
        key, sep, value = token.partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def wait_for_state(job_id: str, states: set[str], timeout: float) -> dict[str, str]:
    """Poll until the job reaches one of ``states``; fail with its last state and info on time-out."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not reach {sorted(states)} within {timeout:.0f} s: {info}")


def wait_for_path(pattern_dir: Path, pattern: str, job_id: str, timeout: float) -> Path:
    """First file matching ``pattern`` under ``pattern_dir`` (e.g. the first complete checkpoint)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = sorted(pattern_dir.glob(pattern))
        if hits:
            return hits[0]
        state = job_info(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job_id} is {state} before {pattern} appeared in {pattern_dir}")
        time.sleep(0.2)
    raise AssertionError(f"{pattern} did not appear in {pattern_dir} within {timeout:.0f} s")
