"""The loaders on real shards: batch contract, one augmentation per clip, rank/worker splits, resume, evaluation."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from data_fixtures import make_release
from PIL import Image

from mtl.config import DataConfig, replace
from mtl.data.abaw import parse_abaw
from mtl.data.labels import ParseLog
from mtl.data.legs import Leg
from mtl.data.loader import frames_float, make_eval_loader, make_train_loader
from mtl.data.manifest import read_manifest
from mtl.data.pack import PackOptions, pack
from mtl.data.shardio import parse_sample, read_raw
from mtl.data.transforms import decode_clip
from mtl.errors import DataError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
FIELDS = {
    "frames": torch.uint8, "gain": torch.float32, "bias": torch.float32, "has_image": torch.bool,
    "pad": torch.bool, "va": torch.float32,
    "va_valid": torch.bool, "expr": torch.int64, "expr_valid": torch.bool, "au": torch.float32,
    "au_valid": torch.bool, "frame": torch.int64,
}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("loader")
    images, ann = make_release(base / "release")
    shards = base / "shards"
    pack(PackOptions(images, ann, shards, segment_len=4, shard_size=3, progress=False))
    labels = parse_abaw(ann, ParseLog())
    samples = []  # global sample index -> (video, frames), in manifest order
    for split in ("train", "val"):
        for sh in read_manifest(shards).splits[split].shards:
            samples += [(split, parse_sample(r, "").video, parse_sample(r, "").frames.tolist())
                        for r in read_raw(shards / sh.path)]  # fmt: skip
    return {"images": images, "shards": shards, "labels": labels, "samples": samples}


def cfg_for(data, **kw) -> DataConfig:
    base = DataConfig(shards=str(data["shards"]), clip_len=3, batch_size=2, eval_batch_size=2, num_workers=0,
                      image_size=16, shuffle_buffer=4)  # fmt: skip
    return replace(base, **kw)


def truth(data, split: str, video: str, frame: int) -> dict:
    """Labels of one frame straight from the annotation files."""
    vl = data["labels"][split][video]
    dense = vl.dense(max(vl.rows, frame))
    return {k: v[frame - 1] for k, v in dense.items()}


def check_batch(data, batch: dict, split: str, videos: list[str], batch_size: int, clip_len: int) -> None:
    for k, dt in FIELDS.items():
        assert batch[k].dtype == dt, k
        assert batch[k].shape[:2] == (batch_size, clip_len), k
    assert batch["frames"].shape[2:] == (3, 16, 16)
    assert batch["va"].shape[2] == 2 and batch["au"].shape[2] == 12
    pad, has = batch["pad"], batch["has_image"]
    assert not (pad & has).any()
    for k in ("va_valid", "expr_valid", "au_valid"):
        assert not (pad & batch[k]).any()
    assert (batch["frames"][~has] == 0).all()
    assert (batch["frame"][pad] == 0).all()
    for b in range(batch_size):
        f = batch["frame"][b][~pad[b]].tolist()
        assert f == list(range(f[0], f[0] + len(f))) if f else True  # consecutive frames of one video
        for t, frame in enumerate(batch["frame"][b].tolist()):
            if pad[b, t]:
                continue
            want = truth(data, split, videos[b], frame)
            src = data["images"] / videos[b] / f"{frame:05d}.jpg"
            assert bool(has[b, t]) == src.exists()
            for k in ("va_valid", "expr_valid", "au_valid"):
                assert bool(batch[k][b, t]) == bool(want[k]), (videos[b], frame, k)
            assert batch["va"][b, t].tolist() == pytest.approx(want["va"].tolist())
            assert int(batch["expr"][b, t]) == int(want["expr"])
            assert batch["au"][b, t].tolist() == want["au"].tolist()


def test_train_batches_follow_the_contract(data):
    cfg = cfg_for(data)
    loader = make_train_loader(cfg, mean=MEAN, std=STD, rank=0, world_size=1, epoch=0, seed=0, device="cpu")
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for batch in batches:
        videos = [data["samples"][int(i)][1] for i in batch["sample"]]
        check_batch(data, batch, "train", videos, cfg.batch_size, cfg.clip_len)
        assert batch["frames"][batch["has_image"]].sum() > 0


def test_one_random_augmentation_per_clip(data):
    """vidS shows the same picture in every frame: each of its clips must have identical frames, and the
    augmentation must differ between clips and epochs (it is random, not a no-op)."""
    cfg = cfg_for(data, clip_len=4, batch_size=1)
    clips = []
    for epoch in range(3):
        for batch in make_train_loader(cfg, mean=MEAN, std=STD, rank=0, world_size=1, epoch=epoch, seed=1):
            if data["samples"][int(batch["sample"][0])][1] == "vidS":
                x = frames_float(batch["frames"], batch["gain"], batch["bias"])[0][batch["has_image"][0]]
                assert len(x) == 4 and all(torch.equal(x[0], x[i]) for i in range(4))
                clips.append(x[0])
    assert len(clips) == 15  # 5 segments of vidS x 3 epochs
    assert len({c.sum().item() for c in clips}) > 10


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(data):
    n = sum(1 for s in data["samples"] if s[0] == "train")
    for batch_size in (1, 4, 5):  # 12 samples: 1 divides evenly over 2 ranks; 4 and 5 drop a remainder
        cfg = cfg_for(data, batch_size=batch_size, num_workers=2)
        dropped = []
        for epoch in range(2):
            seen, lengths = [], []
            for rank in (0, 1):
                loader = make_train_loader(cfg, mean=MEAN, std=STD, rank=rank, world_size=2, epoch=epoch, seed=3)
                ids = [int(i) for b in loader for i in b["sample"]]
                assert len(ids) == len(loader) * batch_size
                lengths.append(len(loader))
                seen += ids
            assert lengths[0] == lengths[1] == n // (2 * batch_size)
            assert len(seen) == len(set(seen)) == n - n % (2 * batch_size)  # each sample at most once
            dropped.append(set(range(n)) - set(seen))
        if n % (2 * batch_size):
            assert dropped[0] != dropped[1]  # a different remainder each epoch
        else:
            assert dropped == [set(), set()]


def test_skip_batches_resumes_exactly_where_the_epoch_stopped(data):
    cfg = cfg_for(data, batch_size=1, num_workers=2)
    full = list(make_train_loader(cfg, mean=MEAN, std=STD, rank=1, world_size=2, epoch=4, seed=0))
    for skip in (1, 4):
        tail = make_train_loader(cfg, mean=MEAN, std=STD, rank=1, world_size=2, epoch=4, seed=0, skip_batches=skip)
        rest = list(tail)
        assert len(tail) == len(full) and tail.remaining == len(full) - skip == len(rest)
        for a, b in zip(full[skip:], rest):
            assert torch.equal(a["sample"], b["sample"]) and torch.equal(a["frames"], b["frames"])
            assert torch.equal(a["gain"], b["gain"]) and torch.equal(a["bias"], b["bias"])
    assert list(make_train_loader(cfg, mean=MEAN, std=STD, rank=0, world_size=2, epoch=0, seed=0,
                                  skip_batches=10_000)) == []  # fmt: skip


def _ids(cfg, *, world_size: int, epoch: int, skip: int = 0, stop: int | None = None, legs=()) -> list[int]:
    """Sample ids every rank reads of its batches [skip, stop) of the epoch."""
    out = []
    for rank in range(world_size):
        loader = make_train_loader(cfg, mean=MEAN, std=STD, rank=rank, world_size=world_size, epoch=epoch, seed=5,
                                   skip_batches=skip, legs=legs)  # fmt: skip
        out += [int(i) for b in itertools.islice(loader, None if stop is None else stop - skip) for i in b["sample"]]
    return out


def test_resume_on_another_world_size_sees_the_rest_of_the_epoch_once(data):
    """2 ranks x 2 workers read 3 batches each, then 1 rank (other workers, buffer) reads on, then 3 ranks: the
    epoch's samples are each read once, none skipped beyond the last set-up's remainder."""
    n = sum(1 for s in data["samples"] if s[0] == "train")  # 12
    a = cfg_for(data, batch_size=1, num_workers=2, shuffle_buffer=4)
    b = cfg_for(data, batch_size=1, num_workers=0, shuffle_buffer=3)
    c = cfg_for(data, batch_size=1, num_workers=1, shuffle_buffer=1)
    first = _ids(a, world_size=2, epoch=2, stop=3)
    legs = [Leg(world_size=2, batch_size=1, workers=2, shuffle_buffer=4, batches=3)]
    # leg 2 is itself resumed: its first batch, then the rest after a skip (the same world size)
    second = _ids(b, world_size=1, epoch=2, stop=1, legs=legs) + _ids(b, world_size=1, epoch=2, skip=1, stop=3,
                                                                      legs=legs)  # fmt: skip
    legs.append(Leg(world_size=1, batch_size=1, workers=0, shuffle_buffer=3, batches=3))
    third = _ids(c, world_size=3, epoch=2, legs=legs)
    seen = first + second + third
    assert (len(first), len(second), len(third)) == (6, 3, 3)
    assert sorted(seen) == list(range(n)), "a sample was read twice or skipped"


def test_worker_count_does_not_change_what_a_rank_sees(data):
    """Same samples, and the same pixels: batches pass through each worker's ring slots many laps over (12 batches,
    3 slots a worker), so a slot rewritten before its batch was finished would show here."""
    seen = []
    for workers in (0, 1, 2):
        cfg = cfg_for(data, num_workers=workers, batch_size=1)
        batches = list(make_train_loader(cfg, mean=MEAN, std=STD, rank=0, world_size=1, epoch=1, seed=0))
        assert len(batches) == 12
        seen.append(sorted(((int(b["sample"][0]), frames_float(b["frames"], b["gain"], b["bias"])) for b in batches),
                           key=lambda x: x[0]))  # fmt: skip
    for other in seen[1:]:
        assert [i for i, _ in other] == [i for i, _ in seen[0]]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(other, seen[0]))


def test_too_few_samples_for_the_world_is_an_error(data):
    cfg = cfg_for(data, batch_size=64)
    with pytest.raises(DataError, match="fewer than world_size x data.batch_size"):
        make_train_loader(cfg, mean=MEAN, std=STD, rank=0, world_size=2, epoch=0, seed=0)


@pytest.mark.parametrize("split", ["train", "val"])
def test_eval_covers_every_frame_once_across_two_ranks_in_order(data, split):
    cfg = cfg_for(data, num_workers=2, clip_len=3, eval_batch_size=2)
    frames = read_manifest(data["shards"]).splits[split].video_frames
    seen, lengths = [], []
    for rank in (0, 1):
        loader = make_eval_loader(cfg, split, mean=MEAN, std=STD, rank=rank, world_size=2)
        batches = list(loader)
        lengths.append(len(loader))
        assert len(batches) == len(loader)
        order = []
        for batch in batches:
            check_batch(data, batch, split, batch["video"], cfg.eval_batch_size, cfg.clip_len)
            for b, video in enumerate(batch["video"]):
                assert (video == "") == bool(batch["pad"][b].all())
                order += [(video, f) for f in batch["frame"][b][~batch["pad"][b]].tolist()]
        if split == "val":  # unshuffled split: each rank's frames come in (video, frame) order
            assert order == sorted(order)
        seen += order
    assert lengths[0] == lengths[1]
    assert sorted(seen) == sorted((v, f) for v, n in frames.items() for f in range(1, n + 1))


def test_eval_frames_are_the_decoded_images_normalised(data):
    cfg = cfg_for(data, clip_len=4)
    batch = next(iter(make_eval_loader(cfg, "val", mean=MEAN, std=STD, rank=0, world_size=1)))
    for t, frame in enumerate(batch["frame"][0].tolist()):
        img = np.asarray(Image.open(data["images"] / "vidC" / f"{frame:05d}.jpg").convert("RGB"), np.float32)
        want = (torch.from_numpy(img).permute(2, 0, 1) / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
            STD
        ).view(3, 1, 1)
        got = frames_float(batch["frames"], batch["gain"], batch["bias"])[0, t]
        assert torch.allclose(got, want, atol=2 / 255 / min(STD))


def test_eval_pads_short_ranks_with_empty_batches(data):
    cfg = cfg_for(data, clip_len=8, eval_batch_size=1)  # val: 2 segments of 4 frames -> 2 clips
    loaders = [make_eval_loader(cfg, "val", mean=MEAN, std=STD, rank=r, world_size=3) for r in range(3)]
    assert [len(x) for x in loaders] == [1, 1, 1]
    first = list(loaders[0])  # 2 clips over 3 ranks: rank 0 has none, and still runs one (empty) batch
    assert len(first) == 1 and first[0]["video"] == [""] and first[0]["pad"].all()
    assert [b["video"] for r in (1, 2) for b in loaders[r]] == [["vidC"], ["vidC"]]


def test_decode_clip_brings_a_frame_of_another_size_to_the_clips_first():
    """Aff-Wild2 frames are all 112x112, but a release may mix sizes: the odd frame is resized, not an error."""
    sizes = [(16, 16), (24, 20), (16, 16)]  # (height, width)
    pictures = [np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i, (h, w) in enumerate(sizes)]
    jpegs = []
    for pic in pictures:
        buf = io.BytesIO()
        Image.fromarray(pic).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    offsets = np.cumsum([0, *map(len, jpegs)])
    x = decode_clip(b"".join(jpegs), offsets, np.array([0, 1, 2]))
    assert x.shape == (3, 3, 16, 16) and x.permute(0, 2, 3, 1).is_contiguous()
    pil = [torch.from_numpy(np.array(Image.open(io.BytesIO(j)).convert("RGB"))).permute(2, 0, 1) for j in jpegs]
    assert torch.equal(x[0], pil[0]) and torch.equal(x[2], pil[2])
    want = TF.resize(pil[1], [16, 16], antialias=True)
    assert (x[1].int() - want.int()).abs().max() <= 1


def test_frames_leave_as_uint8_and_the_network_input_is_the_float_path_on_the_device(data):
    """The loader hands over uint8 frames (pinned where CUDA is, for asynchronous copies) and their gain/bias; the
    one normalise step (`model_io.forward`, on the device) gives the network what the former float path made on the
    CPU: gain * pixels + bias in float32."""
    from mtl.data.prefetch import prefetch
    from mtl.runs.model_io import forward

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = cfg_for(data, num_workers=1)
    host = list(make_train_loader(cfg, mean=MEAN, std=STD, rank=0, world_size=1, epoch=0, seed=0))
    assert host and all(b["frames"].dtype == torch.uint8 for b in host)
    assert all(b["frames"].is_pinned() == torch.cuda.is_available() for b in host)
    assert all(b["has_image"].is_pinned() == torch.cuda.is_available() for b in host)

    seen = []

    def net(x, has_image, pad, image_index):
        assert torch.equal(image_index, (has_image & ~pad).reshape(-1).nonzero().squeeze(1))
        seen.append(x)
        return {"va": x.new_zeros(*pad.shape, 2)}

    for batch in prefetch(host, device):
        assert batch["frames"].device.type == device.type and batch["frames"].dtype == torch.uint8
        forward(net, batch)
    for batch, x in zip(host, seen, strict=True):
        old = batch["frames"].float() * batch["gain"][..., None, None] + batch["bias"][..., None, None]
        assert x.device.type == device.type and x.dtype == torch.float32 and x.shape == old.shape
        assert torch.allclose(x.cpu(), old, rtol=0, atol=1e-6)
        assert (x[batch["has_image"].to(device)].abs().sum() > 0) and (x[~batch["has_image"].to(device)] == 0).all()


def test_workers_persist_across_epochs(data):
    """One loader, several epochs: the same worker processes serve every pass (no fork, no new ring), and each
    epoch (with a resume point and legs set by ``set_epoch``) yields what a fresh loader of that epoch does, also
    after a pass abandoned midway (its unread batches' ring slots are reclaimed)."""
    import multiprocessing

    cfg = cfg_for(data, batch_size=1, num_workers=2)
    kw = dict(mean=MEAN, std=STD, rank=0, world_size=1, seed=2)

    def fresh(epoch, skip=0, legs=()):
        return [(b["sample"], b["frames"]) for b in make_train_loader(cfg, epoch=epoch, skip_batches=skip, legs=legs,
                                                                      **kw)]  # fmt: skip

    def same(got, want):
        return len(got) == len(want) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                             for a, b in zip(got, want))  # fmt: skip

    loader = make_train_loader(cfg, epoch=0, **kw)
    before = {p.pid for p in multiprocessing.active_children()}
    pids = []
    legs = [Leg(world_size=2, batch_size=1, workers=2, shuffle_buffer=4, batches=2)]
    for epoch, skip, legs_, abandon in ((0, 0, (), False), (1, 0, (), True), (1, 3, (), False), (2, 1, legs, False)):
        loader.set_epoch(epoch, skip, legs_)
        if abandon:
            next(iter(loader))  # read one batch and walk away: the workers have more in flight
        else:
            got = [(b["sample"], b["frames"]) for b in loader]
            assert same(got, fresh(epoch, skip, legs_)), (epoch, skip, legs_)
        pids.append({p.pid for p in multiprocessing.active_children()} - before)
    assert len(pids[0]) == 2 and all(p == pids[0] for p in pids), pids
    loader.close()
    assert not ({p.pid for p in multiprocessing.active_children()} & pids[0])
