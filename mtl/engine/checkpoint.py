"""DeepSpeed checkpoints that survive being killed mid-save, with the last K and the best kept.

A tag directory counts only once ``complete.json`` exists in it; that file is written by rank 0 after every rank
has finished its part (barrier), with an atomic rename. A run killed while saving leaves a tag without it, which
``latest_complete`` ignores and the next save removes. DeepSpeed's own ``latest`` file is not used: it could
name a half-written tag.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.engine.distributed import barrier
from mtl.engine.layout import COMPLETE, TAG_RE, complete_tags, read_marker, tag_for, write_marker
from mtl.engine.safe_load import weights_only_loads


@dataclass
class TrainState:
    """What a resumed run needs beyond the weights and optimizer (DeepSpeed keeps those)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed (the data position)
    best_score: float = float("-inf")
    best_tag: str | None = None
    bad_steps_total: int = 0
    run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def read_state(tag_dir: Path) -> TrainState:
    return TrainState.from_dict(read_marker(tag_dir))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [np_state[2], np_state[3], float(np_state[4])],
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, ckpt_dir: Path, state: TrainState, rank: int, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(state.step)
    tag_dir = ckpt_dir / tag
    if (tag_dir / COMPLETE).is_file():  # this step is already saved (e.g. preempted right after resuming)
        return tag
    barrier()
    if rank == 0 and tag_dir.exists():  # a half-written save of the same step, from a killed run
        shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"mtl_state": state.to_dict()}, save_latest=False)
    torch.save(_rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        write_marker(tag_dir, state.to_dict())
        _prune(ckpt_dir, keep_last, state.best_tag)
    barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, best_tag: str | None) -> None:
    complete = complete_tags(ckpt_dir)
    keep = set(complete[-keep_last:])
    if best_tag:
        keep.add(best_tag)
    for p in ckpt_dir.iterdir():
        if TAG_RE.match(p.name) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)  # older complete tags and incomplete leftovers alike


def load(engine: Any, ckpt_dir: Path, tag: str, rank: int) -> TrainState:
    """Collective. Restores weights, optimizer, scheduler (DeepSpeed) and this rank's RNG streams."""
    with weights_only_loads(ckpt_dir / tag):  # DeepSpeed's loader unpickles; only weights get through
        path, _client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    state = read_state(ckpt_dir / tag)
    rng_file = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():  # absent when resuming on a different world size
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state
