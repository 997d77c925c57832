"""Faults on the data path, met as a new user meets them: bad JPEGs, a rerun after a failed pack, kill -9 and
Ctrl-C of `mtl pack`, a shard changed after packing, a manifest whose statistics lie, a full disk, Ctrl-C while
loader workers run. Each ends with a clear error or recovers, and nothing already written is lost."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import VA_DIR, VA_HEADER, make_release, va_rows, write_text
from helpers import REPO, ctrl_c_as_in_a_terminal, mtl
from PIL import Image

import mtl.data.pack as pack_mod
from mtl.config import DataConfig
from mtl.data.loader import make_eval_loader, make_train_loader
from mtl.data.manifest import MANIFEST, read_manifest
from mtl.data.pack import PackOptions, pack
from mtl.data.shardio import parse_sample, read_raw
from mtl.data.verify import stats_problems, verify
from mtl.errors import DataError

MEAN, STD = (0.5,) * 3, (0.5,) * 3


def _shards(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}


def _frames_without_image(root: Path) -> set[tuple[str, int]]:
    out = set()
    for tar in root.glob("*/*.tar"):
        for raw in read_raw(tar):
            s = parse_sample(raw, str(tar))
            out |= {(s.video, int(f)) for f, has in zip(s.frames, s.has_image) if not has}
    return out


# ------------------------------------------------------------------------------------------------ bad JPEGs


def test_undecodable_jpeg_is_named_then_skipped_or_fixed_on_rerun(tmp_path, monkeypatch):
    images, ann = make_release(tmp_path / "release")
    ref = tmp_path / "ref"
    pack(PackOptions(images, ann, ref, segment_len=3, shard_size=2, progress=False))
    good = {p: (images / p).read_bytes() for p in ("vidA/00006.jpg", "vidC/00003.jpg")}
    bad = {
        "vidA/00006.jpg": good["vidA/00006.jpg"][:300],  # header intact, body cut off
        "vidC/00003.jpg": good["vidC/00003.jpg"][:2] + np.random.default_rng(0).bytes(600),  # JPEG magic, noise
    }
    for rel, data in bad.items():
        (images / rel).write_bytes(data)

    out = tmp_path / "out"
    named = r"/(vidA/00006|vidC/00003)\.jpg: JPEG does not decode \(.+\); replace or delete it \(the frame then has no "
    with pytest.raises(DataError, match=named + r"image\), or pass --skip-bad-rows") as err:
        pack(PackOptions(images, ann, out, segment_len=3, shard_size=2, progress=False))
    assert not (out / MANIFEST).exists()

    # the user fixes the file named and reruns: the input changed, and the failed pack's leftovers are not in the
    # way (it used to say the folder "holds a pack of other input"): the other bad file is named
    first, second = sorted(bad, key=lambda rel: rel not in str(err.value))
    (images / first).write_bytes(good[first])
    with pytest.raises(DataError, match=f"/{second}: JPEG does not decode"):
        pack(PackOptions(images, ann, out, segment_len=3, shard_size=2, progress=False))
    (images / first).write_bytes(bad[first])

    # or reruns skipping bad images (other parameters): starts over too; killed after the first shard with a
    # skipped frame, the resumed run still counts that frame
    real, skipped = pack_mod.write_shard_job, []

    def dies_after_a_skip(job):
        if skipped:
            raise KeyboardInterrupt
        res = real(job)
        skipped.extend(res["bad_images"])
        return res

    monkeypatch.setattr(pack_mod, "write_shard_job", dies_after_a_skip)
    with pytest.raises(KeyboardInterrupt):
        pack(PackOptions(images, ann, out, segment_len=3, shard_size=2, skip_bad_rows=True, progress=False))
    monkeypatch.setattr(pack_mod, "write_shard_job", real)
    m = pack(PackOptions(images, ann, out, segment_len=3, shard_size=2, skip_bad_rows=True, progress=False))
    r = json.loads((ref / MANIFEST).read_text())
    tr, va, rtr, rva = m.splits["train"], m.splits["val"], r["splits"]["train"], r["splits"]["val"]
    assert (tr.bad_images_skipped, va.bad_images_skipped) == (1, 1)
    assert "vidA/00006.jpg: JPEG does not decode" in tr.bad_images[0]
    assert "vidC/00003.jpg: JPEG does not decode" in va.bad_images[0]
    assert (tr.images, va.images) == (rtr["images"] - 1, rva["images"] - 1)
    # both frames have valid VA and EXPR labels: now labelled frames without an image
    for split in ("train", "val"):
        new, old = m.splits[split].tasks, r["splits"][split]["tasks"]
        assert new["va"].labeled_missing_image == old["va"]["labeled_missing_image"] + 1
        assert sum(new["expr"].counts("class_counts")) == sum(old["expr"]["class_counts"]) - 1
    assert _frames_without_image(out) == _frames_without_image(ref) | {("vidA", 6), ("vidC", 3)}
    reports = verify(out, progress=False)
    assert all(rep.ok for rep in reports) and stats_problems(out, reports) == []

    # files fixed: the original command over the finished pack of other parameters needs --overwrite, and then
    # gives the clean release's shards byte for byte
    for rel, data in good.items():
        (images / rel).write_bytes(data)
    with pytest.raises(DataError, match="--overwrite"):
        pack(PackOptions(images, ann, out, segment_len=3, shard_size=2, progress=False))
    pack(PackOptions(images, ann, out, segment_len=3, shard_size=2, overwrite=True, progress=False))
    assert _shards(out) == _shards(ref)


def test_missing_and_empty_image_folders_pack_with_a_warning_each(tmp_path, capsys):
    """A labelled video whose image folder is missing, or there but empty: its frames pack without an image, and
    the manifest counts it in its warnings and the split's videos_without_images."""
    images, ann = make_release(tmp_path / "release")
    for p in (images / "vidB_left").iterdir():
        p.unlink()
    (images / "vidB_left").rmdir()  # missing
    for p in (images / "vidB_right").iterdir():
        p.unlink()  # empty
    out = tmp_path / "out"
    m = pack(PackOptions(images, ann, out, segment_len=4, shard_size=2, progress=False))
    assert m.warnings == [
        f"{images / 'vidB_left'}: no image folder; all 6 frames of vidB_left have no image",
        f"{images / 'vidB_right'}: empty image folder; all 6 frames of vidB_right have no image",
    ]
    assert read_manifest(out).warnings == m.warnings  # as written
    assert sorted(m.splits["train"].videos_without_images) == ["vidB_left", "vidB_right"]
    err = capsys.readouterr().err
    assert "mtl pack: warning:" in err and "empty image folder" in err
    assert {v for v, _ in _frames_without_image(out)} >= {"vidB_left", "vidB_right"}
    reports = verify(out, progress=False)
    assert all(r.ok for r in reports) and stats_problems(out, reports) == []


