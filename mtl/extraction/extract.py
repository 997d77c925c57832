"""`mtl features`: every frame of a pixel pack through a frame encoder, once, into feature shards (stage one of the
two-stage recipe; the trunk then trains on the cache).

The pixels are read and normalised exactly as the evaluation loader does (``shardio`` readers, ``decode_clip``,
``ClipTransform``); the encoder is ``FrameEncoder`` over any timm model (``--backbone``) or a trained run's
fine-tuned one (``--checkpoint``). A source video's segments (spread over shards, shuffled in the train split) are
joined in frame order, so a feature sample holds a whole video (or an equal part of a very long one).

Work is cut into output shards by a plan that depends only on the source and the settings (recorded in
``.features-plan.json``): shards of about ``shard_frames`` frames, a long video's samples spread over several, dealt
to the processes (torchrun ranks, SLURM array tasks) by frames (``share``), so one long video holds no process up.
A shard is written atomically (``write_shard``) and then recorded (bytes, sha256) in its process's partial manifest
(``.features-done.<i>-of-<k>.json``), so an interrupted run resumes by skipping the shards it finds as recorded;
one changed since, or never recorded, is extracted again. Frames are encoded in batches fixed by the shard's
content, so the same input gives byte-identical shards whatever the number of processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sys
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mtl.data.manifest import MANIFEST, PackManifest, file_sha256, read_manifest
from mtl.data.shardio import Sample, ShardReader, parse_sample
from mtl.data.transforms import ClipTransform, decode_clip
from mtl.device import autocast, pick_device
from mtl.errors import ConfigError, DataError, MtlError
from mtl.features.manifest import (
    DTYPES,
    Extractor,
    FeatureManifest,
    FeatureParams,
    FeatureShardRecord,
    FeatureSource,
    FeatureSplitRecord,
    read_feature_manifest,
    write_feature_manifest,
)
from mtl.features.shards import FORMAT, FeatureSample, write_feature_shard

PLAN_FILE = ".features-plan.json"
DONE_PREFIX = ".features-done"  # + .<part>-of-<parts>.json: the shards a process finished (a partial manifest)


@dataclass(frozen=True)
class ExtractSpec:
    """What to extract with. Either ``backbone`` (+ ``weights``, ``pool``, ``image_size``, ``backbone_kwargs``) or
    ``checkpoint`` (a trained run: its backbone, pool, image size and normalisation)."""

    backbone: str | None = None
    weights: str | None = None
    checkpoint: str | None = None
    pool: str = "avg"
    image_size: int = 112
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    hflip_tta: bool = False
    dtype: str = "float16"
    max_frames: int = 4096  # frames per feature sample at most (a longer video: equal consecutive parts)
    shard_frames: int = (
        32768  # a shard closes once it holds this many frames (a long video's samples go on in the next)
    )
    batch_size: int = 256  # frames per encoder call
    workers: int | None = None  # JPEG decoding workers (DataLoader); None: this process's CPUs but one, at most 8
    device: str | None = None  # auto (None) | cuda | cpu | cuda:N, decided by mtl.device (cuda: this rank's GPU)


# ------------------------------------------------------------------------------------------------ encoder


@dataclass
class Encoder:
    module: Any  # FrameEncoder, in eval mode, on its device
    device: torch.device
    info: dict[str, Any]  # the manifest's "extractor" section


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Tensors by name, dtype, shape and bytes: the weights' identity where no one file holds them."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_spec(spec: ExtractSpec) -> None:
    """The settings alone (no file opened but the weights' existence): ConfigError naming the option."""
    if (spec.backbone is None) == (spec.checkpoint is None):
        raise ConfigError("give exactly one of --backbone NAME and --checkpoint RUN")
    if spec.checkpoint is not None and (spec.weights or spec.backbone_kwargs):
        raise ConfigError("--checkpoint RUN brings its own backbone and weights: drop --weights/--backbone-kwargs")
    if spec.pool not in ("avg", "cls", "flatten"):
        raise ConfigError(f"--pool: expected avg, cls or flatten, got {spec.pool!r}")
    if spec.dtype not in DTYPES:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPES)}, got {spec.dtype!r}")
    if spec.workers is not None and (not isinstance(spec.workers, int) or spec.workers < 0):
        raise ConfigError(f"--workers: expected a number of processes >= 0, got {spec.workers!r}")
    for name in ("image_size", "max_frames", "shard_frames", "batch_size"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(spec, name)!r}")
    if spec.weights is not None and not Path(spec.weights).is_file():
        raise MtlError(f"{spec.weights}: weights file not found (--weights)")
    if spec.checkpoint is not None and not Path(spec.checkpoint).exists():
        raise MtlError(f"{spec.checkpoint}: no such run directory, checkpoint or .safetensors file (--checkpoint)")


