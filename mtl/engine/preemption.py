"""Turn SLURM's preemption/time-out signal into a clean, collective checkpoint-and-stop.

SLURM (``--signal=USR2@90``, submitit's default) and ``scontrol requeue``/``scancel`` (SIGTERM) signal every task.
The handler only sets a flag: saving inside a signal handler would race the training step, and DeepSpeed's save
is collective, so the ranks agree on the flag at the next log step (every ``train.log_every`` optimizer steps:
the agreement waits for the GPU, so it is not made at every step) and save together.

Ctrl-C (SIGINT) stops the same way, so an interactive run keeps its work; a second Ctrl-C while that save is
pending gives up on it and interrupts at once.

A launcher whose start-up takes seconds (imports, the process group) installs a StopFlag first thing, so a
signal in that time is not fatal; the trainer's own StopFlag takes over what it caught (see ``install``).
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
EXIT_PREEMPTED = 3  # exit status of a process that saved a checkpoint on one of them: the launcher should requeue


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print("interrupted: saving a checkpoint at the end of this step (Ctrl-C again to stop now)", flush=True)
        self.signum = signum

    def install(self) -> StopFlag:
        """Take over the stop signals; a stop an earlier StopFlag (a launcher's) caught counts as requested."""
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous[sig] = previous
            earlier = getattr(previous, "__self__", None)  # read after taking over: no signal falls in between
            if isinstance(earlier, StopFlag) and earlier.signum is not None and self.signum is None:
                self.signum = earlier.signum
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