# ------------------------------------------------------------------------------------------------ processes


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for(pred, what: str, timeout: float = 60) -> None:
    end = time.time() + timeout
    while not pred():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _slow_release(root: Path, frames: int = 160) -> tuple[Path, Path]:
    """Big JPEGs, so packing them (every frame decoded) lasts a few seconds with 2 workers."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    images, ann = root / "cropped_aligned", root / "annotations"
    (root / "big.jpg").write_bytes(buf.getvalue())
    for video, split in (("big", "Train_Set"), ("bigv", "Validation_Set")):
        (images / video).mkdir(parents=True)
        for f in range(1, frames + 1):
            os.link(root / "big.jpg", images / video / f"{f:05d}.jpg")  # one file on disk
        write_text(ann / VA_DIR / split / f"{video}.txt", [VA_HEADER, *va_rows(frames)])
    return images, ann


def _start_pack(images: Path, ann: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mtl.cli", "pack", "--images", str(images), "--annotations", str(ann),
           "--out", str(out), "--segment-len", "4", "--shard-size", "1", "--workers", "2"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=ctrl_c_as_in_a_terminal)  # fmt: skip


def test_pack_workers_end_with_ctrl_c_and_with_kill_9(tmp_path):
    images, ann = _slow_release(tmp_path / "release")
    out = tmp_path / "out"

    # Ctrl-C in a terminal: SIGINT to the whole process group; one line, no worker tracebacks, no worker left
    proc = _start_pack(images, ann, out)
    try:
        _wait_for(lambda: len(_children(proc.pid)) >= 2 and any(out.glob("*/*.tar")), "pack workers")
        workers = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "mtl pack: interrupted" in stderr and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    _wait_for(lambda: not any(_alive(p) for p in workers), "workers to end after Ctrl-C", timeout=10)
    assert not (out / MANIFEST).exists() and any(out.glob("*/*.tar"))

    # kill -9 of the command alone (its workers get no signal from anyone): they end too
    proc = _start_pack(images, ann, out)
    try:
        _wait_for(lambda: len(_children(proc.pid)) >= 2, "pack workers")
        workers = _children(proc.pid)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    _wait_for(lambda: not any(_alive(p) for p in workers), "workers to end after kill -9", timeout=10)


def test_loader_workers_survive_ctrl_c_so_training_can_save(tiny_shards):
    """The trainer takes Ctrl-C as "save and stop at the end of the step" (StopFlag); the terminal sends SIGINT to
    the loader workers too. A worker that dies of it fails the main process before it can save; one that inherited
    the trainer's handler announces a save it cannot make. Here SIGINT goes to the whole process group after the
    first batch of two epochs (handler installed after, then before the workers start): every batch still
    arrives, and the save is announced once per Ctrl-C."""
    script = """if True:
        import sys, time
        from mtl.config import DataConfig
        from mtl.data.loader import make_train_loader
        from mtl.engine.preemption import StopFlag
        cfg = DataConfig(shards=sys.argv[1], clip_len=4, batch_size=2, num_workers=2, image_size=16)
        for epoch, before in ((0, False), (1, True)):
            stop = StopFlag().install() if before else StopFlag()
            loader = make_train_loader(cfg, mean=(0.5,) * 3, std=(0.5,) * 3, rank=0, world_size=1, epoch=epoch,
                                       seed=0)
            n = 0
            for batch in loader:
                n += 1
                if n == 1:
                    if not before:
                        stop.install()
                    print("first", flush=True)
                    while not stop.requested:
                        time.sleep(0.05)
            stop.uninstall()
            print("batches", n, len(loader), flush=True)
    """
    proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_shards)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)  # fmt: skip
    lines = []
    try:
        for _ in range(2):
            while not (line := proc.stdout.readline()).startswith("first"):
                assert line, proc.stderr.read()[-3000:]
                lines.append(line)
            time.sleep(0.3)  # the workers are at their next batches
            os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    out = "".join(lines) + stdout
    assert out.count("interrupted: saving a checkpoint") == 2, out
    counts = [line.split()[1:] for line in out.splitlines() if line.startswith("batches")]
    assert len(counts) == 2 and all(n == total and int(n) > 2 for n, total in counts), out


# ------------------------------------------------------------------------------------------------ shards


def test_changed_shard_stops_the_loaders_with_one_line(tmp_path):
    images, ann = make_release(tmp_path / "release")
    root = tmp_path / "out"
    m = pack(PackOptions(images, ann, root, segment_len=4, shard_size=2, progress=False))
    cfg = DataConfig(shards=str(root), clip_len=4, batch_size=1, eval_batch_size=1, num_workers=1, image_size=16)
    val = make_eval_loader(cfg, "val", mean=MEAN, std=STD, rank=0, world_size=1)  # opened before the change

    # bytes appended after the tar's end: every reader still reads it, so only the size gives it away
    for split in ("train", "val"):
        with open(root / m.splits[split].shards[0].path, "ab") as f:
            f.write(bytes(1024))
    want = r"000000\.tar: \d+ bytes, the manifest says \d+ \(changed after `mtl pack`\); run `mtl shards verify .*`$"
    with pytest.raises(DataError, match="train/" + want):
        make_train_loader(cfg, mean=MEAN, std=STD, rank=0, world_size=1, epoch=0, seed=0)
    with pytest.raises(DataError) as err:  # in a loader worker: the same one line, not the worker's traceback
        list(val)
    assert re.fullmatch(f"{root}/val/{want}", str(err.value)), str(err.value)


def test_verify_recomputes_the_manifests_statistics(tmp_path):
    images, ann = make_release(tmp_path / "release")
    root = tmp_path / "out"
    pack(PackOptions(images, ann, root, segment_len=4, shard_size=2, progress=False))
    assert stats_problems(root, verify(root, progress=False)) == []

    manifest = json.loads((root / MANIFEST).read_text())
    counts = manifest["splits"]["train"]["tasks"]["expr"]["class_counts"]
    lied = [counts[1], counts[0], *counts[2:]]  # the loss weights would be off
    assert lied != counts
    manifest["splits"]["train"]["tasks"]["expr"]["class_counts"] = lied
    manifest["splits"]["val"]["video_frames"]["vidC"] += 1
    (root / MANIFEST).write_text(json.dumps(manifest))

    proc = mtl("shards", "verify", str(root), "--workers", "2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("BAD")]
    assert lines == [
        f"BAD manifest.json statistics: splits.train.tasks.expr.class_counts: manifest {lied}, samples {counts}",
        "BAD manifest.json statistics: splits.val.video_frames: manifest {'vidC': 9}, samples {'vidC': 8}",
    ]
    assert len(json.loads(proc.stdout.splitlines()[-1])["stats_mismatches"]) == 2


# ------------------------------------------------------------------------------------------------ full disk


@pytest.fixture()
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), so writes end in ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=30)


def test_full_disk_during_pack_names_the_path_and_a_rerun_finishes(tmp_path, small_disk):
    images, ann = make_release(tmp_path / "release")
    st = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(bytes(st.f_bavail * st.f_frsize - 48 * 1024))  # 48 KiB left: a few shards fit, not all
    out = small_disk / "shards"
    args = ["pack", "--images", str(images), "--annotations", str(ann), "--out", str(out), "--segment-len", "2",
            "--shard-size", "1", "--workers", "2"]  # fmt: skip
    proc = mtl(*args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"mtl pack: error: {out}/(train|val)/\d{{6}}\.tar\.tmp: No space left on device", last), last
    assert not list(out.glob("*/*.tmp"))  # the partial file is gone: its space is back
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")}
    assert kept

    filler.unlink()  # space freed: the same pack finishes, keeping what was written
    pack(PackOptions(images, ann, out, segment_len=2, shard_size=1, workers=2, progress=False))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert all(r.ok for r in verify(out, progress=False))
