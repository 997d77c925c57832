"""`manifest.json` as one typed schema: what `mtl pack` writes reads back equal; a file that does not match is one
DataError naming the file and the field; a pack written before later fields existed still loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import make_release

from mtl.data.manifest import MANIFEST, LabelledSplit, read_manifest
from mtl.data.pack import PackOptions, pack
from mtl.errors import DataError
from mtl.features.manifest import read_feature_manifest


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("manifest")
    images, ann = make_release(base / "release")
    pack(PackOptions(images, ann, base / "shards", segment_len=4, shard_size=2, progress=False))
    return base / "shards"


def _with(packed: Path, tmp_path: Path, edit) -> Path:
    """A copy of the pack's manifest (only the manifest: the readers here open no shard) with ``edit`` applied."""
    root = tmp_path / "copy"
    root.mkdir()
    m = json.loads((packed / MANIFEST).read_text())
    edit(m)
    (root / MANIFEST).write_text(json.dumps(m))
    return root


def test_what_pack_writes_reads_back_typed_and_equal(packed: Path) -> None:
    m = read_manifest(packed)
    assert m.path == packed / MANIFEST and set(m.splits) == {"train", "val"}
    train = m.splits["train"]
    assert isinstance(train, LabelledSplit) and train.samples == sum(sh.samples for sh in train.shards)
    assert len(train.tasks["expr"].counts("class_counts")) == 8 and m.params.segment_len == 4
    assert json.loads(m.model_dump_json(exclude_none=True)) == json.loads((packed / MANIFEST).read_text())


@pytest.mark.parametrize(
    ("edit", "want"),
    [
        (lambda m: m["splits"]["train"]["shards"][1].update(sha256="abc"),
         "splits.train.shards[1].sha256: expected a sha256 (64 lowercase hex digits), got 'abc'"),
        (lambda m: m["splits"]["val"]["shards"][0].update(samples=True),
         "splits.val.shards[0].samples: expected an integer"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("path"), "splits.train.shards[0].path: missing"),
        (lambda m: m["splits"]["train"]["shards"][0].update(frames=10**6),
         "splits.train.shards[0].frames: 1000000 does not match the sum of sample_frames"),
        (lambda m: m["splits"]["train"].update(samples=10**6),
         "splits.train.samples: 1000000 disagrees with the shards"),
        (lambda m: m["splits"]["train"]["tasks"]["au"].update(positive_counts=[1]),
         "splits.train.tasks.au.positive_counts: expected 12 non-negative integers, got [1]"),
        (lambda m: m["splits"].update(val=[]), "splits.val: expected a mapping, got []"),
        (lambda m: m["params"].update(segment_len=0), "params.segment_len: expected an integer >= 1, got 0"),
        (lambda m: m.update(format="mtl-features/1"), "format: expected 'mtl-shards/1', got 'mtl-features/1'"),
    ],
)  # fmt: skip
def test_a_mismatch_is_one_line_naming_the_file_and_the_field(packed: Path, tmp_path: Path, edit, want: str) -> None:
    root = _with(packed, tmp_path, edit)
    with pytest.raises(DataError) as err:
        read_manifest(root)
    assert str(err.value).startswith(f"{root / MANIFEST}: {want}") and "\n" not in str(err.value)


def test_a_pack_from_before_the_later_fields_still_loads(packed: Path, tmp_path: Path) -> None:
    def strip(m: dict) -> None:  # what packs written before these fields lack
        for s in m["splits"].values():
            for k in ("bad_rows_skipped", "bad_rows", "skipped_files", "bad_images_skipped", "bad_images",
                      "videos_without_images"):  # fmt: skip
                s.pop(k)
            for sh in s["shards"]:
                sh.pop("bytes"), sh.pop("images")
        m["params"].pop("shuffled_splits"), m["params"].pop("sample_format")

    m = read_manifest(_with(packed, tmp_path, strip))
    assert m.splits["train"].bad_images == [] and m.splits["train"].shards[0].bytes is None
    assert m.params.shuffled_splits == ["train"]


def test_missing_split_and_empty_split_name_the_file(packed: Path, tmp_path: Path) -> None:
    m = read_manifest(packed)
    with pytest.raises(DataError, match=r"manifest.json: no split 'test' \(have train, val\)"):
        m.split("test")
    empty = _with(packed, tmp_path, lambda d: d["splits"]["val"].update(samples=0, frames=0, shards=[]))
    with pytest.raises(DataError, match=rf"{empty / MANIFEST}: split 'val' has no samples"):
        read_manifest(empty).split("val")


def test_a_feature_cache_manifest_mismatch_names_the_field(tmp_path: Path) -> None:
    shard = {"path": "train/000000.tar", "bytes": 10, "sha256": "0" * 64, "samples": 1, "frames": 3,
             "sample_frames": [3]}  # fmt: skip
    good = {"format": "mtl-features/1", "source": {"shards": "/data/shards", "manifest_sha256": "1" * 64},
            "extractor": {"backbone": "vit_tiny", "weights_sha256": "2" * 64, "checkpoint": None, "pool": "avg",
                          "image_size": 112, "mean": [0.5] * 3, "std": [0.5] * 3, "hflip_tta": False},
            "dim": 192, "dtype": "float16",
            "splits": {"train": {"videos": 1, "frames": 3, "frames_with_image": 3, "shards": [shard]}}}  # fmt: skip
    (tmp_path / MANIFEST).write_text(json.dumps(good))
    m = read_feature_manifest(tmp_path)
    assert m.dim == 192 and m.shards()[0].sample_frames == [3] and m.extractor.checkpoint is None
    shard["sample_frames"] = [1, 2]
    (tmp_path / MANIFEST).write_text(json.dumps(good))
    with pytest.raises(DataError, match=r"manifest.json: splits.train.shards\[0\].sample_frames: expected one frame"):
        read_feature_manifest(tmp_path)
    shard["sample_frames"] = [3]
    good["extractor"].pop("pool")
    (tmp_path / MANIFEST).write_text(json.dumps(good))
    with pytest.raises(DataError, match=r"manifest.json: extractor.pool: missing$"):
        read_feature_manifest(tmp_path)
