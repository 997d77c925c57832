"""Streaming loaders over the shards of `mtl pack`: training clips and evaluation clips, as Batch dicts.

Why our own split of the data over ranks and workers instead of webdataset's ``split_by_node`` /
``split_by_worker``: those hand out whole shards, so ranks get unequal sample counts whenever shards differ in size
(a split's last shard always does) or their number does not divide by ranks x workers, and a rank with no shard
hangs. Under DeepSpeed every rank must run the same number of steps, or the others wait forever in a collective.
So an epoch here is one sequence of samples (the shards in a per-epoch order, seeded identically on every rank,
concatenated), cut at sample granularity into equal contiguous pieces: one per rank, then one per worker. Each
worker still streams its shards front to back (a piece has at most two partial shards, entered by seeking), and
webdataset provides the tar grouping and the shuffle buffer.

Batch contract (see the project notes): frames uint8 [B,T,3,H,W] (channels-last in memory) with ``gain``/``bias``
f32 [B,T,3] that normalise them (``frames_float``: gain * frames + bias; `mtl.runs.model_io.forward` applies it on
the device), has_image/pad bool [B,T], ``image_index`` i64 [n] (the flat indices in B*T of the frames with an
image), and per registered task its labels [B,T,*label_shape] (va f32 [B,T,2], expr i64 [B,T], au f32 [B,T,12])
and ``<task>_valid`` bool [B,T]; training adds ``frame`` i64 [B,T] and ``sample`` i64 [B] (the sample's
index in the split, for checks); evaluation adds ``video`` list[str] and ``frame`` i64 [B,T] (0 at padding).

Workers write uint8 pixels into a shared-memory ring of batch buffers (``PixelRing``, made once per loader and reused)
and send the slot with a per-frame affine map. The main process copies the slot's pixels out (into pinned memory
when CUDA is there, so the copy to the GPU is asynchronous) and frees the slot (``finish_batch``); the float frames
are made on the device the network runs on: a quarter of the bytes over PCIe, and one multiply-add on the GPU
instead of float passes on the CPU.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import signal
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtl.allocator import keep_freed_memory
from mtl.data.folds import fold_role, fold_samples
from mtl.data.legs import Leg, share, shuffle_seed, shuffled, train_batches_per_epoch, unread
from mtl.data.manifest import read_manifest
from mtl.data.prefetch import prefetch
from mtl.data.ring import PixelRing
from mtl.data.seeds import derive_seed
from mtl.data.shardio import Sample, ShardReader, check_size, parse_sample, read_raw
from mtl.data.transforms import ClipAugment, ClipTransform, decode_clip
from mtl.data.video_index import SampleInfo
from mtl.errors import DataError, MtlError
from mtl.tasks import tasks

# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Piece:
    """Samples [first, stop) of shard ``shard``."""

    shard: int
    first: int
    stop: int


@dataclass
class SplitTable:
    """Shard paths and sample counts of one split, from the manifest."""

    root: Path
    paths: list[Path]
    counts: list[int]
    sample_frames: list[list[int]]
    sizes: list[int | None]  # bytes per shard in the manifest (None: not recorded), checked at every open
    # per shard, the samples (indices in the shard file) it stands for, in order; None: all of them. A fold run's
    # selection of videos (mtl.data.folds): then sample i of a shard here is sample indices[s][i] of its file
    indices: list[list[int] | None] | None = None

    @classmethod
    def load(cls, root: str | Path, split: str) -> SplitTable:
        """The split's shards, each checked to have the manifest's size (one stat each, before any worker starts,
        so a changed shard stops a run with one line naming it)."""
        root = Path(root)
        shards = read_manifest(root).split(split).shards
        table = cls(root, [root / s.path for s in shards], [s.samples for s in shards],
                    [s.sample_frames for s in shards], [s.bytes for s in shards])  # fmt: skip
        for path, size in zip(table.paths, table.sizes):
            check_size(path, size)
        return table

    @classmethod
    def select(cls, root: str | Path, samples: list[SampleInfo]) -> SplitTable:
        """The shards (of any splits) holding ``samples``, each standing for just those of its samples, in shard
        order; shards with none are left out."""
        root = Path(root)
        manifest = read_manifest(root)
        wanted: dict[tuple[str, int], list[int]] = {}
        for s in samples:
            wanted.setdefault((s.split, s.shard), []).append(s.index)
        table = cls(root, [], [], [], [], [])
        for split in dict.fromkeys(s.split for s in samples):
            for i, shard in enumerate(manifest.split(split).shards):
                keep = sorted(wanted.get((split, i), []))
                if not keep:
                    continue
                table.paths.append(root / shard.path)
                table.counts.append(len(keep))
                table.sample_frames.append([shard.sample_frames[j] for j in keep])
                table.sizes.append(shard.bytes)
                table.indices.append(keep)
        for path, size in zip(table.paths, table.sizes):
            check_size(path, size)
        return table

    def file_index(self, shard: int, i: int) -> int:
        """Sample ``i`` of shard ``shard`` here, as an index in the shard file."""
        idx = self.indices[shard] if self.indices is not None else None
        return i if idx is None else idx[i]

    def read(self, p: Piece) -> Iterator[tuple[int, dict]]:
        """(index here, raw sample) of the samples of piece ``p``: the file's, or the selected ones only."""
        path, size = self.paths[p.shard], self.sizes[p.shard]
        idx = self.indices[p.shard] if self.indices is not None else None
        if idx is None:
            for raw in read_raw(path, p.first, p.stop, size):
                yield raw["__index__"], raw
            return
        wanted = idx[p.first : p.stop]
        here = {j: p.first + n for n, j in enumerate(wanted)}
        for raw in read_raw(path, wanted[0], wanted[-1] + 1, size, only=frozenset(wanted)):
            yield here[raw["__index__"]], raw

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def base(self) -> list[int]:
        """Index in the split of each shard's first sample."""
        return [0, *itertools.accumulate(self.counts)][:-1]


