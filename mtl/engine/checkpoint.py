"""DeepSpeed checkpoints that survive being killed mid-save, with the last K and the best kept.

A tag directory counts only once ``complete.json`` exists in it; that file is written by rank 0 after every rank
has finished its part (barrier), with an atomic rename, and records every file's size (a stat each). A run killed
while saving leaves a tag without it, which ``latest_complete`` ignores and the next save removes. DeepSpeed's own
``latest`` file is not used: it could name a half-written tag.

Each rank hashes the files it wrote itself (``layout.write_hashes``), in a thread that starts as the save ends, so
the ranks hash in parallel, from their page cache, while training goes on; the next save (or the process's exit)
waits for it. Resume checks sizes; hashes are checked when asked (``mtl runs verify``,
``train.verify_checkpoint``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl.engine.distributed import barrier
from mtl.errors import MtlError, writing
from mtl.runs.layout import COMPLETE, TAG_RE, complete_tags, read_marker, tag_for, write_hashes, write_marker
from mtl.runs.safe_load import weights_only_loads
from mtl.runs.trained import weights_mismatch


@dataclass
class TrainState:
    """What a resumed run needs beyond the weights and optimizer (DeepSpeed keeps those)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches per rank of `epoch` consumed under `reader` (the data position)
    reader: dict[str, int] | None = None  # world_size, batch_size, workers, shuffle_buffer the position counts in
    epoch_legs: list[dict[str, int]] = field(default_factory=list)  # earlier parts of `epoch` (loader.Leg fields)
    world_size: int | None = None  # of the run that saved (None: saved before it was recorded)
    zero_stage: int | None = None
    best_score: float = float("-inf")
    best_tag: str | None = None
    bad_steps_total: int = 0
    run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def samples_in_epoch(self) -> int:
        """Samples of `epoch` consumed over all ranks: the data position independent of the world size."""
        legs = sum(g["world_size"] * g["batch_size"] * g["batches"] for g in self.epoch_legs)
        here = self.reader["world_size"] * self.reader["batch_size"] * self.micro_in_epoch if self.reader else 0
        return legs + here

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


_hashing: threading.Thread | None = None  # this rank's hashing of its last save's files


def _hash_in_background(tag_dir: Path, rank: int) -> None:
    def run() -> None:
        try:
            write_hashes(tag_dir, rank)
        except OSError as exc:  # the tag was removed meanwhile, a full disk: that save is only unverifiable
            print(f"warning: {tag_dir}: its files' sha256 not recorded ({exc})", file=sys.stderr)

    global _hashing
    _hashing = threading.Thread(target=run, name=f"hash-{tag_dir.name}")  # not a daemon: the process waits for it
    _hashing.start()


def wait_hashes() -> None:
    """Until this rank's files of its last save are hashed."""
    global _hashing
    if _hashing is not None:
        _hashing.join()
        _hashing = None


