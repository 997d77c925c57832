"""Seeds derived from a run's seed and a few integers (epoch, sample, rank, a salt), for every random choice of
the loaders: the epoch's shard order, a sample's window and augmentation, a shuffle buffer, a feature window.

Derived, not drawn from a shared generator, so that each choice depends only on what names it: a sample gets the
same window and augmentation on whichever rank, worker or leg of an epoch reads it (``mtl.data.legs``), and a run
resumed mid-epoch repeats the choices of the run it continues. The trailing salt (``0xC1``, ``0xA6``, ...) keeps the
streams of different uses apart.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A seed for numpy or ``random`` from ``parts`` (any ints, negative or large ones too), the same on every
    machine and run."""
    return int(np.random.SeedSequence([p % (1 << 63) for p in parts]).generate_state(1)[0])