def cut(order: list[int], counts: list[int], start: int, stop: int) -> list[Piece]:
    """The pieces of shards (taken in ``order``, concatenated) covering positions [start, stop)."""
    out, pos = [], 0
    for s in order:
        a, b = pos, pos + counts[s]
        pos = b
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            out.append(Piece(s, lo - a, hi - a))
        if pos >= stop:
            break
    return out


def _pieces(order: list[int], counts: list[int], positions: np.ndarray) -> list[Piece]:
    """The shard pieces that hold ``positions`` (ascending), one per contiguous run."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    out = []
    for run in np.split(positions, breaks):
        out.extend(cut(order, counts, int(run[0]), int(run[-1]) + 1))
    return out


def plan_train_epoch(
    counts: list[int],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    workers: int,
    legs: tuple[Leg, ...] | list[Leg] = (),
) -> tuple[int, list[list[Piece]], list[int]]:
    """(batches per rank, pieces per logical worker, batches per logical worker) for one rank and epoch.

    Rank batch j is logical worker j % W's batch j // W: the DataLoader asks workers round-robin, so the batches
    come out in order j = 0, 1, 2, ... and a resume can skip exactly the first k of them. After finished ``legs``
    (a resume on another set-up, see ``mtl.data.legs``), the plan covers only the samples they left.
    """  # fmt: skip
    order = np.random.default_rng(derive_seed(seed, epoch, 0x5A4D)).permutation(len(counts)).tolist()
    remaining = unread(sum(counts), legs, epoch=epoch, seed=seed)
    mine = share(remaining, rank=rank, world_size=world_size, batch_size=batch_size, workers=workers)
    return mine.batches, [_pieces(order, counts, p) for p in mine.parts], mine.part_batches


def plan_eval(
    sample_frames: list[list[int]], clip_len: int, batch_size: int, rank: int, world_size: int
) -> tuple[int, list[list[tuple[int, int, int]]]]:
    """(batches per rank, this rank's batches of clips (shard, sample, first frame offset)), in split order."""
    clips = [
        (s, i, c * clip_len)
        for s, frames in enumerate(sample_frames)
        for i, n in enumerate(frames)
        for c in range(math.ceil(n / clip_len))
    ]
    bounds = [r * len(clips) // world_size for r in range(world_size + 1)]
    n_batches = max(math.ceil((bounds[r + 1] - bounds[r]) / batch_size) for r in range(world_size))
    mine = clips[bounds[rank] : bounds[rank + 1]]
    return n_batches, [mine[j : j + batch_size] for j in range(0, len(mine), batch_size)]


# ------------------------------------------------------------------------------------------------ clips


def label_arrays(batch: int, clip_len: int) -> dict[str, np.ndarray]:
    """Per-frame fields of a batch, all padding; numpy so a worker sends them through its pipe in one pickle
    (as tensors each would need its own shared-memory segment and file-descriptor handshake)."""
    labels = {}
    for t in tasks():
        labels[t.name] = np.zeros((batch, clip_len, *t.label_shape), t.batch_dtype)
        labels[t.valid_key] = np.zeros((batch, clip_len), bool)
    return {
        "has_image": np.zeros((batch, clip_len), bool),
        "pad": np.ones((batch, clip_len), bool),
        "frame": np.zeros((batch, clip_len), np.int64),
        **labels,
        "gain": np.zeros((batch, clip_len, 3), np.float32),  # pixels -> normalised frames, per frame and channel
        "bias": np.zeros((batch, clip_len, 3), np.float32),  # (0 where there is no image: those frames stay 0)
    }


def put_labels(arrays: dict[str, np.ndarray], k: int, s: Sample, a: int, b: int) -> None:
    """Row k of the batch <- frames [a, b) of s (the rest of the row stays padding)."""
    n = b - a
    arrays["has_image"][k, :n] = s.has_image[a:b]
    arrays["pad"][k, :n] = False
    arrays["frame"][k, :n] = s.frames[a:b]
    for key, v in s.labels.items():
        arrays[key][k, :n] = v[a:b]


def finish_batch(batch: dict, ring: PixelRing, pin: bool = False) -> dict:
    """Consumer side: numpy fields -> tensors, ``frames`` <- a uint8 copy of the batch's ring slot (channels-last
    as in the ring, so a plain memcpy), in pinned memory when ``pin`` (all tensors then are, for asynchronous
    copies to the GPU); then the slot is released for its worker's next batch. The frames are normalised later,
    on the device (`frames_float`). ``image_index``: the flat indices of the frames with an image, found here so
    that the network need not ask the GPU how many there are (a host sync)."""
    images = np.flatnonzero((batch["has_image"] & ~batch["pad"]).reshape(-1))
    out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    out["image_index"] = torch.from_numpy(images)
    row, slot = out.pop("slot")
    try:
        pixels = ring.get(row, slot)[: len(out["gain"])]
        frames = torch.empty_strided(pixels.shape, pixels.stride(), dtype=torch.uint8, pin_memory=pin)
        frames.copy_(pixels)
    finally:
        ring.release(row, slot)
    if pin:
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return {"frames": frames, **out}


def frames_float(frames: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A batch's normalised float32 frames from its uint8 ``frames`` and per-frame ``gain``/``bias``, computed where
    ``frames`` is (gain and bias follow it)."""
    return ClipTransform.finish(frames, gain.to(frames.device), bias.to(frames.device))


def _placement(device: str | torch.device | None) -> tuple[torch.device | None, bool]:
    """(device the loader delivers to, None for the host; whether host batches are pinned): pinned for a CUDA
    device, and with no device whenever CUDA is there (the consumer will copy them to it)."""
    device = torch.device(device) if device is not None else None
    pin = torch.cuda.is_available() if device is None else device.type == "cuda"
    return (None if device is None or device.type == "cpu" else device), pin


def _identity(x):
    return x


PREFETCH = 2  # batches each worker has ready ahead (the DataLoader's default); the ring has PREFETCH + 1 slots


def _ring(stream: TrainStream | EvalStream, workers: int) -> PixelRing:
    """A ring for ``stream``'s passes, made before its workers fork so that they share it."""
    stream.ring = PixelRing(max(1, workers), PREFETCH + 1, stream.batch_shape)
    return stream.ring


def _row() -> int:
    """This process's row of the ring: its worker id (0 in-process)."""
    info = get_worker_info()
    return info.id if info is not None else 0


def _make_dataloader(stream: IterableDataset, workers: int, seed: int, persistent: bool = False) -> DataLoader:
    """Streams yield whole batches (no collation). The DataLoader does not pin: the pixels stay in the ring until
    ``finish_batch`` copies them out. The DataLoader's own generator, seeded here: by default it draws its workers'
    base seed from torch's global RNG, so a run resumed mid-epoch would train on a shifted dropout and masking
    stream. ``persistent``: the workers (and the ring) serve every later pass too."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=workers, generator=generator,
                      prefetch_factor=PREFETCH if workers else None, worker_init_fn=_worker_init,
                      persistent_workers=persistent and workers > 0)  # fmt: skip


def _batches(loader: DataLoader) -> Iterator[dict]:
    """One pass of ``loader``. An MtlError in a worker arrives as itself, with its one-line message (the
    DataLoader would wrap the worker's whole traceback into it)."""
    try:
        yield from loader
    except MtlError as exc:
        text = str(exc)
        if not text.startswith("Caught "):
            raise
        _, sep, message = text.rstrip().rpartition(f"{type(exc).__module__}.{type(exc).__qualname__}: ")
        raise type(exc)(message if sep else text) from None


def _worker_init(_: int) -> None:
    """Keep the Python objects inherited from the parent out of the worker's garbage collector: collecting
    would walk (and so copy-on-write) the parent's whole heap, which costs more than the decoding. And keep freed
    memory for the next batch's decode and resize buffers instead of faulting in fresh pages each time.

    Ctrl-C reaches every process of the terminal's group: the trainer takes it as "save and stop" at the end of
    the step, but a worker killed by it would fail the main process before it can save. So workers ignore SIGINT
    and SIGUSR2 (SLURM's preemption signal, sent to every process of a task); they end when the loader ends them
    or their parent exits."""
    gc.freeze()
    keep_freed_memory()
    for sig in (signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class _ClipMaker:
    """Decodes and transforms the frames of one clip into its slot of the batch buffer; shared by both loaders."""

    def __init__(self, clip_len: int, image_size: int, mean, std, augment=None):
        self.clip_len, self.size, self.augment = clip_len, image_size, augment
        self.tf = ClipTransform(image_size, tuple(mean), tuple(std))

    def fill(self, arrays: dict, pixels: torch.Tensor, k: int, s: Sample | None, a: int, b: int, rng) -> None:
        """Clip k of the batch <- frames [a, b) of s: uint8 pixels, and the gain/bias that finish them (zero pixels
        and zero gain/bias where there is no image or padding)."""
        dst = pixels[k]
        rows = np.flatnonzero(s.has_image[a:b]) if s is not None else np.zeros(0, np.int64)
        if len(rows) < self.clip_len:
            empty = torch.ones(self.clip_len, dtype=torch.bool)
            empty[torch.from_numpy(rows)] = False
            dst[empty] = 0
        if len(rows):
            try:
                x = decode_clip(s.blob, s.offsets, rows + a)
            except ValueError as exc:
                raise DataError(f"video {s.video}, frames {s.frames[a]}-{s.frames[b - 1]}: {exc}; "
                                f"run `mtl shards verify`") from None  # fmt: skip
            aug = None if rng is None else ClipAugment.draw(x.shape[-2], x.shape[-1], self.augment, rng)
            x = self.tf.geometry(x, aug)
            if rows[-1] - rows[0] + 1 == len(rows):  # the usual case: consecutive rows, a view
                dst[int(rows[0]) : int(rows[-1]) + 1].copy_(x)
            else:
                dst[torch.from_numpy(rows)] = x
            gain, bias = self.tf.affine(x, aug)
            arrays["gain"][k, rows] = gain.numpy()
            arrays["bias"][k, rows] = bias.numpy()


# ------------------------------------------------------------------------------------------------ training


class TrainStream(IterableDataset):
    """Training clips of one rank, one epoch a pass; see ``plan_train_epoch`` for who reads what.

    The epoch (and the resume point and legs) of the next pass is set with ``set_pass`` in the main process and
    written to a small shared buffer, which persistent workers read at the start of each pass to plan it too.
    """

    SPEC_BYTES = 1 << 16  # the pass spec as JSON: room for hundreds of legs

    def __init__(self, table: SplitTable, data_cfg, mean, std, *, rank, world_size, epoch, seed, skip_batches,
                 legs=()):  # fmt: skip
        self.table, self.cfg = table, data_cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size = data_cfg.batch_size
        self.maker = _ClipMaker(data_cfg.clip_len, data_cfg.image_size, mean, std, data_cfg.augment)
        self.base = table.base
        self.batch_shape = (self.batch_size, data_cfg.clip_len, 3, data_cfg.image_size, data_cfg.image_size)
        self.ring: PixelRing | None = None  # set by the loader, before its workers start
        self.spec = torch.zeros(self.SPEC_BYTES, dtype=torch.uint8).share_memory_()
        self._spec = self.spec.numpy()
        self.planned: bytes | None = None
        self.set_pass(epoch, skip_batches, legs)

    def __getstate__(self) -> dict:  # a spawned worker gets the shared tensor, and rebuilds the numpy view
        return {k: v for k, v in self.__dict__.items() if k != "_spec"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._spec = self.spec.numpy()

    def set_pass(self, epoch: int, skip_batches: int = 0, legs: tuple[Leg, ...] | list[Leg] = ()) -> None:
        """The next pass reads ``epoch`` from rank batch ``skip_batches`` on, after the finished ``legs``."""
        legs = tuple(legs)
        data = json.dumps([epoch, max(0, skip_batches), [list(astuple(g)) for g in legs]]).encode()
        if len(data) > self.SPEC_BYTES:
            raise DataError(f"{len(legs)} legs in one epoch: more than the loader can carry; finish the epoch on "
                            f"one set-up")  # fmt: skip
        self._spec[:] = 0
        self._spec[: len(data)] = np.frombuffer(data, np.uint8)
        self._plan()

    def _plan(self) -> None:
        """This process's plan of the pass in ``spec``, unless it already has it."""
        raw = self._spec.tobytes().rstrip(b"\0")
        if raw == self.planned:
            return
        epoch, skip, legs = json.loads(raw)
        legs = tuple(Leg(*g) for g in legs)
        self.epoch, self.skip, self.leg = epoch, skip, len(legs)
        self.n_batches, self.pieces, self.batches = plan_train_epoch(
            self.table.counts, epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
            batch_size=self.batch_size, workers=self.cfg.num_workers, legs=legs,
        )  # fmt: skip
        self.planned = raw

    def _raw(self, pieces: list[Piece]) -> Iterator[dict]:
        for p in pieces:
            for i, raw in self.table.read(p):
                raw["__sample__"] = self.base[p.shard] + i
                raw["__where__"] = str(self.table.paths[p.shard])
                yield raw

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, w = (info.id, info.num_workers) if info is not None else (0, 1)
        self._plan()  # a persistent worker learns the new pass here
        self.ring.reset(_row())  # slots of an abandoned pass's unread batches (the DataLoader dropped them)
        if w != len(self.pieces):
            raise RuntimeError(f"planned for {len(self.pieces)} workers, running with {w}")
        lw = (wid + self.skip) % w  # rotate so the DataLoader's round-robin resumes at rank batch `skip`
        seed = shuffle_seed(self.seed, self.epoch, self.rank, lw, self.leg)
        stream = shuffled(self._raw(self.pieces[lw]), self.cfg.shuffle_buffer, seed)
        skip_samples = len(range(lw, self.skip, w)) * self.batch_size
        stream = itertools.islice(stream, skip_samples, None)  # skipped samples are read, never decoded
        while raws := list(itertools.islice(stream, self.batch_size)):
            yield self.batch(raws)

    def batch(self, raws: list[dict]) -> dict:
        t, row = self.maker.clip_len, _row()
        slot, pixels = self.ring.acquire(row)
        labels = label_arrays(len(raws), t)
        ids = np.zeros(len(raws), np.int64)
        for i, raw in enumerate(raws):
            s = parse_sample(raw, raw["__where__"])
            gid = raw["__sample__"]
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch, gid, 0xC1))  # per sample: resume-exact
            a = int(rng.integers(0, len(s) - t + 1)) if len(s) > t else 0
            b = min(a + t, len(s))
            self.maker.fill(labels, pixels, i, s, a, b, rng)
            put_labels(labels, i, s, a, b)
            ids[i] = gid
        return {"slot": (row, slot), **labels, "sample": ids}


class TrainLoader:
    """Training batches for one rank, an epoch a pass. ``len()`` is the epoch's batches per rank (the same on every
    rank); iterating yields the ``len() - skip_batches`` batches after the skipped ones, in the original order.
    ``set_epoch`` chooses the next pass's epoch; the workers and their ring are made on the first pass and kept for
    every later one (forking them and mapping a new ring each epoch costs seconds at scale)."""

    def __init__(self, stream: TrainStream, num_workers: int, device: torch.device | None = None, pin: bool = False):
        self.stream, self.num_workers, self.device, self.pin = stream, num_workers, device, pin
        self.loader: DataLoader | None = None

    def __len__(self) -> int:
        return self.stream.n_batches

    @property
    def remaining(self) -> int:
        return max(0, self.stream.n_batches - self.stream.skip)

    def set_epoch(self, epoch: int, skip_batches: int = 0, legs: tuple[Leg, ...] | list[Leg] = ()) -> None:
        """The next pass: ``epoch`` from rank batch ``skip_batches`` on, after the finished ``legs`` (see
        ``make_train_loader``)."""
        self.stream.set_pass(epoch, skip_batches, legs)

    def __iter__(self) -> Iterator[dict]:
        return prefetch(self._host_batches(), self.device)

    def _host_batches(self) -> Iterator[dict]:
        if self.remaining == 0:
            return
        if self.loader is None:
            _ring(self.stream, self.num_workers)
            s = self.stream
            self.loader = _make_dataloader(s, self.num_workers, derive_seed(s.seed, s.rank, 0xD1), persistent=True)
        for batch in _batches(self.loader):
            yield finish_batch(batch, self.stream.ring, self.pin)

    def close(self) -> None:
        """Stop the workers now (else they go with the loader)."""
        it, self.loader = getattr(self.loader, "_iterator", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def split_table(data_cfg, split: str) -> SplitTable:
    """The shards a loader of ``split`` reads: the packed split, or in a fold run (data.folds) the fold's training
    or held-out videos of the train and val splits (``mtl.data.folds``)."""
    role = fold_role(data_cfg, split)
    if role is None:
        return SplitTable.load(data_cfg.shards, split)
    samples = fold_samples(data_cfg, role)
    if not samples:
        raise DataError(f"{data_cfg.folds.file}: fold {data_cfg.folds.fold} leaves no sample to {role} on")
    return SplitTable.select(data_cfg.shards, samples)


def make_train_loader(
    data_cfg,
    *,
    mean,
    std,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    skip_batches: int = 0,
    legs: tuple[Leg, ...] | list[Leg] = (),
    device: str | torch.device | None = None,
) -> TrainLoader:
    """Training batches [B, T, ...] of rank ``rank`` for epoch ``epoch``.

    One epoch over all ranks sees each training sample (segment) once, as one random window of ``clip_len`` frames
    with one random augmentation, except fewer than world_size * batch_size dropped samples (others each epoch).
    ``skip_batches`` resumes mid-epoch: the skipped samples are read but not decoded. Exact resume needs the same
    world_size, batch_size and num_workers; ``legs`` are the parts of the epoch read under another set-up (see
    ``mtl.data.legs``), whose samples are left out; ``set_epoch`` moves the loader (and its workers) on to another
    epoch.
    ``device``: where batches are delivered (a CUDA device: copied one batch ahead); default: the host, pinned when
    CUDA is there. Frames stay uint8 (see the module notes).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    table = split_table(data_cfg, data_cfg.train_split)
    n = train_batches_per_epoch(table.samples, world_size, data_cfg.batch_size)
    if n == 0:
        raise DataError(
            f"{data_cfg.shards}: split {data_cfg.train_split!r} has {table.samples} samples, fewer than "
            f"world_size x data.batch_size = {world_size * data_cfg.batch_size}; use a smaller batch or "
            f"pack with a smaller --segment-len"
        )
    stream = TrainStream(
        table, data_cfg, mean, std, rank=rank, world_size=world_size, epoch=epoch, seed=seed,
        skip_batches=max(0, skip_batches), legs=tuple(legs),
    )  # fmt: skip
    return TrainLoader(stream, data_cfg.num_workers, *_placement(device))


# ------------------------------------------------------------------------------------------------ evaluation


class EvalStream(IterableDataset):
    """Whole evaluation batches of one rank; worker w builds the rank's batches w, w + W, ..."""

    def __init__(self, table: SplitTable, batches, data_cfg, mean, std):
        self.table, self.batches = table, batches
        self.batch_size = data_cfg.eval_batch_size
        self.maker = _ClipMaker(data_cfg.clip_len, data_cfg.image_size, mean, std)
        self.batch_shape = (self.batch_size, data_cfg.clip_len, 3, data_cfg.image_size, data_cfg.image_size)
        self.ring: PixelRing | None = None  # set by the loader for each pass

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, w = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader()
        try:
            for j in range(wid, len(self.batches), w):
                yield self.batch(self.batches[j], reader)
        finally:
            reader.close()

    def batch(self, clips: list[tuple[int, int, int]], reader: ShardReader | None) -> dict:
        t, row = self.maker.clip_len, _row()
        slot, pixels = self.ring.acquire(row)
        labels = label_arrays(self.batch_size, t)
        videos, last = [], None
        for k in range(self.batch_size):
            if k < len(clips):
                shard, index, a = clips[k]
                if last is None or last[0] != (shard, index):
                    path = self.table.paths[shard]
                    raw = reader.get(path, self.table.file_index(shard, index), self.table.sizes[shard])
                    last = ((shard, index), parse_sample(raw, str(path)))
                s = last[1]
                b = min(a + t, len(s))
                videos.append(s.video)
                put_labels(labels, k, s, a, b)
            else:  # padding clip
                s, a, b = None, 0, 0
                videos.append("")
            self.maker.fill(labels, pixels, k, s, a, b, None)
        return {"slot": (row, slot), **labels, "video": videos}


class EvalLoader:
    """Evaluation batches of one rank, then all-padding batches up to ``len()``, which every rank shares."""

    def __init__(self, stream: EvalStream, n_batches: int, num_workers: int, device: torch.device | None = None,
                 pin: bool = False):  # fmt: skip
        self.stream, self.n_batches, self.num_workers, self.device = stream, n_batches, num_workers, device
        self.pin = pin

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict]:
        return prefetch(self._host_batches(), self.device)

    def _host_batches(self) -> Iterator[dict]:
        done = 0
        workers = min(self.num_workers, len(self.stream.batches))
        ring = _ring(self.stream, workers)
        if self.stream.batches:
            for batch in _batches(_make_dataloader(self.stream, workers, 0xE7)):
                done += 1
                yield finish_batch(batch, ring, self.pin)
        for _ in range(self.n_batches - done):  # in this process: row 0, whose slots are all released by now
            yield finish_batch(self.stream.batch([], None), ring, self.pin)


def make_eval_loader(
    data_cfg, split: str, *, mean, std, rank: int, world_size: int, device: str | torch.device | None = None
) -> EvalLoader:
    """Every frame of every video of ``split`` exactly once across ranks, in clips of ``clip_len`` consecutive frames
    (a segment's last clip padded), ``eval_batch_size`` clips a batch, no augmentation; ids in ``video``/``frame``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    table = split_table(data_cfg, split)
    n_batches, batches = plan_eval(table.sample_frames, data_cfg.clip_len, data_cfg.eval_batch_size, rank, world_size)
    return EvalLoader(
        EvalStream(table, batches, data_cfg, mean, std), n_batches, data_cfg.num_workers, *_placement(device)
    )