def save(engine: Any, ckpt_dir: Path, state: TrainState, rank: int, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written; its sha256 records follow (``wait_hashes``)."""
    wait_hashes()  # the previous save's hashing ends before any tag can be pruned
    tag = tag_for(state.step)
    tag_dir = ckpt_dir / tag
    if (tag_dir / COMPLETE).is_file():  # this step is already saved (e.g. preempted right after resuming)
        return tag
    barrier()
    if rank == 0 and tag_dir.exists():  # a half-written save of the same step, from a killed run
        shutil.rmtree(tag_dir)
    barrier()
    try:
        with writing(tag_dir):  # a full disk: `<tag dir>: No space left on device`, not torch's `unexpected pos`
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"mtl_state": state.to_dict()},
                                   save_latest=False)  # fmt: skip
            torch.save(_rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    except OSError:
        # Never complete (the marker needs every rank past the barrier below): its space is given back now
        # rather than at the next save, which the other ranks will not reach (their launcher stops them).
        shutil.rmtree(tag_dir, ignore_errors=True)
        raise
    barrier()
    if rank == 0:
        write_marker(tag_dir, state.to_dict())
        _prune(ckpt_dir, keep_last, state.best_tag)
    barrier()
    _hash_in_background(tag_dir, rank)  # after the save, so it never slows another rank's write
    return tag


def _prune(ckpt_dir: Path, keep_last: int, best_tag: str | None) -> None:
    complete = complete_tags(ckpt_dir)
    keep = set(complete[-keep_last:])
    if best_tag:
        keep.add(best_tag)
    for p in ckpt_dir.iterdir():
        if TAG_RE.match(p.name) and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)  # older complete tags and incomplete leftovers alike


UNIVERSAL = "universal"  # DeepSpeed's universal form of a tag, inside the tag dir (pruned with it)


def convert_to_universal(tag_dir: Path) -> Path:
    """The tag in DeepSpeed's universal layout (any world size, any ZeRO stage), converted once: run it on one rank
    while the others wait. Written beside, then renamed into place, so a kill mid-way leaves nothing half-done."""
    out = tag_dir / UNIVERSAL
    if out.is_dir():
        return out
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    work = tag_dir / f".{UNIVERSAL}.tmp"  # DeepSpeed also writes a `latest_universal` file beside its output
    shutil.rmtree(work, ignore_errors=True)
    args = SimpleNamespace(input_folder=str(tag_dir), output_folder=str(work / UNIVERSAL), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                           inject_missing_state=True)  # fmt: skip
    with weights_only_loads(tag_dir), contextlib.redirect_stdout(sys.stderr):  # it prints its progress
        ds_to_universal(args)
        _serve_both_stages(work / UNIVERSAL)
    os.replace(work / UNIVERSAL, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _serve_both_stages(uc: Path) -> None:
    """DeepSpeed 0.19 writes a universal checkpoint that only an engine of the source's kind can open: ZeRO-3 looks
    for ``zero_pp_rank_0_*model_states.pt`` and a nested optimizer state (with the step), ZeRO-1/2 for
    ``mp_rank_*model_states.pt`` and a ``ds_version``. Both are added, so ZeRO-2 -> 3 and 3 -> 2 load too."""
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM_GROUPS

    for f in uc.glob("mp_rank_*_model_states.pt"):
        twin = uc / f"zero_pp_rank_0_{f.name}"
        if not twin.exists():
            shutil.copyfile(f, twin)
    for f in uc.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"):
        twin = uc / f.name.removeprefix("zero_pp_rank_0_")
        if not twin.exists():
            shutil.copyfile(f, twin)
    path = uc / "zero" / "optimizer_state.pt"
    sd = torch.load(path, weights_only=True)
    if OPTIMIZER_STATE_DICT not in sd:
        step = torch.load(next((uc / "zero").glob("*/step.pt")), weights_only=True)
        sd[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: sd[PARAM_GROUPS]}
    if DS_VERSION not in sd:
        from deepspeed import __version__

        sd[DS_VERSION] = __version__
    torch.save(sd, path)


def _restore_param_groups(engine: Any, uc: Path) -> None:
    """Every group's hyperparameters as saved: DeepSpeed's ZeRO-3 universal load gives all groups the first one's
    (its lr, weight decay), which would undo layer-wise lr decay and no-decay groups."""
    from deepspeed.checkpoint.constants import PARAM_GROUPS

    saved = torch.load(uc / "zero" / "optimizer_state.pt", weights_only=True)[PARAM_GROUPS]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved) != len(groups):
        raise MtlError(f"{uc}: {len(saved)} optimizer parameter groups saved, the model has {len(groups)}")
    for group, was in zip(groups, saved):
        group.update({k: v for k, v in was.items() if k != "params"})


def load(engine: Any, ckpt_dir: Path, tag: str, rank: int, universal: bool = False) -> TrainState:
    """Collective. Restores weights, optimizer, scheduler (DeepSpeed) and this rank's RNG streams; ``universal``:
    from the tag's universal form (``convert_to_universal``), into an engine built to load it."""
    load_dir, load_tag = (ckpt_dir / tag, UNIVERSAL) if universal else (ckpt_dir, tag)
    with weights_only_loads(ckpt_dir / tag):  # DeepSpeed's loader unpickles; only weights get through
        try:
            path, _client = engine.load_checkpoint(str(load_dir), tag=load_tag)
        except RuntimeError as exc:  # saved by another architecture (a model width changed): as `mtl eval` says it
            mismatch = weights_mismatch(exc)
            if mismatch is None:
                raise
            raise MtlError(f"{ckpt_dir / tag}: weights do not fit the model ({mismatch}); resume with the model "
                           "settings it was saved with, or train in another train.output_dir") from None  # fmt: skip
        if universal:
            _restore_param_groups(engine, load_dir / load_tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    state = read_state(ckpt_dir / tag)
    rng_file = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():  # absent when resuming on a different world size
        _restore_rng_state(rng_file)
    return state


def _restore_rng_state(path: Path) -> None:
    """A rank's RNG streams, as ``save`` wrote them; anything else (a crafted pickle, a truncated or foreign file)
    is refused naming it, as the model and optimizer files are (the run stops, so a stream half set is moot)."""
    with weights_only_loads(path):  # a pickle that needs more than tensors and plain containers: refused
        try:
            _set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            text = str(exc).strip()
            what = text.splitlines()[0] if text else repr(exc)
            raise MtlError(f"{path}: not an RNG state written by `mtl train` ({what})") from None
