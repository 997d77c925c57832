"""`mtl shards verify DIR`: read every shard back and check it against the manifest.

Per shard: the file exists, its size and sha256 match, it reads as a tar to the end (a truncated copy does not),
every sample is well formed with the frame count the manifest says, and every JPEG decodes. Reading uses
webdataset's streaming tar iterator, the way a remote reader would see the file.
"""

from __future__ import annotations

import concurrent.futures as cf
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mtl.data.manifest import file_sha256, read_manifest
from mtl.data.shardio import parse_sample
from mtl.errors import DataError

MAX_REASONS = 5


@dataclass
class ShardReport:
    path: str
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    frames: int = 0
    jpegs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(root: str, entry: dict) -> ShardReport:
    """All checks of one shard; problems are collected (up to a few), not raised."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from mtl.data.transforms import decode_jpeg  # the loader's own decoder

    rep = ShardReport(entry["path"])
    path = Path(root) / entry["path"]
    if not path.is_file():
        rep.problems.append("file missing")
        return rep
    digest = file_sha256(path)
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        rep.problems.append(f"size {size} bytes, manifest says {entry['bytes']}")
    if digest != entry["sha256"]:
        rep.problems.append(f"sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...")
    expected = entry["sample_frames"]

    def files():
        with open(path, "rb") as f:
            for item in tar_file_iterator(f):
                item["__url__"] = str(path)
                yield item

    try:
        for raw in group_by_keys(files()):
            i = rep.samples
            rep.samples += 1
            sample = parse_sample(raw, entry["path"])
            if raw["__key__"] != f"{i:06d}":
                rep.problems.append(f"sample {i} has key {raw['__key__']}")
            if i < len(expected) and len(sample) != expected[i]:
                rep.problems.append(f"sample {raw['__key__']} has {len(sample)} frames, manifest says {expected[i]}")
            rep.frames += len(sample)
            buf = memoryview(sample.blob)
            for j in range(len(sample)):
                a, b = int(sample.offsets[j]), int(sample.offsets[j + 1])
                if a == b:
                    continue
                rep.jpegs += 1
                try:
                    img = decode_jpeg(buf[a:b])
                    if img.size == 0:
                        raise ValueError("empty image")
                except ValueError as exc:
                    if len(rep.problems) < MAX_REASONS:
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        rep.problems.append(f"sample {raw['__key__']} frame {sample.frames[j]}: JPEG does not decode "
                                            f"({first})")  # fmt: skip
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        rep.problems.append(f"unreadable after {rep.samples} samples: {exc}")
    except DataError as exc:
        rep.problems.append(str(exc))
    if rep.samples != entry["samples"]:
        rep.problems.append(f"{rep.samples} samples, manifest says {entry['samples']}")
    if rep.frames != entry["frames"] and not rep.problems:
        rep.problems.append(f"{rep.frames} frames, manifest says {entry['frames']}")
    return rep


def verify(root: str | Path, workers: int = 1, progress: bool = True) -> list[ShardReport]:
    """One report per shard listed in the manifest, in manifest order."""
    root = Path(root)
    manifest = read_manifest(root)
    entries = [sh for split in manifest["splits"].values() for sh in split["shards"]]
    bar = tqdm(total=len(entries), desc="verify", unit="shard", disable=not progress)
    reports: dict[str, ShardReport] = {}
    try:
        if workers <= 1:
            for e in entries:
                reports[e["path"]] = check_shard(str(root), e)
                bar.update(1)
        else:
            with cf.ProcessPoolExecutor(max_workers=workers) as pool:
                futs = {pool.submit(check_shard, str(root), e): e["path"] for e in entries}
                for fut in cf.as_completed(futs):
                    reports[futs[fut]] = fut.result()
                    bar.update(1)
    finally:
        bar.close()
    return [reports[e["path"]] for e in entries]


def stray_files(root: str | Path) -> list[str]:
    """Shard-like files the manifest does not list (leftover .tmp, shards of an older pack)."""
    root = Path(root)
    listed = {sh["path"] for s in read_manifest(root)["splits"].values() for sh in s["shards"]}
    out = []
    for split in read_manifest(root)["splits"]:
        for p in sorted((root / split).glob("*")):
            rel = f"{split}/{p.name}"
            if rel not in listed and (p.suffix in (".tar", ".tmp")):
                out.append(rel)
    return out
