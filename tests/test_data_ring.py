"""The loader's shared-memory ring: a slot is rewritten only after the consumer released it, across processes."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch

import mtl.data.ring as ring_mod
from mtl.data.ring import PixelRing
from mtl.errors import DataError

SHAPE = (2, 3, 3, 4, 4)  # B, T, C, H, W


def test_slots_are_channels_last_batches_used_in_turn():
    ring = PixelRing(2, 3, SHAPE)
    assert ring.pixels.shape == (2, 3, *SHAPE)
    slots = [ring.acquire(1)[0] for _ in range(3)]
    assert slots == [0, 1, 2]
    buf = ring.get(1, 2)
    assert buf.shape == SHAPE and buf.permute(0, 1, 3, 4, 2).is_contiguous()
    for s in slots:
        ring.release(1, s)
    assert ring.acquire(1)[0] == 0 and ring.acquire(0)[0] == 0  # rows count separately


def test_acquire_waits_until_the_consumer_releases():
    ring = PixelRing(1, 2, SHAPE)
    ring.acquire(0), ring.acquire(0)  # both slots handed out, none released
    threading.Timer(0.3, ring.release, (0, 0)).start()
    t0 = time.monotonic()
    slot, _ = ring.acquire(0)
    assert slot == 0 and time.monotonic() - t0 >= 0.25


def test_a_slot_never_released_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(ring_mod, "WAIT_S", 0.2)
    ring = PixelRing(1, 1, SHAPE)
    ring.acquire(0)
    with pytest.raises(RuntimeError, match=r"buffer \(0, 0\) not released .* finish_batch"):
        ring.acquire(0)


def test_too_little_shared_memory_is_a_clear_error():
    with pytest.raises(DataError, match=r"cannot allocate \d+ MiB of shared memory .* data.num_workers"):
        PixelRing(2, 3, (1 << 20, 16, 3, 1024, 1024))  # 300 TiB: more than any /dev/shm


def _producer(ring: PixelRing, ready, laps: int) -> None:
    for i in range(laps):
        slot, buf = ring.acquire(0)
        buf.fill_(i % 256)
        ready.put(slot)  # as a DataLoader worker sends its batch


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_worker_process_fills_slots_the_consumer_reads_in_place(method):
    """The producer runs ahead as far as the ring lets it; a batch the consumer holds is never overwritten."""
    ctx = mp.get_context(method)
    ring, ready = PixelRing(1, 2, SHAPE), ctx.Queue()
    proc = ctx.Process(target=_producer, args=(ring, ready, 40))
    proc.start()
    try:
        for i in range(40):
            slot = ready.get(timeout=60)
            assert slot == i % 2
            want = torch.full(SHAPE, i % 256, dtype=torch.uint8)
            assert torch.equal(ring.get(0, slot), want), i
            time.sleep(0.01)  # hold it: the producer, a lap ahead, must wait instead of writing into it
            assert torch.equal(ring.get(0, slot), want), i
            ring.release(0, slot)
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0
