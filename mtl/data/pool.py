"""Worker processes of the data commands (`mtl pack`, `mtl shards verify`) that never outlive the command.

A ``ProcessPoolExecutor`` worker waits on a queue whose write end every sibling also holds, so after ``kill -9`` of
the command it never sees end-of-file and lives on. Each worker here asks the kernel for SIGKILL when its parent
dies (``PR_SET_PDEATHSIG``, Linux), and takes Ctrl-C's SIGINT with the default action (it ends, silently, instead of
printing a KeyboardInterrupt traceback per worker): the command itself reports the interruption, once.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies (no-op where prctl is not available)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    if os.getppid() != parent:  # the parent died before the request above: nobody would signal us
        os._exit(1)


def _worker_init(parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def process_pool(workers: int) -> cf.ProcessPoolExecutor:
    """A process pool whose workers end with the command: on its death (even SIGKILL) and on Ctrl-C."""
    return cf.ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
