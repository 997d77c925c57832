"""Shared-memory batch buffers that the loader's workers fill and its consumer reads, reused for every batch.

Why not let the DataLoader hand each batch over in its own shared-memory segment, as it does with tensors: per batch
that is a new segment, a file-descriptor handshake with the worker, a page fault for every 4 KiB on both sides
(about 3 us each on a VM, measured: more than resizing the frames) and an unmap. A ring is made once per loader
(kept across passes with its persistent workers), before the workers fork, so they share its pages; a batch then
travels as (row, slot) plus its small label arrays, and its pages are warm from the second lap on.

Row r belongs to worker r (the in-process loader is row 0); each row has ``slots`` buffers, used in turn. A worker
writes a slot only after the consumer released it (``finish_batch`` does, once it has copied the pixels out). With the
DataLoader's ``prefetch_factor`` P a worker holds at most P unconsumed batches, so P + 1 slots never wait.
"""

from __future__ import annotations

import math
import os
import time

import torch

from mtl.errors import DataError

WAIT_S = 600.0  # longer than any consumer holds a slot; past it the consumer is gone or never releases


class PixelRing:
    """``rows x slots`` uint8 batch buffers [B, T, 3, H, W] in shared memory, laid out channels-last (as
    [B, T, H, W, 3]) like decoded and resized frames, so filling one is a plain copy."""

    def __init__(self, rows: int, slots: int, batch_shape: tuple[int, int, int, int, int]):
        b, t, c, h, w = batch_shape
        per_batch = math.prod(batch_shape)
        try:
            storage = torch.UntypedStorage._new_shared(rows * slots * per_batch)  # as torch's own collate does
        except RuntimeError as exc:
            raise DataError(
                f"cannot allocate {rows * slots * per_batch / 2**20:.0f} MiB of shared memory for {rows} loader "
                f"workers' batch buffers ({str(exc).strip()}); give /dev/shm more room (a container's --shm-size) "
                f"or use fewer data.num_workers or a smaller data.batch_size"
            ) from None
        strides = (slots * per_batch, per_batch, t * h * w * c, h * w * c, 1, w * c, c)
        self.pixels = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (rows, slots, *batch_shape), strides)
        self.free = torch.ones(rows, slots, dtype=torch.int32).share_memory_()
        self.slots = slots
        self._next = [0] * rows  # per process: forked workers each advance their own copy
        self._free = self.free.numpy()

    def __getstate__(self) -> dict:  # a spawned worker gets the shared tensors, and rebuilds the numpy view
        return {k: v for k, v in self.__dict__.items() if k != "_free"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._free = self.free.numpy()

    def acquire(self, row: int) -> tuple[int, torch.Tensor]:
        """The next slot of ``row`` and its buffer, once the consumer has released it."""
        slot = self._next[row]
        self._next[row] = (slot + 1) % self.slots
        if not self._free[row, slot]:
            self._wait(row, slot)
        self._free[row, slot] = 0
        return slot, self.pixels[row, slot]

    def _wait(self, row: int, slot: int) -> None:
        parent, start = os.getppid(), time.monotonic()
        while not self._free[row, slot]:
            if os.getppid() != parent:  # the consumer's process died: stop instead of waiting forever
                raise SystemExit(1)
            if time.monotonic() - start > WAIT_S:
                raise RuntimeError(f"loader batch buffer ({row}, {slot}) not released for {WAIT_S:.0f} s: "
                                   f"batches must go through finish_batch")  # fmt: skip
            time.sleep(1e-4)

    def reset(self, row: int) -> None:
        """All of ``row``'s slots free, filled from the first again: a worker starting a pass (its earlier batches
        were all read, or dropped with an abandoned pass, and will never be released)."""
        self._free[row] = 1
        self._next[row] = 0

    def get(self, row: int, slot: int) -> torch.Tensor:
        return self.pixels[row, slot]

    def release(self, row: int, slot: int) -> None:
        self._free[row, slot] = 1