def load_encoder(spec: ExtractSpec, device: torch.device | None = None) -> Encoder:
    """The frame encoder the spec names, with the normalisation its frames need and what the manifest records.
    ``device``: already decided by the caller (else decided here from ``spec.device``)."""
    from mtl.config import from_dict
    from mtl.model.backbone import FrameEncoder, create_backbone
    from mtl.runs.model_io import input_norm

    check_spec(spec)
    device = device or pick_device(spec.device)  # first: a GPU asked for and unusable stops here, before loading
    if spec.checkpoint is not None:
        from mtl.runs.layout import resolve_trained
        from mtl.runs.trained import load_model

        path = Path(spec.checkpoint)
        trained = load_model(path)
        module, cfg = trained.model.encoder, trained.cfg
        mean, std = trained.norm
        source = resolve_trained(path)
        digest = file_sha256(source) if isinstance(source, Path) else state_dict_sha256(module.state_dict())
        info = {"backbone": cfg.model.backbone, "weights_sha256": digest, "checkpoint": str(path.resolve()),
                "pool": module.pool, "image_size": cfg.data.image_size,
                "backbone_kwargs": dict(cfg.model.backbone_kwargs)}  # fmt: skip
    else:
        cfg = from_dict({"model": {"backbone": spec.backbone, "backbone_kwargs": spec.backbone_kwargs,
                                   "pretrained_file": spec.weights, "pool": spec.pool},
                         "data": {"image_size": spec.image_size}})  # fmt: skip
        torch.manual_seed(0)  # without --weights: the same random weights in every process (a test's cache)
        module = FrameEncoder(create_backbone(cfg.model, spec.image_size), spec.pool)
        mean, std = input_norm(cfg.data, module)
        digest = file_sha256(spec.weights) if spec.weights else state_dict_sha256(module.state_dict())
        info = {"backbone": spec.backbone, "weights_sha256": digest, "checkpoint": None, "pool": spec.pool,
                "image_size": spec.image_size, "backbone_kwargs": dict(spec.backbone_kwargs)}  # fmt: skip
    info.update(mean=[float(x) for x in mean], std=[float(x) for x in std], hflip_tta=bool(spec.hflip_tta))
    module = module.to(device).eval()
    return Encoder(module, device, info)


class _Batcher:
    """Frames of a shard, queued as uint8 at the target size, encoded ``batch_size`` at a time in queue order;
    each result row lands in its sample's feature array."""

    def __init__(self, encoder: Encoder, size: int, batch_size: int, hflip: bool, dtype: str, bar: tqdm) -> None:
        info = encoder.info
        self.enc, self.bs, self.hflip, self.dtype, self.bar = encoder, batch_size, hflip, np.dtype(dtype), bar
        self.tf = ClipTransform(size, tuple(info["mean"]), tuple(info["std"]))
        self.queue: list[tuple[torch.Tensor, np.ndarray, np.ndarray]] = []  # (pixels, destination, its rows)
        self.queued = 0

    def add(self, pixels: torch.Tensor, dst: np.ndarray, rows: np.ndarray) -> None:
        """``pixels``: uint8 frames already at the target size (``ClipTransform.geometry``, in the decoders)."""
        self.queue.append((pixels, dst, rows))
        self.queued += len(rows)
        while self.queued >= self.bs:
            self._run(self.bs)

    def flush(self) -> None:
        if self.queued:
            self._run(self.queued)

    @torch.inference_mode()
    def _run(self, n: int) -> None:
        parts, dests, taken = [], [], 0
        while taken < n:
            pixels, dst, rows = self.queue[0]
            k = min(len(rows), n - taken)
            parts.append(pixels[:k])
            dests.append((dst, rows[:k]))
            if k == len(rows):
                self.queue.pop(0)
            else:
                self.queue[0] = (pixels[k:], dst, rows[k:])
            taken += k
        self.queued -= n
        pixels = torch.cat(parts).to(self.enc.device)
        gain, bias = self.tf.affine(pixels, None)
        x = ClipTransform.finish(pixels, gain.to(pixels.device), bias.to(pixels.device))
        with autocast(self.enc.device):  # bf16 on a GPU
            feats = self.enc.module(x).float()
            if self.hflip:
                feats = (feats + self.enc.module(x.flip(-1)).float()) / 2
        out = feats.cpu().numpy().astype(self.dtype)
        pos = 0
        for dst, rows in dests:
            dst[rows] = out[pos : pos + len(rows)]
            pos += len(rows)
        self.bar.update(n)


