"""A tiny hand-written Aff-Wild2 release with every quirk the parser must handle, and its expected counts.

Kept small (16x16 JPEGs, a few frames per video) so tests that pack it run in well under a second.

Train split:
  vidA        10 label rows in VA (CRLF, row 3 = -5,-5), EXPR (row 5 = -1), AU (row 2 has one -1);
              images 1..12 except 4 (a labelled frame without image; 11, 12 are images past the labels)
  vidB_left   VA only, 6 rows; images 1..6
  vidB_right  EXPR only, 6 rows; images 1..6
  vidS        VA, 20 rows, every image the same picture (for "one augmentation per clip")
Val split:
  vidC        VA and EXPR, 8 rows; images 1..8 (the AU validation folder is empty)
Not labelled:
  vidD        images 1..3
"""

from __future__ import annotations

import io
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from mtl.tasks.abaw import AU_NAMES, EXPR_NAMES

VA_DIR, EXPR_DIR, AU_DIR = "VA_Estimation_Challenge", "EXPR_Recognition_Challenge", "AU_Detection_Challenge"
TRAIN, VAL = "Train_Set", "Validation_Set"
VA_HEADER, EXPR_HEADER, AU_HEADER = "valence,arousal", ",".join(EXPR_NAMES), ",".join(AU_NAMES)


def jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_text(path: Path, lines: list[str], crlf: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nl = "\r\n" if crlf else "\n"
    path.write_bytes((nl.join(lines) + nl).encode())
    return path


def write_images(images: Path, video: str, frames, same: bool = False) -> None:
    folder = images / video
    folder.mkdir(parents=True, exist_ok=True)
    for f in frames:
        (folder / f"{f:05d}.jpg").write_bytes(jpeg(0 if same else zlib.crc32(f"{video}/{f}".encode())))


def va_rows(n: int, invalid=()) -> list[str]:
    return ["-5,-5" if i in invalid else f"{(i % 7) / 10 - 0.3:.1f},{(i % 5) / 10:.1f}" for i in range(1, n + 1)]


def expr_rows(n: int, invalid=()) -> list[str]:
    return ["-1" if i in invalid else str(i % 8) for i in range(1, n + 1)]


def au_rows(n: int, partial_invalid=()) -> list[str]:
    rows = []
    for i in range(1, n + 1):
        aus = [str((i + j) % 2) for j in range(12)]
        if i in partial_invalid:
            aus[3] = "-1"
        rows.append(",".join(aus))
    return rows


def make_release(root: Path, expr_dir: str = EXPR_DIR) -> tuple[Path, Path]:
    """Write the release; returns (images, annotations)."""
    if root.exists():
        shutil.rmtree(root)
    images, ann = root / "cropped_aligned", root / "annotations"
    write_images(images, "vidA", [f for f in range(1, 13) if f != 4])
    write_images(images, "vidB_left", range(1, 7))
    write_images(images, "vidB_right", range(1, 7))
    write_images(images, "vidS", range(1, 21), same=True)
    write_images(images, "vidC", range(1, 9))
    write_images(images, "vidD", range(1, 4))
    write_text(ann / VA_DIR / TRAIN / "vidA.txt", [VA_HEADER, *va_rows(10, invalid={3})], crlf=True)
    write_text(ann / VA_DIR / TRAIN / "vidB_left.txt", [VA_HEADER, *va_rows(6)])
    write_text(ann / VA_DIR / TRAIN / "vidS.txt", [VA_HEADER, *va_rows(20)])
    write_text(ann / VA_DIR / VAL / "vidC.txt", [VA_HEADER, *va_rows(8)])
    write_text(ann / expr_dir / TRAIN / "vidA.txt", [EXPR_HEADER, *expr_rows(10, invalid={5})])
    write_text(ann / expr_dir / TRAIN / "vidB_right.txt", [EXPR_HEADER, *expr_rows(6)], crlf=True)
    write_text(ann / expr_dir / VAL / "vidC.txt", [EXPR_HEADER, *expr_rows(8)])
    write_text(ann / AU_DIR / TRAIN / "vidA.txt", [AU_HEADER, *au_rows(10, partial_invalid={2})])
    (ann / AU_DIR / VAL).mkdir(parents=True, exist_ok=True)
    return images, ann


# Expected manifest counts of make_release (valid label & image / valid label & no image).
EXPECTED = {
    "train": {
        "videos": 4,
        "frames": 12 + 6 + 6 + 20,
        "va": (9 - 1 + 6 + 20, 1),  # vidA: 10 rows, row 3 invalid, frame 4 no image
        "expr": (9 - 1 + 6, 1),  # vidA: row 5 invalid, frame 4 no image; vidB_right 6
        "au": (9 - 1, 1),  # vidA: row 2 invalid, frame 4 no image
    },
    "val": {"videos": 1, "frames": 8, "va": (8, 0), "expr": (8, 0), "au": (0, 0)},
}


def mtl_track_files(root: Path, images: Path) -> dict[str, Path]:
    """MTL-track single files over the same images: rows out of order, invalid codes, unlisted frames."""
    header = "image,valence,arousal,expression,aus"
    train = [header]
    for f in (3, 1, 2, 5, 6):  # frame 4 unlisted (and has no image), rows not in order
        va = "-5,-5" if f == 2 else f"0.{f},-0.{f}"
        expr = "-1" if f == 5 else str(f % 8)
        aus = ",".join(["-1"] * 12) if f == 6 else ",".join(str((f + j) % 2) for j in range(12))
        train.append(f"vidA/{f:05d}.jpg,{va},{expr},{aus}")
    val = [header] + [f"vidC/{f:05d}.jpg,0.1,0.2,{f % 8},{','.join(['0'] * 12)}" for f in range(1, 9)]
    return {
        "train": write_text(root / "mtl" / "train.txt", train, crlf=True),
        "val": write_text(root / "mtl" / "val.txt", val),
    }
