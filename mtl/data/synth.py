"""`mtl synth`: a small synthetic release in the exact Aff-Wild2 layout, the project's embedded default data.

Layout written under ``out``::

    out/cropped_aligned/<video>/<NNNNN>.jpg                                  112x112 JPEG, quality 90
    out/annotations/{VA_Estimation,EXPR_Recognition,AU_Detection}_Challenge/{Train_Set,Validation_Set}/<video>.txt

so ``mtl pack --images out/cropped_aligned --annotations out/annotations`` reads it like the real thing.

With ``test_videos``, a test set as the organisers publish it is added (see ``make_test_set``): unlabelled frame
folders with frames missing at the start, the middle and the end, a tiny raw video per test video
(``out/videos/<video>.mp4``, 32x32, one for a ``_left`` / ``_right`` pair), and the lists in
``out/test_set/<Track>_test_set_release.txt`` (each task's track, and the MTL track's list of frames).

The labels are learnable only from face geometry, drawn per frame on a textured background with a per-video skin
tone, head position, scale and lighting that carry no label information:

- valence -> mouth curvature (smile / frown); arousal -> eye openness and brow height;
- expression (8 classes) -> three binary cues: brows in a V (bit 0), forehead wrinkles (bit 1), open mouth (bit 2);
- each AU -> its own local mark: AU1 / AU2 ticks above the inner / outer brows, AU4 furrows between the brows, AU6
  cheek marks, AU7 lower-lid lines, AU10 lines beside the nose, AU12 / AU15 lines up / down from the mouth corners,
  AU23 a thick lip line, AU24 a crease under the lip, AU25 teeth, AU26 a dropped jaw (longer chin, chin mark).

Over time VA follows a smooth random walk, EXPR and AU are piecewise constant over tens of frames; every
expression class (dealt from shuffled decks per split) and every AU occurs in both splits.

The release's quirks are all there: header lines, CRLF in some files, invalid codes (-5 VA, -1 EXPR, -1 AU, and one
frame with a single -1 AU), labelled frames without an image, images past the end of the labels, a folder of images
with no labels at all, a ``_left`` / ``_right`` pair, and video sets that differ per task.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mtl.data import mtl_track_file
from mtl.data.pool import process_pool
from mtl.data.testset import LIST_SUFFIX
from mtl.errors import DataError
from mtl.tasks.abaw import AU, EXPR, VA

SIZE = 112
SS = 2  # drawn at 2x, then box-filtered down: smooth edges without per-shape antialiasing
SPLIT_FOLDERS = {"train": "Train_Set", "val": "Validation_Set"}
TASKS = (VA, EXPR, AU)  # the tasks the drawn faces carry (folders, headers and row format from their descriptions)
NUM_EXPR, NUM_AU = EXPR.width, AU.width


# ------------------------------------------------------------------------------------------------ labels


@dataclass
class SynthVideo:
    name: str
    split: str
    n: int
    seed: int
    tasks: tuple[str, ...]
    va: np.ndarray  # float [n, 2], rounded as written
    expr: np.ndarray  # int [n]
    au: np.ndarray  # int [n, 12]
    label_rows: int  # rows written to the annotation files (< n: images past the labels)
    missing: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # 0-based frames with no JPEG
    va_invalid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    expr_invalid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    au_invalid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    crlf: bool = False


def smooth_walk(rng: np.random.Generator, n: int) -> np.ndarray:
    """A smooth random curve in [-1, 1]: low-pass filtered noise with a random level and spread."""
    sigma = rng.uniform(5.0, 12.0)
    k = np.arange(-int(3 * sigma), int(3 * sigma) + 1)
    kernel = np.exp(-0.5 * (k / sigma) ** 2)
    noise = rng.standard_normal(n + 2 * len(k))
    x = np.convolve(noise, kernel / kernel.sum(), mode="same")[len(k) : len(k) + n]
    x = (x - x.mean()) / (x.std() + 1e-8)
    return np.clip(rng.uniform(-0.3, 0.3) + rng.uniform(0.4, 0.6) * x, -1.0, 1.0)


def piecewise(rng: np.random.Generator, n: int, lo: int, hi: int, values) -> np.ndarray:
    out = np.zeros(n, np.int64)
    t = 0
    while t < n:
        length = int(rng.integers(lo, hi + 1))
        out[t : t + length] = next(values)
        t += length
    return out


def class_deck(rng: np.random.Generator):
    """Expression classes dealt from shuffled decks: every class occurs about equally often in a split."""
    while True:
        yield from rng.permutation(NUM_EXPR).tolist()


def au_track(rng: np.random.Generator, n: int) -> np.ndarray:
    """On/off segments, on ~35% of the time, with at least one 'on' stretch per video."""
    out = np.zeros(n, np.int64)
    t, on = 0, rng.random() < 0.35
    while t < n:
        length = int(rng.integers(12, 45)) if on else int(rng.integers(25, 85))
        out[t : t + length] = on
        t += length
        on = not on
    if not out.any():
        a = int(rng.integers(0, max(1, n - 20)))
        out[a : a + 20] = 1
    return out


def _runs(rng: np.random.Generator, n: int, count: int, lo: int, hi: int) -> np.ndarray:
    idx: set[int] = set()
    for _ in range(count):
        length = int(rng.integers(lo, hi + 1))
        a = int(rng.integers(0, max(1, n - length)))
        idx.update(range(a, min(n, a + length)))
    return np.array(sorted(idx), np.int64)


def plan_videos(videos: int, frames: int, seed: int) -> list[SynthVideo]:
    """Names, splits, lengths, labels and quirks of every video; deterministic in (videos, frames, seed)."""
    rng = np.random.default_rng([seed, 0x5E])
    n_val = max(1, round(videos * 0.27)) if videos >= 2 else 0
    n_train = videos - n_val
    out: list[SynthVideo] = []
    for split, count in (("train", n_train), ("val", n_val)):
        deck = class_deck(np.random.default_rng([seed, 0xDEC, len(out)]))
        names = []
        k = 0
        while len(names) < count:
            fps = (25, 30, 30, 60)[k % 4]
            base = f"{(100 if split == 'train' else 300) + k}-{fps}-{(640, 1280, 480)[k % 3]}x{(360, 720, 270)[k % 3]}"
            if split == "train" and k == 0 and count >= 3:  # two people in one video
                names += [f"{base}_left", f"{base}_right"]
            else:
                names.append(base)
            k += 1
        for i, name in enumerate(names[:count]):
            vseed = int(rng.integers(1 << 31))
            vr = np.random.default_rng(vseed)
            n = max(16, int(round(frames * vr.uniform(0.7, 1.3))))
            tasks = [VA.name, EXPR.name, AU.name]
            if split == "train" and count >= 5:  # video sets differ per task
                skip = {VA.name: i == 2, EXPR.name: i == 3, AU.name: i in (2, 4)}
                tasks = [t for t in tasks if not skip[t]]
            elif split == "val" and count >= 4 and i == 3:
                tasks = [VA.name, EXPR.name]
            va = np.round(np.stack([smooth_walk(vr, n), smooth_walk(vr, n)], 1), 4)
            expr = piecewise(vr, n, 18, 50, deck)
            au = np.stack([au_track(vr, n) for _ in range(NUM_AU)], 1)
            v = SynthVideo(name, split, n, vseed, tuple(tasks), va, expr, au, label_rows=n, crlf=i % 3 == 1)
            if i % 5 == 4 and n > 40:
                v.label_rows = n - 8  # images past the end of the annotation files
            if i % 2 == 0 and n > 30:
                v.missing = _runs(vr, n, 3, 1, 5)  # labelled frames whose image is missing
            if i % 3 == 0:
                v.va_invalid = _runs(vr, n, 1, 6, 14)
            if i % 4 == 1:
                v.expr_invalid = _runs(vr, n, 1, 6, 14)
            if i % 3 == 2:
                v.au_invalid = _runs(vr, n, 1, 6, 14)
            out.append(v)
    return out


def write_annotations(root: Path, v: SynthVideo) -> None:
    nl = "\r\n" if v.crlf else "\n"
    values = {VA.name: v.va, EXPR.name: v.expr, AU.name: v.au}
    invalid = {VA.name: v.va_invalid, EXPR.name: v.expr_invalid, AU.name: v.au_invalid}
    for task in TASKS:
        if task.name not in v.tasks:
            continue
        bad = set(invalid[task.name].tolist())
        lines = [task.format_row(values[task.name][i], i not in bad) for i in range(v.label_rows)]
        partial = v.label_rows // 2
        if task is AU and v.au_invalid.size and partial not in bad:  # one frame with a single AU marked -1
            fields = lines[partial].split(",")
            fields[5] = str(AU.invalid)
            lines[partial] = ",".join(fields)
        folder = root / task.folders[0] / SPLIT_FOLDERS[v.split]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{v.name}.txt").write_bytes((",".join(task.columns) + nl + nl.join(lines) + nl).encode())


# ------------------------------------------------------------------------------------------------ drawing


@dataclass
class Look:
    """Per-video appearance; none of it depends on the labels."""

    background: np.ndarray  # uint8 [SIZE*SS, SIZE*SS, 3]
    skin: tuple[int, int, int]
    dark: tuple[int, int, int]
    lips: tuple[int, int, int]
    scale: float

    @staticmethod
    def draw(rng: np.random.Generator) -> Look:
        s = SIZE * SS
        base = rng.integers(30, 226, size=3)
        coarse = rng.normal(0, 28, size=(6, 6, 3))
        tex = np.asarray(
            Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((s, s), Image.BICUBIC), np.float32
        )
        background = np.clip(base + tex - 128, 0, 255).astype(np.uint8)
        tone = rng.uniform(0, 1)
        skin = np.array([236, 203, 172]) * (1 - tone) + np.array([128, 86, 60]) * tone
        skin = tuple(int(c) for c in np.clip(skin + rng.normal(0, 8, 3), 0, 255))
        dark = tuple(int(c) for c in rng.integers(15, 50, size=3))
        lips = (int(rng.integers(110, 170)), int(rng.integers(30, 60)), int(rng.integers(40, 70)))
        return Look(background, skin, dark, lips, float(rng.uniform(0.96, 1.02)))


def draw_face(
    look: Look, v: float, a: float, expr: int, au: np.ndarray, dx: float, dy: float, scale: float, light: float
) -> Image.Image:
    """One 112x112 frame; see the module docstring for which geometry carries which label."""
    img = Image.fromarray(look.background)
    d = ImageDraw.Draw(img)
    k = SS * scale
    cx, cy = SS * (SIZE / 2 + dx), SS * (54 + dy)

    def p(x: float, y: float) -> tuple[float, float]:
        return (cx + k * x, cy + k * y)

    def line(points, width: float, color=look.dark) -> None:
        d.line([p(*q) for q in points], fill=color, width=max(1, round(width * k)), joint="curve")

    rx, ry_top, ry_bot = 44, 50, 50 + 6 * au[11]  # AU26 jaw drop: a longer chin (and a chin mark below)
    d.pieslice([p(-rx, -ry_top), p(rx, ry_top)], 180, 360, fill=look.skin)
    d.pieslice([p(-rx, -ry_bot), p(rx, ry_bot)], 0, 180, fill=look.skin)
    d.rectangle([p(-rx, -0.5), p(rx, 0.5)], fill=look.skin)

    # forehead wrinkles (expression bit 1); AU1 / AU2 ticks above the inner / outer brows
    if expr & 2:
        line([(-12, -45), (12, -45)], 2)
        line([(-16, -40), (16, -40)], 2)
    for sx in (-1, 1):
        if au[0]:
            line([(sx * 7, -36), (sx * 7, -28)], 4.5)
        if au[1]:
            line([(sx * 29, -37), (sx * 29, -26)], 4.5)
    # brows: height follows arousal; a V (inner ends down) is expression bit 0
    yb = -22 - 4 * a
    for sx in (-1, 1):
        line([(sx * 7, yb + (7 if expr & 1 else 0)), (sx * 29, yb)], 3)
    if au[2]:  # AU4 furrows between the brows
        line([(-2.5, -21), (-2.5, -12)], 3.5)
        line([(2.5, -21), (2.5, -12)], 3.5)
    # eyes: openness follows arousal
    he = 1.5 + 6.0 * (a + 1) / 2
    for sx in (-1, 1):
        ex = sx * 18
        d.ellipse([p(ex - 9, -8 - he), p(ex + 9, -8 + he)], fill=(245, 245, 240), outline=look.dark, width=SS)
        r = min(3.0, he)
        d.ellipse([p(ex - r, -8 - r), p(ex + r, -8 + r)], fill=look.dark)
        if au[4]:  # AU7 lower-lid line
            line([(ex - 7, 3), (ex + 7, 3)], 4)
        if au[3]:  # AU6 cheek marks
            d.ellipse([p(sx * 32 - 4, 5), p(sx * 32 + 4, 13)], fill=look.dark)
    # nose, and AU10 lines beside it
    line([(0, -4), (0, 12)], 2)
    line([(-4, 13), (4, 13)], 2)
    if au[5]:
        line([(-9, 12), (-9, 21)], 4)
        line([(9, 12), (9, 21)], 4)
    # mouth: curvature follows valence; open (expression bit 2); AU23 thick lip line; AU25 teeth
    my, hw = 27, 17
    xs = np.linspace(-hw, hw, 13)
    upper = [(x, my - 5 * v + 10 * v * (1 - (x / hw) ** 2)) for x in xs]
    if expr & 4:
        lower = [(x, y + 7 * (1 - (x / hw) ** 2)) for x, y in upper]
        d.polygon([p(*q) for q in upper + lower[::-1]], fill=(60, 20, 25))
        line(lower, 2.5, look.lips)
    line(upper, 7 if au[8] else 2.5, look.lips)
    if au[10]:
        y0 = upper[6][1]
        d.rectangle([p(-7, y0 - 0.5), p(7, y0 + 4.5)], fill=(250, 250, 245))
    corner = my - 5 * v
    for sx in (-1, 1):
        if au[6]:  # AU12 lip corner pulled up
            line([(sx * 19, corner - 1), (sx * 26, corner - 8)], 4.5)
        if au[7]:  # AU15 lip corner pulled down
            line([(sx * 19, corner + 1), (sx * 26, corner + 8)], 4.5)
    if au[9]:  # AU24 crease under the lip
        line([(-10, 42), (10, 42)], 4.5)
    if au[11]:  # AU26 jaw drop: the chin drops and shows a mark
        line([(-7, 48), (0, 51), (7, 48)], 4.5)

    small = np.asarray(img.reduce(SS), np.float32) * light
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))


def render_video(root: str, v: SynthVideo, quality: int) -> int:
    """Write the JPEGs of one video (runs in a worker); returns how many it wrote."""
    rng = np.random.default_rng([v.seed, 0x1A6])
    look = Look.draw(rng)
    folder = Path(root) / v.name
    folder.mkdir(parents=True, exist_ok=True)
    pose = np.stack([smooth_walk(rng, v.n) * 1.5, smooth_walk(rng, v.n), smooth_walk(rng, v.n) * 0.01], 1)
    light = 1 + 0.08 * smooth_walk(rng, v.n)
    missing = set(v.missing.tolist())
    written = 0
    for i in range(v.n):
        noise = rng.normal(0, 4, size=(SIZE, SIZE, 3))
        if i in missing:
            continue
        dx, dy, ds = pose[i]
        face = draw_face(look, v.va[i, 0], v.va[i, 1], int(v.expr[i]), v.au[i], dx, dy, look.scale * (1 + ds), light[i])
        arr = np.clip(np.asarray(face, np.float32) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        (folder / f"{i + 1:05d}.jpg").write_bytes(buf.getvalue())
        written += 1
    return written


# ------------------------------------------------------------------------------------------------ test set


@dataclass
class SynthTestVideo:
    video: SynthVideo  # unlabelled: its labels only shape the drawn faces
    raw: str  # the raw video's name (shared by a _left / _right pair)


def plan_test_videos(count: int, frames: int, seed: int) -> list[SynthTestVideo]:
    """Test videos (a ``_left`` / ``_right`` pair among them from 3 on); each lacks crops at its first 2 frames, a
    run in the middle and its last 3 frames (a submission still needs their rows)."""
    rng = np.random.default_rng([seed, 0x7E57])
    out: list[SynthTestVideo] = []
    k = 0
    while len(out) < count:
        base = f"{500 + k}-30-640x360"
        names = [f"{base}_left", f"{base}_right"] if k == 1 and count - len(out) >= 2 else [base]
        n = max(16, int(round(frames * rng.uniform(0.7, 1.3))))
        for name in names:
            vseed = int(rng.integers(1 << 31))
            vr = np.random.default_rng(vseed)
            va = np.round(np.stack([smooth_walk(vr, n), smooth_walk(vr, n)], 1), 4)
            expr = piecewise(vr, n, 18, 50, class_deck(vr))
            au = np.stack([au_track(vr, n) for _ in range(NUM_AU)], 1)
            mid = int(vr.integers(4, n - 8))
            missing = np.array(sorted({0, 1, mid, mid + 1, mid + 2, n - 3, n - 2, n - 1}), np.int64)
            v = SynthVideo(name, "test", n, vseed, (), va, expr, au, label_rows=0, missing=missing)
            out.append(SynthTestVideo(v, base))
        k += 1
    return out[:count]


def write_raw_video(path: Path, n: int, seed: int) -> None:
    """A tiny stand-in for the original video: n frames of 32x32 (only its frame count matters here)."""
    import av

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for _ in range(n):
            rgb = np.repeat(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 4, 0).repeat(4, 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_test_lists(folder: Path, test: list[SynthTestVideo]) -> dict[str, Path]:
    """The organisers' lists under their file names: VA lists every test video (not in name order), EXPR all but
    the last, AU all but the first; the MTL track lists every other frame of two videos (one frame without a crop
    among them), the second video's first."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [t.video.name for t in test][::-1]
    chosen = {VA.name: names, EXPR.name: names[:-1] or names, AU.name: names[1:] or names}
    out = {}
    for task in TASKS:
        path = folder / f"{task.test_lists[0]}{LIST_SUFFIX}.txt"
        path.write_text("\n".join(chosen[task.name]) + "\n")
        out[task.name] = path
    rows = ["image"]
    for t in test[:2][::-1]:
        frames = [f for f in range(2, t.video.n + 1, 2)] + [1]
        rows += [f"{t.video.name}/{f:05d}.jpg" for f in sorted(frames)]
    path = folder / f"{mtl_track_file.TEST_LISTS[0]}{LIST_SUFFIX}.txt"
    path.write_text("\n".join(rows) + "\n")
    out[mtl_track_file.TRACK] = path
    return out


