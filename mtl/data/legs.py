"""Legs: one epoch read in parts under different set-ups, each training sample (or feature window) at most once.

A run saves its data position as the micro-batches per rank it consumed of the current epoch. That count means
something only under the set-up it was counted in: the world size and batch size, and for the pixel loader its
worker count and shuffle buffer too (they decide which samples a rank's first k batches hold). Resumed under the
same set-up, a loader skips k batches and the epoch goes on as if never stopped. Resumed under another (a 2-GPU job
preempted and continued on 1 GPU), the trainer closes the count as a finished ``Leg`` of the epoch, kept in the
checkpoint's state, and the new set-up starts the next leg at 0. The legs end with the epoch.

Both training loaders plan an epoch as one sequence of items in an order every rank computes alike (the pixel
loader: the samples of the shards in the epoch's shard order; the feature loader: the epoch's shuffled windows)
and give each rank an equal contiguous share of it (``share``), leaving out fewer than world size x batch size
items at the end, so that every rank runs the same number of steps. A finished leg is replayed on positions alone,
without reading any data: each rank's share under the leg's set-up, the order in which the rank read it, and the
first ``batches`` batches of that order are what the leg read (``unread`` returns the rest). The new leg cuts what
is left over its own ranks in the same way. Within a share the pixel loader has logical workers, each reading a
contiguous part through a webdataset shuffle buffer (rank batch j is worker j % W's batch j // W), so a leg read
more than a plain prefix of each share; the buffer's picks depend on the count of items only, not on what they
are, so replaying positions through it (``shuffled``, seeded by ``shuffle_seed``) names the very samples read.
The feature loader reads each share front to back, whatever workers and buffer the legs recorded
(``in_order=True``).

For example, 13 items, stopped after step k = 2 on 2 ranks x batch 1, resumed on 1 rank x batch 2 (no shuffle
buffer, one worker):

    epoch order    0  1  2  3  4  5  6  7  8  9 10 11 12
    leg 0         [---- rank 0 ----][---- rank 1 ----]     2 ranks x batch 1: 6 batches a rank
      read         0  1              6  7                  stopped after step k = 2
    unread               2  3  4  5        8  9 10 11 12

    the rest       2  3  4  5  8  9 10 11 12
    leg 1         [------- rank 0 -------]                 1 rank x batch 2: 4 batches, 12 left out

Over the epoch no item is read twice, and only the last leg's remainder is left out. An item's window and
augmentation come from a seed of (run seed, epoch, item) (``mtl.data.seeds``), not from the rank or leg that reads
it, so the resumed epoch trains on the same clips as an uninterrupted one would, in another order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from webdataset.filters import shuffle as wds_shuffle

from mtl.data.seeds import derive_seed

T = TypeVar("T")


@dataclass(frozen=True)
class Leg:
    """A finished part of an epoch, read under one set-up: ``batches`` micro-batches per rank were consumed with
    ``world_size`` ranks of ``batch_size`` items, each rank's share read by ``workers`` logical workers through
    shuffle buffers of ``shuffle_buffer`` items (the trainer records the ones of the pixel loader's config)."""

    world_size: int
    batch_size: int
    workers: int
    shuffle_buffer: int
    batches: int


@dataclass(frozen=True)
class Share:
    """One rank's share of the items left in an epoch: ``batches`` batches (the same on every rank), as one
    contiguous run of positions per logical worker (``parts``, ascending), part i holding ``part_batches[i]``."""

    batches: int
    parts: list[np.ndarray]
    part_batches: list[int]


def train_batches_per_epoch(samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank runs per epoch: all ranks the same, dropping fewer than world_size * batch_size samples."""
    return samples // (world_size * batch_size)


def share(remaining: np.ndarray, *, rank: int, world_size: int, batch_size: int, workers: int = 1) -> Share:
    """Rank ``rank``'s share of ``remaining`` (the positions left in the epoch, in epoch order): contiguous equal
    pieces, one per rank, each cut into one contiguous part per logical worker (``workers``, at least 1); worker
    ``lw`` holds the rank's batches lw, lw + W, ..."""
    n_batches = train_batches_per_epoch(len(remaining), world_size, batch_size)
    w = max(1, workers)
    pos = rank * n_batches * batch_size
    parts, part_batches = [], []
    for lw in range(w):
        nb = len(range(lw, n_batches, w))
        parts.append(remaining[pos : pos + nb * batch_size])
        part_batches.append(nb)
        pos += nb * batch_size
    return Share(n_batches, parts, part_batches)


def shuffle_seed(seed: int, epoch: int, rank: int, worker: int, leg: int) -> int:
    """The seed of logical worker ``worker``'s shuffle buffer on ``rank`` in leg number ``leg`` of ``epoch``."""
    extra = (leg,) if leg else ()  # leg 0 keeps the seed of a plain epoch
    return derive_seed(seed, epoch, rank, worker, 0x5B, *extra)


def shuffled(stream: Iterable[T], buffer: int, seed: int) -> Iterator[T]:
    """``stream`` through webdataset's shuffle buffer of ``buffer`` items, as is when ``buffer`` <= 1. The one
    buffer both the pixel loader's workers and a leg's replay use, so that they pick alike."""
    stream = iter(stream)
    return wds_shuffle(buffer, initial=buffer, seed=seed)(stream) if buffer > 1 else stream


def unread(total: int, legs: Sequence[Leg], *, epoch: int, seed: int, in_order: bool = False) -> np.ndarray:
    """Positions (in epoch order, ascending) of the epoch's ``total`` items that no leg in ``legs`` read.

    ``in_order``: each rank read its share front to back in one stream, without workers or shuffle buffer (the
    feature loader), whatever the legs recorded.
    """
    remaining = np.arange(total)
    for i, leg in enumerate(legs):
        workers, buffer = (1, 0) if in_order else (leg.workers, leg.shuffle_buffer)
        w = max(1, workers)
        taken: list[int] = []
        for rank in range(leg.world_size):
            mine = share(remaining, rank=rank, world_size=leg.world_size, batch_size=leg.batch_size, workers=workers)
            for lw, part in enumerate(mine.parts):
                order = shuffled(part.tolist(), buffer, shuffle_seed(seed, epoch, rank, lw, i))
                taken.extend(itertools.islice(order, len(range(lw, leg.batches, w)) * leg.batch_size))
        remaining = np.setdiff1d(remaining, np.asarray(taken, dtype=remaining.dtype))
    return remaining