# ------------------------------------------------------------------------------------------------ source


@dataclass(frozen=True)
class Segment:
    """One source sample: where it is, and which frames of its video it holds."""

    shard: str  # path relative to the source root
    index: int
    first: int  # its first frame number (1-based)
    frames: int
    images: int


def _scan_shard(root: Path, rel: str) -> list[tuple[str, Segment]]:
    """(video, segment) of every sample of a source shard, reading only the .json members (seeking over the JPEGs)."""
    path = root / rel
    out = []
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                name = info.name.split("/")[-1]
                if not (info.isreg() and name.endswith(".json")):
                    continue
                key = name.split(".", 1)[0]
                meta = json.loads(tf.extractfile(info).read())
                frames = meta["frames"]
                seg = Segment(rel, int(key), int(frames[0]), len(frames), int(sum(meta["has_image"])))
                out.append((str(meta["video"]), seg))
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{path}: unreadable source shard ({exc}); run `mtl shards verify {root}`") from None
    return out


def scan_source(root: Path, manifest: PackManifest) -> dict[str, dict[str, list[Segment]]]:
    """split -> video (name order) -> its segments in frame order; DataError if a video's frames do not join up."""
    out: dict[str, dict[str, list[Segment]]] = {}
    for split, entry in manifest.splits.items():
        videos: dict[str, list[Segment]] = defaultdict(list)
        for sh in entry.shards:
            for video, seg in _scan_shard(root, sh.path):
                videos[video].append(seg)
        for video, segs in videos.items():
            segs.sort(key=lambda s: s.first)
            expect = 1
            for s in segs:
                if s.first != expect:
                    raise DataError(f"{root / s.shard}: sample {s.index:06d} of video {video} starts at frame "
                                    f"{s.first}, expected {expect} (segments missing or repeated)")  # fmt: skip
                expect += s.frames
            want = entry.video_frames.get(video)
            if want is not None and want != expect - 1:
                raise DataError(f"{root / MANIFEST}: splits.{split}.video_frames.{video} is {want}, its samples "
                                f"hold {expect - 1} frames")  # fmt: skip
        out[split] = {v: videos[v] for v in sorted(videos)}
    return out


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Piece:
    """Frames ``[start, stop)`` (0-based) of one video: one output sample."""

    video: str
    start: int
    stop: int

    @property
    def frames(self) -> int:
        return self.stop - self.start


@dataclass
class OutShard:
    split: str
    path: str  # relative to the output root
    pieces: list[Piece]  # its samples, in order

    @property
    def sample_frames(self) -> list[int]:
        return [p.frames for p in self.pieces]

    @property
    def frames(self) -> int:
        return sum(self.sample_frames)


def parts(n: int, max_frames: int) -> list[tuple[int, int]]:
    """[a, b) 0-based frame ranges: one, or ceil(n / max_frames) equal consecutive parts (none longer than max)."""
    k = max(1, math.ceil(n / max_frames))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def plan_shards(source: dict[str, dict[str, list[Segment]]], max_frames: int, shard_frames: int) -> list[OutShard]:
    """Videos in name order, split by split, each cut into samples of at most ``max_frames`` frames (``parts``),
    the samples dealt in order into shards that close at ``shard_frames`` frames. A long video's samples go on in
    the next shards, so no shard (a process's unit of work) holds more than ``shard_frames + max_frames`` frames,
    however long one video is; the loader joins a video's consecutive samples again."""
    plan: list[OutShard] = []
    for split, videos in source.items():
        cur: list[Piece] = []
        for video, segs in videos.items():
            for a, b in parts(sum(s.frames for s in segs), max_frames):
                cur.append(Piece(video, a, b))
                if sum(p.frames for p in cur) >= shard_frames:
                    plan.append(OutShard(split, f"{split}/{sum(s.split == split for s in plan):06d}.tar", cur))
                    cur = []
        if cur:
            plan.append(OutShard(split, f"{split}/{sum(s.split == split for s in plan):06d}.tar", cur))
    return plan


