"""A real SLURM cluster for the tests, started through tools/slurm-local.sh (as a user would).

Use: ``from slurm_fixtures import slurm_cluster_fixture, slurm_local_fixture, slurm_two_nodes_fixture`` and a
``slurm_cluster`` (one node: this host) or ``slurm_two_nodes`` (node1 and node2, each in its own network namespace)
argument; both give the partition name. One cluster runs at a time: a test asking for the other variant switches
it (`up` / `up --nodes 2` reconfigure and restart the daemons, ~2 s), so the two-node tests come last in their
module. At the end of the session the cluster is taken down (namespaces, bridge, daemons) if the tests started or
switched it. Skipped, with the reason, only where it cannot be started at all: not root and SLURM not already up,
or no apt-get to install it. Anywhere else (CI runs as root) a failure to start is a test error, not a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "slurm-local.sh"
PARTITION = os.environ.get("SLURM_LOCAL_PARTITION", "debug")
TWO_NODES = ["node1", "node2"]


def _idle_nodes() -> list[str]:
    """The partition's nodes if every one of them is usable now, else []."""
    if shutil.which("sinfo") is None:
        return []
    proc = subprocess.run(["sinfo", "--noheader", "--Node", f"--partition={PARTITION}", "--format=%N %t"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    rows = [line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2]
    if proc.returncode != 0 or not rows or any(s.rstrip("*~#") not in ("idle", "mix", "alloc") for _, s in rows):
        return []
    return sorted(n for n, _ in rows)


class _LocalCluster:
    def __init__(self) -> None:
        self.changed = False  # started or reconfigured by the tests: taken down at the end

    def ensure(self, nodes: int) -> str:
        want = [socket.gethostname().split(".")[0]] if nodes == 1 else TWO_NODES
        if _idle_nodes() == want:
            return PARTITION
        if os.geteuid() != 0:
            pytest.skip("the local SLURM cluster is not running as needed and starting it needs root")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu only)")
        cmd = ["bash", str(SCRIPT), "up", *(["--nodes", str(nodes)] if nodes > 1 else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        self.changed = True
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return PARTITION


@pytest.fixture(scope="session", name="slurm_local")
def slurm_local_fixture() -> Iterator[_LocalCluster]:
    cluster = _LocalCluster()
    yield cluster
    if cluster.changed and os.environ.get("MTL_KEEP_SLURM") != "1":
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=300)


@pytest.fixture(name="slurm_cluster")
def slurm_cluster_fixture(slurm_local: _LocalCluster) -> str:
    """The partition of the running one-node cluster (this host)."""
    return slurm_local.ensure(1)


@pytest.fixture(name="slurm_two_nodes")
def slurm_two_nodes_fixture(slurm_local: _LocalCluster) -> str:
    """The partition of the running two-node cluster: node1 and node2, one network namespace each."""
    return slurm_local.ensure(2)


def job_ids() -> set[str]:
    """Every job SLURM knows now (queued, running, or finished within MinJobAge); none when it is not up."""
    try:
        proc = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i"], capture_output=True, text=True)
    except FileNotFoundError:
        return set()
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


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