def make_test_set(out: Path, count: int, frames: int, seed: int) -> list[SynthTestVideo]:
    """Lists and raw videos of ``count`` test videos under ``out`` (their frames are rendered with the others)."""
    test = plan_test_videos(count, frames, seed)
    for d in (out / "videos", out / "test_set"):
        if d.exists():
            shutil.rmtree(d)
    for t in test:
        if not (out / "videos" / f"{t.raw}.mp4").exists():
            write_raw_video(out / "videos" / f"{t.raw}.mp4", t.video.n, t.video.seed)
    write_test_lists(out / "test_set", test)
    return test


def make_synth(
    out: Path,
    videos: int = 22,
    frames: int = 240,
    seed: int = 0,
    workers: int | None = None,
    quality: int = 90,
    test_videos: int = 0,
) -> Path:
    """Write the synthetic release under ``out`` and return ``out`` (images in ``out/cropped_aligned``, labels in
    ``out/annotations``). ``videos`` labelled video folders (~27% in the validation split, a ``_left``/``_right``
    pair counting as two) of about ``frames`` frames each, plus one folder of images without labels, and
    ``test_videos`` test videos (``make_test_set``)."""
    if videos < 2 or frames < 16:
        raise DataError(f"synth needs at least 2 videos of 16 frames, got videos={videos}, frames={frames}")
    out = Path(out)
    images, annotations = out / "cropped_aligned", out / "annotations"
    for d in (images, annotations):
        if d.exists():
            shutil.rmtree(d)
    test = make_test_set(out, test_videos, frames, seed) if test_videos else []
    plan = plan_videos(videos, frames, seed)
    for v in plan:
        write_annotations(annotations, v)
    for task in TASKS:  # both split folders exist for every task, as in the release
        for split in SPLIT_FOLDERS.values():
            (annotations / task.folders[0] / split).mkdir(parents=True, exist_ok=True)
    extra_rng = np.random.default_rng([seed, 0xE7])
    extra = SynthVideo("999-25-480x270", "none", 24, int(extra_rng.integers(1 << 31)), (),
                       np.zeros((24, 2)), np.zeros(24, np.int64), np.zeros((24, NUM_AU), np.int64), 0)  # fmt: skip
    jobs = [*plan, extra, *(t.video for t in test)]
    workers = workers or min(2, os.cpu_count() or 1)
    if workers <= 1:
        for v in jobs:
            render_video(str(images), v, quality)
    else:
        with process_pool(workers) as pool:
            list(pool.map(render_video, [str(images)] * len(jobs), jobs, [quality] * len(jobs)))
    return out