def share(plan: list[OutShard], part: Part) -> list[OutShard]:
    """This process's shards, dealt by frames: the biggest first, each to the part with the fewest frames so far
    (ties to the lowest part), so the parts' work differs by at most about one shard whatever the videos' lengths;
    in plan order. The same on every process, from the plan alone."""
    load, owner = [0] * part.count, {}
    for i in sorted(range(len(plan)), key=lambda i: (-plan[i].frames, i)):
        k = min(range(part.count), key=lambda k: (load[k], k))
        owner[i], load[k] = k, load[k] + plan[i].frames
    return [s for i, s in enumerate(plan) if owner[i] == part.index]


def covering(segs: list[Segment], a: int, b: int) -> list[tuple[int, Segment]]:
    """The segments of a video that hold its frames ``[a, b)``, each with the 0-based index of its first frame."""
    out, start = [], 0
    for s in segs:
        if start < b and start + s.frames > a:
            out.append((start, s))
        start += s.frames
    return out


def _fingerprint(source_sha: str, info: dict, spec: ExtractSpec, plan: list[OutShard], device: torch.device) -> str:
    what = {"source": source_sha, "extractor": info, "dtype": spec.dtype, "max_frames": spec.max_frames,
            "batch_size": spec.batch_size, "plan": [asdict(s) for s in plan], "format": FORMAT}  # fmt: skip
    if device.type == "cuda":  # bf16 autocast: other features than fp32 on the CPU, never mixed in one cache
        what["autocast"] = "bf16"
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def clear_output(out: Path) -> None:
    """What --overwrite removes: the manifest, the plan and the feature shards (nothing else in ``out``)."""
    for name in (MANIFEST, PLAN_FILE):
        (out / name).unlink(missing_ok=True)
    for done in out.glob(f"{DONE_PREFIX}.*.json"):
        done.unlink()
    if out.is_dir():
        for d in out.iterdir():
            if d.is_dir():
                for f in list(d.glob("*.tar")) + list(d.glob("*.tar.tmp")):
                    f.unlink()


