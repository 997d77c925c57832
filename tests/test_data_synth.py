"""`mtl synth`: the embedded default data has the real layout's quirks and labels carried by geometry, not colour."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl.data.pack import PackOptions, pack
from mtl.data.synth import make_synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("synth")
    root = make_synth(base / "synth", videos=8, frames=150, seed=0)
    manifest = pack(PackOptions(root / "cropped_aligned", root / "annotations", base / "shards", progress=False))
    return root, manifest


def _label_files(root: Path, task: str, split: str) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in (root / "annotations" / task / split).glob("*.txt")}


def test_layout_and_quirks(synth):
    root, manifest = synth
    videos = {p.name for p in (root / "cropped_aligned").iterdir()}
    assert any(v.endswith("_left") for v in videos) and any(v.endswith("_right") for v in videos)
    files = {(t, s): _label_files(root, t, s) for t in ("VA_Estimation_Challenge", "EXPR_Recognition_Challenge",
             "AU_Detection_Challenge") for s in ("Train_Set", "Validation_Set")}  # fmt: skip
    assert all(files.values())  # every task has files in both splits
    assert len({frozenset(files[(t, "Train_Set")]) for t in ("VA_Estimation_Challenge",
               "EXPR_Recognition_Challenge", "AU_Detection_Challenge")}) == 3  # fmt: skip  # video sets differ
    text = b"".join(b for f in files.values() for b in f.values())
    assert b"\r\n" in text and b"\n-5,-5" in text
    au = b"".join(files[("AU_Detection_Challenge", "Train_Set")].values())
    assert b"-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1" in au and (b",0,-1," in au or b",1,-1," in au)
    assert b"\n-1" in b"".join(files[("EXPR_Recognition_Challenge", "Train_Set")].values())
    for split in ("train", "val"):
        s = manifest.splits[split]
        assert s.tasks["va"].labeled_missing_image > 0 or split == "val"
        assert all(c > 0 for c in s.tasks["expr"].counts("class_counts")), split  # every class in both splits
        positives = np.array(s.tasks["au"].counts("positive_counts")) / s.tasks["au"].labeled_frames
        assert ((positives > 0.1) & (positives < 0.6)).all(), (split, positives)
    assert manifest.unlabeled_videos  # a folder of images nobody labelled
    rows = {v: len(b.splitlines()) - 1 for v, b in files[("VA_Estimation_Challenge", "Train_Set")].items()}
    last = {v: max(int(p.stem) for p in (root / "cropped_aligned" / v).glob("*.jpg")) for v in rows}
    assert any(last[v] > rows[v] for v in rows)  # images past the end of the labels
    assert manifest.splits["train"].tasks["va"].labeled_missing_image > 0  # labels without image


def test_same_seed_same_bytes(tmp_path):
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        return h.hexdigest()

    a = make_synth(tmp_path / "a", videos=3, frames=20, seed=5, workers=1)
    b = make_synth(tmp_path / "b", videos=3, frames=20, seed=5, workers=2)
    c = make_synth(tmp_path / "c", videos=3, frames=20, seed=6, workers=1)
    assert digest(a) == digest(b) != digest(c)


def _frames_and_labels(root: Path, split_dir: str):
    va_dir = root / "annotations" / "VA_Estimation_Challenge" / split_dir
    xs, ys = [], []
    for f in sorted(va_dir.glob("*.txt")):
        rows = f.read_text().splitlines()[1:]
        for i, row in enumerate(rows):
            img = root / "cropped_aligned" / f.stem / f"{i + 1:05d}.jpg"
            v, a = (float(x) for x in row.split(","))
            if v == -5 or not img.exists():
                continue
            xs.append(np.asarray(Image.open(img).convert("L").resize((28, 28), Image.BILINEAR), np.float32) / 255)
            ys.append((v, a))
    return np.stack(xs), np.array(ys)


def test_labels_come_from_face_geometry_not_colour(synth):
    """A linear model on pixels reads arousal (eye openness) on held-out videos; mean colour and the corner
    pixel, which carry only per-video appearance, explain next to nothing."""
    from sklearn.linear_model import Ridge

    root, _ = synth
    xtr, ytr = _frames_and_labels(root, "Train_Set")
    xva, yva = _frames_and_labels(root, "Validation_Set")

    def r2(ftr, fva, col):
        model = Ridge(alpha=10.0).fit(ftr, ytr[:, col])
        res = yva[:, col] - model.predict(fva)
        return 1 - res.var() / yva[:, col].var()

    pixels = r2(xtr.reshape(len(xtr), -1), xva.reshape(len(xva), -1), 1)
    colour = [r2(np.stack([x.mean((1, 2)), x[:, 0, 0]], 1), np.stack([z.mean((1, 2)), z[:, 0, 0]], 1), c)
              for x, z, c in ((xtr, xva, 0), (xtr, xva, 1))]  # fmt: skip
    assert pixels > 0.3, pixels
    assert max(colour) < 0.1, colour
