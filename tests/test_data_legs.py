"""Legs of an epoch (``mtl.data.legs``) on positions alone: what a finished leg read, and what is left for the next."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mtl.data.legs import Leg, share, shuffle_seed, shuffled, unread
from mtl.data.seeds import derive_seed


def test_the_drawing_in_the_docstring() -> None:
    """13 items, 2 ranks x batch 1 stopped after step 2, then 1 rank x batch 2."""
    first = Leg(world_size=2, batch_size=1, workers=1, shuffle_buffer=0, batches=2)
    left = unread(13, [first], epoch=0, seed=0)
    assert left.tolist() == [2, 3, 4, 5, 8, 9, 10, 11, 12]
    mine = share(left, rank=0, world_size=1, batch_size=2)
    assert mine.batches == 4 and [p.tolist() for p in mine.parts] == [[2, 3, 4, 5, 8, 9, 10, 11]]


def test_read_in_order_ignores_the_workers_and_buffer_a_leg_recorded() -> None:
    """The feature loader reads each share front to back: a leg's workers and buffer (from the config) do not
    change what it read."""
    plain = Leg(world_size=2, batch_size=1, workers=1, shuffle_buffer=0, batches=2)
    recorded = Leg(world_size=2, batch_size=1, workers=3, shuffle_buffer=5, batches=2)
    assert unread(13, [recorded], epoch=1, seed=7, in_order=True).tolist() == [2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert unread(13, [plain], epoch=1, seed=7).tolist() == [2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert unread(13, [recorded], epoch=1, seed=7).tolist() != [2, 3, 4, 5, 8, 9, 10, 11, 12]


def _read(left: np.ndarray, leg: Leg, number: int, *, epoch: int, seed: int) -> list[int]:
    """What the pixel loader's ranks read in their first ``leg.batches`` batches: rank batch j is logical worker
    j % W's batch j // W, each worker streaming its part through its shuffle buffer."""
    out = []
    for rank in range(leg.world_size):
        mine = share(left, rank=rank, world_size=leg.world_size, batch_size=leg.batch_size, workers=leg.workers)
        w = len(mine.parts)
        streams = [shuffled(p.tolist(), leg.shuffle_buffer, shuffle_seed(seed, epoch, rank, lw, number))
                   for lw, p in enumerate(mine.parts)]  # fmt: skip
        for j in range(min(leg.batches, mine.batches)):
            out += list(itertools.islice(streams[j % w], leg.batch_size))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_each_item_once_over_the_legs_of_an_epoch(seed: int) -> None:
    """Random set-ups, each stopped after a few batches, then a last leg to the end: no item read twice, and
    fewer than the last leg's world size x batch left out."""
    rng = np.random.default_rng(seed)
    total, epoch, legs, seen = 97, 3, [], []
    for number in range(4):
        leg = Leg(world_size=int(rng.integers(1, 4)), batch_size=int(rng.integers(1, 4)),
                  workers=int(rng.integers(0, 4)), shuffle_buffer=int(rng.integers(0, 9)),
                  batches=int(rng.integers(1, 6)))  # fmt: skip
        left = unread(total, legs, epoch=epoch, seed=seed)
        assert left.tolist() == sorted(set(range(total)) - set(seen)), "unread names what the readers read"
        seen += _read(left, leg, number, epoch=epoch, seed=seed)
        legs.append(leg)
    last = Leg(world_size=3, batch_size=2, workers=2, shuffle_buffer=4, batches=10_000)
    left = unread(total, legs, epoch=epoch, seed=seed)
    seen += _read(left, last, len(legs), epoch=epoch, seed=seed)
    assert len(seen) == len(set(seen)), "an item was read twice in the epoch"
    assert total - 3 * 2 < len(seen) <= total


def test_shares_are_equal_and_contiguous() -> None:
    left = np.array([0, 2, 3, 5, 6, 7, 9, 11, 12, 13, 14])  # 11 items, 2 ranks x batch 2: 2 batches each
    a, b = (share(left, rank=r, world_size=2, batch_size=2, workers=3) for r in (0, 1))
    assert a.batches == b.batches == 2 and a.part_batches == [1, 1, 0]
    assert np.concatenate(a.parts + b.parts).tolist() == left[:8].tolist()


def test_seeds_stay_what_they_were() -> None:
    """A sample's window and augmentation come from these: a change would make a resumed run train on other clips
    than the run it continues."""
    assert derive_seed(5, 2, 0xC1) == 2947930604
    assert derive_seed(-1, 1 << 70, 3) == 374020638
    assert shuffle_seed(5, 2, 1, 0, 0) == derive_seed(5, 2, 1, 0, 0x5B)  # leg 0: the seed of a plain epoch
    assert shuffle_seed(5, 2, 1, 0, 1) != shuffle_seed(5, 2, 1, 0, 0)