def prepare_output(out: Path, fingerprint: str, plan: list[OutShard], overwrite: bool) -> None:
    """Record the plan; refuse to mix two different extractions in one folder (unless ``overwrite``)."""
    plan_path = out / PLAN_FILE
    old = None
    if plan_path.is_file():
        try:
            old = json.loads(plan_path.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            old = "unreadable"
    elif (out / MANIFEST).exists() or any(out.glob("*/*.tar")):
        old = "unknown"
    if old is not None and old != fingerprint:
        if not overwrite:
            raise DataError(f"{out}: holds features of other input or settings; pass --overwrite to replace them, "
                            f"or choose another --out")  # fmt: skip
        clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in {s.split for s in plan}:
        (out / split).mkdir(exist_ok=True)
    _write_json(plan_path, {"format": FORMAT, "fingerprint": fingerprint,
                            "shards": [{"path": s.path, "pieces": [[p.video, p.start, p.stop] for p in s.pieces]}
                                       for s in plan]})  # fmt: skip


def _done_path(out: Path, part: Part) -> Path:
    return out / f"{DONE_PREFIX}.{part.index}-of-{part.count}.json"


def finished_records(out: Path, fingerprint: str) -> dict[str, dict]:
    """bytes/sha256 of the shards finished under this plan: as each process recorded them once written, and as
    the manifest of a finished extraction lists them (which replaces the partial manifests)."""
    records: dict[str, dict] = {}
    try:
        for split in json.loads((out / MANIFEST).read_text())["splits"].values():
            records.update({s["path"]: {"bytes": s["bytes"], "sha256": s["sha256"]} for s in split["shards"]})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        records = {}  # none (an unfinished extraction), or unreadable: the partial manifests still tell
    for path in sorted(out.glob(f"{DONE_PREFIX}.*.json")):
        try:
            done = json.loads(path.read_text())
            if done.get("fingerprint") == fingerprint:
                records.update({k: {"bytes": v["bytes"], "sha256": v["sha256"]} for k, v in done["shards"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged partial manifest: its shards are extracted again
    return records


def shard_damage(path: Path, record: dict | None) -> str | None:
    """Why a finished shard is not trusted (None: it is as it was written): never recorded as finished (an older
    or a killed run), or its size or sha256 changed since."""
    if record is None:
        return "not recorded as finished"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"has {size} bytes, {record['bytes']} were written"
    if file_sha256(path) != record["sha256"]:
        return "does not match the sha256 recorded when it was written"
    return None


# ------------------------------------------------------------------------------------------------ one shard


def _join(samples: list, video: str) -> dict[str, np.ndarray]:
    """The per-frame arrays of consecutive source samples of a video, concatenated in frame order."""
    out = {k: np.concatenate([getattr(s, k) for s in samples]) for k in ("frames", "has_image")}
    for key in samples[0].labels:
        out[key] = np.concatenate([s.labels[key] for s in samples])
    first, n = int(out["frames"][0]), len(out["frames"])
    if not np.array_equal(out["frames"], np.arange(first, first + n)):
        raise DataError(f"video {video}: its samples' frame numbers do not run {first}..{first + n - 1}")
    return out


@dataclass
class Decoded:
    """One source segment, read, checked and decoded (in a DataLoader worker): its sample without the JPEG bytes,
    the frames with an image (``idx``) as uint8 at the target size, or the one-line error that stopped it."""

    sample: Sample | None
    idx: np.ndarray
    pixels: torch.Tensor
    error: str | None = None


class SegmentFrames(torch.utils.data.Dataset):
    """The segments of this process's output shards in plan order, each read and decoded (JPEG, resize) where
    ``__getitem__`` runs: in the DataLoader's workers, so the main process only feeds the encoder. The frames and
    their order are the same as decoded in one process, so the batches and the features are too."""

    def __init__(self, root: Path, items: list[tuple[str, Segment]], tf: ClipTransform, chunk: int) -> None:
        self.root, self.items, self.tf, self.chunk = root, items, tf, chunk
        self.reader: ShardReader | None = None  # one per process (made in the worker after the fork)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Decoded:
        video, seg = self.items[i]
        where = str(self.root / seg.shard)
        try:
            self.reader = self.reader or ShardReader()
            s = parse_sample(self.reader.get(self.root / seg.shard, seg.index), where)
            if s.video != video or int(s.frames[0]) != seg.first:
                raise DataError(f"{where}: sample {seg.index:06d} changed while extracting (video {s.video})")
            idx = np.flatnonzero(s.has_image)
            parts = []
            for c in range(0, len(idx), self.chunk):  # (decode buffers of at most a batch)
                try:
                    parts.append(self.tf.geometry(decode_clip(s.blob, s.offsets, idx[c : c + self.chunk]), None))
                except ValueError as exc:
                    raise DataError(f"{where}: sample {seg.index:06d} (video {video}): {exc}; "
                                    f"run `mtl shards verify`") from None  # fmt: skip
        except MtlError as exc:  # travels as a value: the DataLoader would wrap it in the worker's traceback
            return Decoded(None, np.zeros(0, np.int64), torch.zeros(0), str(exc))
        pixels = torch.cat(parts) if parts else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        return Decoded(replace(s, blob=b""), idx, pixels)


def _as_is(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # each worker decodes on one core; the workers are the parallelism


def default_workers() -> int:
    """Decoding workers for one process: the CPUs it may use (shared by torchrun's ranks) but one, at most 8."""
    from mtl.engine.cpus import rank_cpus

    return max(0, min(8, rank_cpus() - 1))


def decoded_segments(root: Path, items: list[tuple[str, Segment]], tf: ClipTransform, chunk: int,
                     workers: int) -> Iterator[Decoded]:  # fmt: skip
    """``SegmentFrames`` in order, decoded by ``workers`` DataLoader workers (0: in this process)."""
    data = SegmentFrames(root, items, tf, chunk)
    if workers == 0:
        try:
            yield from (data[i] for i in range(len(data)))
        finally:
            if data.reader is not None:
                data.reader.close()
        return
    loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=_as_is, num_workers=workers,
                                         prefetch_factor=2, worker_init_fn=_worker_init)  # fmt: skip
    yield from loader


def extract_shard(job: OutShard, root: Path, segments: dict[str, list[Segment]], decoded: Iterator[Decoded],
                  batcher: _Batcher, dim: int) -> list[FeatureSample]:  # fmt: skip
    """The feature samples of one output shard (its pieces in order); ``decoded``: the segments ``covering`` this
    and the later shards' pieces, in order (this one takes its own). Only a piece's frames are encoded."""
    pending = []
    for p in job.pieces:
        srcs, feats = [], np.zeros((p.frames, dim), batcher.dtype)
        for start, _ in covering(segments[p.video], p.start, p.stop):
            d = next(decoded)
            if d.error is not None:
                raise DataError(d.error)
            rows = d.idx + (start - p.start)
            keep = (rows >= 0) & (rows < p.frames)
            pixels = d.pixels
            if not keep.all():  # a segment across the piece's edge: the frames outside it are another piece's
                pixels, rows = pixels[torch.from_numpy(keep)], rows[keep]
            if len(rows):
                batcher.add(pixels, feats, rows)
            srcs.append(d.sample)
        pending.append((p, _join(srcs, p.video) if srcs else None, feats))
    batcher.flush()  # every row of this shard's arrays is written before they are packed
    samples = []
    for p, arrays, feats in pending:
        a = p.start - (int(arrays["frames"][0]) - 1) if arrays is not None else -1  # the piece inside the join
        b = a + p.frames
        if arrays is None or a < 0 or b > len(arrays["frames"]):
            raise DataError(f"{root}: the source no longer matches the plan of {job.path} (rerun with --overwrite)")
        labels = {k: v[a:b] for k, v in arrays.items() if k not in ("frames", "has_image")}
        samples.append(FeatureSample(p.video, arrays["frames"][a:b], arrays["has_image"][a:b], feats, labels))
    return samples


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Part:
    """This process's share ``index`` of ``count`` (``share``: the plan dealt by frames); ``group`` when the parts
    are torchrun ranks (a process group: rank 0 writes the manifest after all); else the last part to finish
    writes it."""

    index: int = 0
    count: int = 1
    group: bool = False


def _part_from_env() -> Part:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Part()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))  # a rank may wait for the others for hours
    return Part(dist.get_rank(), dist.get_world_size(), True)


def _barrier(part: Part) -> None:
    if part.group:
        import torch.distributed as dist

        dist.barrier()


def _shard_records(out: Path, plan: list[OutShard]) -> dict[str, dict] | None:
    """bytes/sha256 of every planned shard, or None while any is missing."""
    if not all((out / s.path).is_file() for s in plan):
        return None
    return {s.path: {"bytes": (out / s.path).stat().st_size, "sha256": file_sha256(out / s.path)} for s in plan}


def build_manifest(shards: Path, source_sha: str, info: dict, spec: ExtractSpec, dim: int,
                   source: dict[str, dict[str, list[Segment]]], plan: list[OutShard],
                   records: dict[str, dict]) -> FeatureManifest:  # fmt: skip
    splits = {}
    for split, videos in source.items():
        segs = [s for v in videos.values() for s in v]
        shards_of = [
            FeatureShardRecord(path=s.path, **records[s.path], samples=len(s.sample_frames),
                               frames=sum(s.sample_frames), sample_frames=s.sample_frames)
            for s in plan
            if s.split == split
        ]  # fmt: skip
        splits[split] = FeatureSplitRecord(videos=len(videos), frames=sum(s.frames for s in segs),
                                           frames_with_image=sum(s.images for s in segs), shards=shards_of)  # fmt: skip
    return FeatureManifest(
        source=FeatureSource(shards=str(shards.resolve()), manifest_sha256=source_sha),
        extractor=Extractor(**info),
        dim=dim,
        dtype=spec.dtype,
        params=FeatureParams(max_frames=spec.max_frames, shard_frames=spec.shard_frames, batch_size=spec.batch_size),
        splits=splits,
    )


def _images(job: OutShard, segments: dict[str, list[Segment]]) -> int:
    """About the frames with an image in a shard (for the progress bar): a segment across a piece's edge counts in
    proportion to its frames inside."""
    n = 0.0
    for p in job.pieces:
        for start, seg in covering(segments[p.video], p.start, p.stop):
            inside = min(p.stop, start + seg.frames) - max(p.start, start)
            n += seg.images * inside / seg.frames
    return round(n)


def extract(
    shards: Path,
    out: Path,
    spec: ExtractSpec,
    *,
    part: Part | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FeatureManifest | None:
    """Extract the features of every split of the pack ``shards`` into ``out``; returns the manifest written to
    ``out/manifest.json``.

    ``part``: this process's share (default: from torchrun's RANK/WORLD_SIZE, else everything). Under torchrun
    every rank returns the manifest; a SLURM array task (``Part(i, k)``) returns it only if it was the last to
    finish (it wrote it), else None. Rerun with the same arguments after an interruption: finished shards are
    kept untouched.
    """
    shards, out = Path(shards), Path(out)
    check_spec(spec)
    device = pick_device(spec.device)  # a GPU asked for and unusable stops here, before any file is read
    manifest = read_manifest(shards)
    source_sha = file_sha256(shards / MANIFEST)
    part = part or _part_from_env()
    encoder = load_encoder(spec, device)
    source = scan_source(shards, manifest)
    plan = plan_shards(source, spec.max_frames, spec.shard_frames)
    dim = int(encoder.module.num_features)
    fingerprint = _fingerprint(source_sha, encoder.info, spec, plan, encoder.device)
    if part.group and part.index != 0:
        _barrier(part)  # rank 0 prepares (and with --overwrite clears) the folder first
        prepare_output(out, fingerprint, plan, overwrite=False)
    else:
        prepare_output(out, fingerprint, plan, overwrite)
        _barrier(part)

    mine = share(plan, part)
    records, done = finished_records(out, fingerprint), {}
    for s in mine:
        if (out / s.path).is_file():
            problem = shard_damage(out / s.path, records.get(s.path))
            if problem is None:
                done[s.path] = records[s.path]
            else:
                print(f"mtl features: warning: {out / s.path}: {problem}; extracting it again", file=sys.stderr)
    todo = [s for s in mine if s.path not in done]
    done_path = _done_path(out, part)
    images = {s.path: _images(s, source[s.split]) for s in mine}  # frames to encode
    total, left = sum(images.values()), sum(images[s.path] for s in todo)
    desc = "features" if part.count == 1 else f"features {part.index}/{part.count}"
    bar = tqdm(total=total, initial=total - left, desc=desc, unit="frame", disable=not progress,
               position=part.index if part.group else None)  # fmt: skip
    batcher = _Batcher(encoder, encoder.info["image_size"], spec.batch_size, spec.hflip_tta, spec.dtype, bar)
    items = [(p.video, seg) for job in todo for p in job.pieces
             for _, seg in covering(source[job.split][p.video], p.start, p.stop)]  # fmt: skip
    workers = default_workers() if spec.workers is None else spec.workers
    decoded = decoded_segments(shards, items, batcher.tf, spec.batch_size, workers)
    try:
        for job in todo:
            samples = extract_shard(job, shards, source[job.split], decoded, batcher, dim)
            path = out / job.path
            try:
                write_feature_shard(path, samples)
                done[job.path] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
                _write_json(done_path, {"format": FORMAT, "fingerprint": fingerprint, "shards": done})
            except OSError as exc:
                why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
                raise DataError(f"{path}: cannot write ({why}); the {len(mine) - len(todo) + todo.index(job)} "
                                f"shards finished before it are kept, rerun to resume") from None  # fmt: skip
    finally:
        bar.close()
        decoded.close()  # the workers end with their loader

    _barrier(part)
    result = None
    if not part.group or part.index == 0:
        records = _shard_records(out, plan)
        if records is not None:  # always so for one process and rank 0; for array tasks, only the last one
            result = build_manifest(shards, source_sha, encoder.info, spec, dim, source, plan, records)
            try:
                write_feature_manifest(out, result)
            except OSError as exc:
                raise DataError(f"{out / MANIFEST}: cannot write ({exc.strerror or exc})") from None
            for partial in out.glob(f"{DONE_PREFIX}.*.json"):  # the manifest holds every shard's record now
                partial.unlink(missing_ok=True)
    _barrier(part)
    if part.group and part.index != 0:
        result = read_feature_manifest(out)
    if result is None and progress:
        print(f"part {part.index} of {part.count} done; the last part to finish writes {out / MANIFEST}",
              file=sys.stderr)  # fmt: skip
    return result
