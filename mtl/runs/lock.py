"""One owner per run folder at a time: the ``run.lock`` file in ``train.output_dir``.

Two trainings in one folder would write the same checkpoints and the same MLflow run, so a second start names the
holder (host, pid, SLURM job) and stops before it writes anything. A lock whose owner is gone is taken over:

- on the holder's host, when its pid is gone (or now belongs to another process, or the host rebooted);
- from another host, when the holder's lease ran out: the owner renews it every ``RENEW_S`` on a daemon thread,
  so a lock not renewed for ``LEASE_S`` belongs to a dead or unreachable process (clocks assumed in sync);
- at once by the same SLURM job (a requeued job runs again under its id) or the same torchrun job (an elastic
  restart of its workers): the earlier attempt is over.

The file appears complete or not at all: it is written beside and hard-linked into place (``link`` fails if the
name exists, on NFS too), and renewed by an atomic rename. Rank 0 of a training holds it (mtl.engine.start);
`mtl submit` on the login node never takes it, the job does. Imports no torch.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mtl.errors import MtlError
from mtl.runs.layout import RunDir

LEASE_S = 120.0  # a lock not renewed for this long, seen from another host, is stale
RENEW_S = 30.0
_HELD: set[Path] = set()  # lock files this process holds now


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """The process's start time since boot (/proc), which tells a reused pid from its first owner."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the parenthesised command name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _slurm_job() -> str | None:
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID") or None


def _elastic_run() -> str | None:
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    return run if run and run != "none" else None  # "none": torchrun's default, shared by unrelated launches


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder, as written in its lock file."""

    token: str  # this holding's own id: a renewal or release touches only a lock that still carries it
    host: str
    pid: int
    started: float  # seconds since the epoch
    renewed: float
    pid_start: str | None = None
    boot_id: str | None = None
    slurm_job: str | None = None
    elastic_run: str | None = None

    @classmethod
    def this_process(cls) -> Holder:
        now = time.time()
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, _pid_start(os.getpid()),
                   _read_text("/proc/sys/kernel/random/boot_id"), _slurm_job(), _elastic_run())  # fmt: skip

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder in ``path``; None when the file is gone. A file that is no lock gives a holder of nothing."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            d = json.loads(text)
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (ValueError, TypeError):
            return cls(token="", host="", pid=0, started=0.0, renewed=0.0)

    def describe(self) -> str:
        if not self.host:
            return "an unreadable lock file"
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"pid {self.pid} on host {self.host}{job}, since {since}"

    def gone(self, me: Holder, path: Path, now: float) -> str | None:
        """Why this holder no longer owns the folder (its lock may be taken over); None while it may still."""
        if not self.host:
            return "the lock file is unreadable"
        if me.slurm_job and self.slurm_job == me.slurm_job:
            return f"SLURM job {me.slurm_job} starts again (requeued or restarted)"
        if me.elastic_run and self.elastic_run == me.elastic_run:
            return f"torchrun job {me.elastic_run} restarted its workers"
        if self.host == me.host:
            if self.boot_id and me.boot_id and self.boot_id != me.boot_id:
                return "its host has rebooted since"
            if not _pid_alive(self.pid):
                return f"pid {self.pid} has ended"
            if self.pid_start and _pid_start(self.pid) not in (None, self.pid_start):
                return f"pid {self.pid} is another process now"
            if self.pid == me.pid and path not in _HELD:
                return "an earlier training of this process left it"
            return None
        if now - self.renewed > LEASE_S:
            return f"its lease was last renewed {now - self.renewed:.0f} s ago (lease {LEASE_S:.0f} s)"
        return None


def _write_new(path: Path, holder: Holder) -> None:
    """``path`` with ``holder`` in it, complete, or FileExistsError when it exists."""
    tmp = path.with_name(f"{path.name}.{holder.token}.tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic, and refused when the name exists (NFS included)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: an exclusive create, then the content
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(holder), f)
    finally:
        tmp.unlink(missing_ok=True)


class RunLock:
    """This process's hold on a run folder; ``release`` it on every way out (it also is at interpreter exit)."""

    def __init__(self, path: Path, holder: Holder, warn: Callable[[str], None]):
        self.path, self.holder, self.warn = path, holder, warn
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="mtl-run-lock", daemon=True)
        _HELD.add(path)
        atexit.register(self.release)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                if not self.renew():
                    return
            except OSError as exc:  # a file server away for a moment: try again at the next renewal
                self.warn(f"could not renew the lock {self.path} ({exc})")

    def renew(self) -> bool:
        """Push the lease forward; False (and a warning) when the lock is no longer this process's."""
        current = Holder.read(self.path)
        if current is None or current.token != self.holder.token:
            self.lost = True
            by = current.describe() if current else "nobody"
            self.warn(f"the lock {self.path} was taken over (now held by {by}): this training no longer owns it")
            return False
        renewed = Holder(**{**asdict(self.holder), "renewed": time.time()})
        tmp = self.path.with_name(f"{self.path.name}.{renewed.token}.tmp")
        tmp.write_text(json.dumps(asdict(renewed)))
        os.replace(tmp, self.path)
        self.holder = renewed
        return True

    def release(self) -> None:
        """Stop renewing and remove the lock, if it is still this process's. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        atexit.unregister(self.release)
        _HELD.discard(self.path)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        current = Holder.read(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)


def take(run_dir: RunDir, warn: Callable[[str], None]) -> RunLock:
    """Own ``run_dir`` (created if missing), taking over a stale lock; MtlError naming the holder if it is in use."""
    run_dir.root.mkdir(parents=True, exist_ok=True)
    path, me = run_dir.lock_file, Holder.this_process()
    for _ in range(10):  # each pass either takes the lock or sees another holder that got there first
        try:
            _write_new(path, me)
            return RunLock(path, me, warn)
        except FileExistsError:
            pass
        holder = Holder.read(path)
        if holder is None:
            continue  # released in the meantime
        why = holder.gone(me, path, time.time())
        if why is None:
            raise MtlError(
                f"train.output_dir={run_dir.root} is in use by {holder.describe()} ({path}); wait for that training "
                "to end or stop it, or choose another train.output_dir"
            )
        aside = path.with_name(f"{path.name}.{me.token}.stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue  # another start took it over first
        moved = Holder.read(aside)
        if moved is not None and moved.token != holder.token:  # a fresh lock taken over in between: put it back
            try:
                os.link(aside, path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        warn(f"taking over {path} from {holder.describe()}: {why}")
    raise MtlError(f"{path}: could not take the run folder's lock (other starts keep taking it)")
