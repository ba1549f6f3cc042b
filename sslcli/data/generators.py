"""Built-in data generators for the evaluation formats (`ssl data make`).

Each writes a tiny dataset, deterministic by seed, in the on-disk layout of the real one
(docs/evals.md), so that every eval can be tried and tested with no download:

- `make_shapes_folder`: `builtin:shapes` as an ImageFolder, `out/<class>/<id>.png`.
- `make_fewshot_folder`: class folders of shapes for few-shot episodes.
- `make_davis`: DAVIS-2017 layout; textured shapes moving smoothly over a textured background.
- `make_retrieval`: revisitop layout (roxford5k / rparis6k) with easy, hard and junk views.

Writing: everything goes into a fresh hidden sibling folder of `out`, renamed onto `out` at the
end (one rename), so `out` is either untouched or complete. An existing non-empty `out` (or a
file) is refused with UsageError; an existing empty folder is replaced. Random streams are derived
from (seed, generator, item), so e.g. adding sequences or distractors leaves the others unchanged.
Scenes and textures live in `sslcli.data.scenes`, the palette-PNG writer in `sslcli.data.palette`.
The retrieval ground truth is written with `pickle.dumps` (protocol 2) of plain data only
(dicts, lists, str, int, float), which the restricted unpickler of the retrieval eval reads.
"""

from __future__ import annotations

import colorsys
import os
import pickle
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sslcli.data import scenes
from sslcli.data.builtin import SHAPE_CLASSES, SHAPES, SPLITS, draw_shape, make_shapes, render_shape
from sslcli.data.palette import write_indexed_png
from sslcli.errors import UsageError, hint

JPEG_QUALITY = 90
FEWSHOT_MAX_CLASSES = 10 * len(SHAPE_CLASSES)  # 10 hue families x 10 shape classes
DAVIS_MAX_OBJECTS = 10
RETRIEVAL_DATASETS = ("roxford5k", "rparis6k")
JPEGS, ANNOTATIONS = Path("JPEGImages") / "480p", Path("Annotations") / "480p"
IMAGESETS = Path("ImageSets") / "2017"
_STREAM = {"fewshot": 10, "davis": 20, "retrieval": 30}  # SeedSequence tags per generator


# --------------------------------------------------------------------------- shared helpers


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Generator of the random stream (seed, *stream): independent per tag tuple."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, *stream]))


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """UsageError unless `value` is an int in [low, high] (no upper bound when high is None)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise UsageError(f"{name} must be an integer {bound}, got {value!r}")


def _check_out(out: Path) -> None:
    """UsageError when `out` is a file or a non-empty folder (never overwrite user data)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"output folder {out} exists and is not empty (refusing to overwrite it)")


@contextmanager
def _staged(out: Path | str) -> Iterator[Path]:
    """Yield a new hidden sibling folder of `out`; on success rename it onto `out`, else delete it."""
    out = Path(out).expanduser().resolve()
    _check_out(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise UsageError(f"cannot create output folder {out}: {err.strerror or err}") from None
    try:
        yield tmp
        try:
            os.replace(tmp, out)  # atomic; replaces `out` only if it is an empty folder
        except OSError:
            _check_out(out)  # filled meanwhile -> UsageError
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_jpeg(image: Image.Image, path: Path) -> None:
    """RGB JPEG (quality JPEG_QUALITY), parent folders created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=JPEG_QUALITY)


# --------------------------------------------------------------------------- image folders


def make_shapes_folder(out: Path, split: str = "train", n: int | None = None, size: int = 64,
                       seed: int = 0) -> Path:
    """Write `builtin:shapes` (see sslcli.data.builtin.make_shapes) as an ImageFolder.

    Layout: out/<class>/<i:06d>.png, RGB [size x size]; i = position in make_shapes' list, so
    the folder read in ImageFolder order gives the same class ids (all 10 class folders are
    created, even when n < 10). Returns out.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown shapes split {split!r}{hint(split, SPLITS) or ' (expected train or val)'}")
    if n is not None:
        _check_int("n", n, 1)
    _check_int("size", size, 8)
    _check_int("seed", seed, -(2**63))
    images, labels, classes = make_shapes(split, n, size, seed)
    with _staged(out) as tmp:
        for name in classes:
            (tmp / name).mkdir()
        for i, (image, label) in enumerate(zip(images, labels)):
            image.save(tmp / classes[label] / f"{i:06d}.png", format="PNG")
    return Path(out)


def fewshot_class_names(classes: int) -> list[str]:
    """Folder name of each few-shot class c (shape class c % 10, hue family c // 10).

    Up to 10 classes: the shape class names; beyond, "<shape class>-hue<family>".
    """
    families = -(-classes // len(SHAPE_CLASSES))
    return [SHAPE_CLASSES[c % len(SHAPE_CLASSES)] + (f"-hue{c // len(SHAPE_CLASSES)}" if families > 1 else "")
            for c in range(classes)]


def _hue_band(image: Image.Image, family: int, families: int) -> Image.Image:
    """`image` with its hue h in [0, 1) mapped into the band [(family + h) / families)."""
    hsv = np.array(image.convert("HSV"))
    hue = hsv[..., 0].astype(np.int32)
    hsv[..., 0] = ((family * 256 + hue) // families).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


def make_fewshot_folder(out: Path, classes: int = 10, per_class: int = 30, size: int = 64,
                        seed: int = 0) -> Path:
    """Write class folders for few-shot episodes: out/<class>/<i:04d>.png, RGB [size x size].

    Class c draws shape class c % 10 of builtin:shapes. With more than 10 classes (at most 100),
    the F = ceil(classes / 10) hue families split the hue circle in F bands and class c's colours
    lie in band c // 10 (names from `fewshot_class_names`). Returns out.
    """
    _check_int("classes", classes, 2, FEWSHOT_MAX_CLASSES)
    _check_int("per_class", per_class, 1)
    _check_int("size", size, 8)
    _check_int("seed", seed, -(2**63))
    families = -(-classes // len(SHAPE_CLASSES))
    rng = _rng(seed, _STREAM["fewshot"])
    with _staged(out) as tmp:
        for c, name in enumerate(fewshot_class_names(classes)):
            (tmp / name).mkdir()
            for i in range(per_class):
                image = render_shape(c % len(SHAPE_CLASSES), rng, size)
                if families > 1:
                    image = _hue_band(image, c // len(SHAPE_CLASSES), families)
                image.save(tmp / name / f"{i:04d}.png", format="PNG")
    return Path(out)


# --------------------------------------------------------------------------- DAVIS-2017


def _bounce(x: float, lo: float, hi: float) -> float:
    """x reflected into [lo, hi] (a point moving at constant speed bouncing off both walls)."""
    span = hi - lo
    if span <= 0:
        return (lo + hi) / 2
    y = (x - lo) % (2 * span)
    return lo + span - abs(y - span)


class _MovingShape:
    """One DAVIS object: a filled shape with a striped colour texture moving with it.

    Position in pixels: starts at (x0, y0), moves at (vx, vy) px/frame bouncing off the frame
    borders; radius r0 x (1 + 0.08 sin(...)) breathes slowly.
    """

    def __init__(self, rng: np.random.Generator, shape: str, hue: float, x0: float, y0: float,
                 r0: float, size: tuple[int, int]):
        self.shape, self.x0, self.y0, self.r0, self.size = shape, x0, y0, r0, size
        rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.7, 1.0), rng.uniform(0.85, 1.0))
        self.colour = np.array(rgb, dtype=np.float32) * 255
        speed, angle = rng.uniform(0.012, 0.025) * max(size), rng.uniform(0, 2 * np.pi)
        self.vx, self.vy = speed * np.cos(angle), speed * np.sin(angle)
        self.stripe_angle, self.period = rng.uniform(0, np.pi), rng.uniform(4.0, 8.0)
        self.phase = rng.uniform(0, 2 * np.pi)

    def at(self, t: int) -> tuple[float, float, float]:
        """(cx, cy, r) in pixels at frame t."""
        r = self.r0 * (1 + 0.08 * np.sin(0.4 * t + self.phase))
        width, height = self.size
        margin = self.r0 * 1.08
        cx = _bounce(self.x0 + self.vx * t, margin, width - margin)
        cy = _bounce(self.y0 + self.vy * t, margin, height - margin)
        return cx, cy, r

    def render(self, t: int, grid: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(mask [H, W] bool, colours [H, W, 3] float32 0..255) at frame t; grid = (yy, xx)."""
        cx, cy, r = self.at(t)
        canvas = Image.new("L", self.size, 0)
        draw_shape(ImageDraw.Draw(canvas), self.shape, True, cx, cy, r, (255,), 1)  # type: ignore[arg-type]
        yy, xx = grid
        u = (xx - cx) * np.cos(self.stripe_angle) + (yy - cy) * np.sin(self.stripe_angle)
        shade = 0.75 + 0.25 * np.sin(2 * np.pi * u / self.period)
        return np.array(canvas) > 127, shade[..., None] * self.colour


def _davis_objects(rng: np.random.Generator, objects: int, width: int, height: int) -> list[_MovingShape]:
    """`objects` shapes with distinct shapes (cycling), hues and stripes; in frame 0 each sits in
    its own column (no overlap), so every object is visible in the first annotation."""
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    hue0, cell = rng.uniform(0, 1), width / objects
    radius = 0.38 * min(cell, height)
    out = []
    for k in range(objects):
        r0 = radius * rng.uniform(0.7, 1.0)
        x0 = (k + 0.5) * cell
        y0 = height / 2 + rng.uniform(-1, 1) * max(height / 2 - 1.1 * r0, 0)
        out.append(_MovingShape(rng, shapes[k % len(shapes)], hue0 + k / objects, x0, y0, r0,
                                (width, height)))
    return out


def _write_sequence(root: Path, name: str, rng: np.random.Generator, frames: int, width: int,
                    height: int, objects: int) -> None:
    """Frames JPEGImages/480p/<name>/<t:05d>.jpg and masks Annotations/480p/<name>/<t:05d>.png.

    Objects are painted in id order (higher ids occlude lower ones); mask value = object id.
    """
    background = scenes.texture(rng, width, height, low=30, high=150).astype(np.float32)  # static
    shapes = _davis_objects(rng, objects, width, height)
    grid = np.mgrid[0:height, 0:width].astype(np.float32)
    for t in range(frames):
        image, mask = background.copy(), np.zeros((height, width), np.uint8)
        for k, shape in enumerate(shapes, start=1):
            inside, colours = shape.render(t, (grid[0], grid[1]))
            image[inside], mask[inside] = colours[inside], k
        frame = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
        _save_jpeg(frame, root / JPEGS / name / f"{t:05d}.jpg")
        write_indexed_png(mask, root / ANNOTATIONS / name / f"{t:05d}.png")


def make_davis(out: Path, sequences: int = 2, frames: int = 12, height: int = 96, width: int = 160,
               objects: int = 2, seed: int = 0) -> Path:
    """Write a DAVIS-2017-layout video set of moving shapes; returns out.

    Layout: out/JPEGImages/480p/shapes-<s:02d>/<t:05d>.jpg (RGB [height x width]),
    out/Annotations/480p/shapes-<s:02d>/<t:05d>.png (palette PNG, DAVIS palette: 0 background,
    1..objects object ids, no void), out/ImageSets/2017/val.txt and train.txt, each listing every
    sequence, one per line (label propagation trains nothing on DAVIS, so both splits are the
    whole set). Each object keeps its shape, colour and stripe texture; it moves 1.2-2.5 % of the
    long side per frame, so patch-similarity propagation can track it. frames >= 3 (the scorer
    leaves out the first and last), 1 <= objects <= 10, and each column of width / objects holds
    one object in frame 0.
    """
    _check_int("sequences", sequences, 1, 100)
    _check_int("frames", frames, 3, 100000)
    _check_int("height", height, 32)
    _check_int("width", width, 32)
    _check_int("objects", objects, 1, DAVIS_MAX_OBJECTS)
    _check_int("seed", seed, -(2**63))
    if width / objects < 16:
        raise UsageError(f"width {width} is too small for {objects} objects (needs >= {16 * objects})")
    names = [f"shapes-{s:02d}" for s in range(sequences)]
    with _staged(out) as tmp:
        for s, name in enumerate(names):
            _write_sequence(tmp, name, _rng(seed, _STREAM["davis"], s), frames, width, height, objects)
        (tmp / IMAGESETS).mkdir(parents=True)
        for split in ("train", "val"):
            (tmp / IMAGESETS / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return Path(out)


# --------------------------------------------------------------------------- revisited Oxford / Paris


def _retrieval_names(dataset: str, landmarks: int, db_per_landmark: int, queries: int,
                     distractors: int) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(db names per landmark, query names per landmark, distractor names), revisitop-like:
    roxford5k "landmark03_000005" / "oxford_000007", rparis6k "paris_landmark03_000005" /
    "paris_general_000007"; a landmark's queries continue its numbering after its db views."""
    prefix = "" if dataset == "roxford5k" else "paris_"
    stems = [f"{prefix}landmark{l:02d}" for l in range(landmarks)]
    db = [[f"{stem}_{i:06d}" for i in range(db_per_landmark)] for stem in stems]
    qs = [[f"{stem}_{db_per_landmark + j:06d}" for j in range(queries)] for stem in stems]
    other = "oxford" if dataset == "roxford5k" else "paris_general"
    return db, qs, [f"{other}_{i:06d}" for i in range(distractors)]


def difficulty_kinds(db_per_landmark: int) -> list[str]:
    """Kinds of a landmark's db views before shuffling: n // 4 junk, half the rest hard
    (rounded down), the others easy (so at least one easy view)."""
    junk = db_per_landmark // 4
    hard = (db_per_landmark - junk) // 2
    return ["easy"] * (db_per_landmark - junk - hard) + ["hard"] * hard + ["junk"] * junk


def _write_landmark(jpg: Path, imlist: list[str], db_names: list[str], query_names: list[str],
                    rng: np.random.Generator, size: int) -> list[dict]:
    """Write one landmark's db views and queries; return its queries' gnd entries."""
    world = scenes.Scene(rng, size)
    kinds = [str(k) for k in rng.permutation(difficulty_kinds(len(db_names)))]
    index = {name: i for i, name in enumerate(imlist)}
    by_kind: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
    for name, kind in zip(db_names, kinds):
        _save_jpeg(world.view(rng, kind), jpg / f"{name}.jpg")
        by_kind[kind].append(index[name])
    entries = []
    for name in query_names:
        image, bbx = world.query(rng)
        _save_jpeg(image, jpg / f"{name}.jpg")
        entries.append({"bbx": bbx, **{k: sorted(v) for k, v in by_kind.items()}})
    return entries


def make_retrieval(out: Path, dataset: str = "roxford5k", db_per_landmark: int = 8,
                   landmarks: int = 4, distractors: int = 10, queries_per_landmark: int = 2,
                   size: int = 96, seed: int = 0) -> Path:
    """Write a revisitop-layout retrieval set of shape scenes; returns out (the ROOT).

    Layout: out/<dataset>/jpg/<name>.jpg (RGB, height size, width round(4/3 size)) and
    out/<dataset>/gnd_<dataset>.pkl = pickle (protocol 2, plain data only) of {"imlist": db names (sorted), "qimlist": query names,
    "gnd": per query {"bbx": [x1, y1, x2, y2] zero-based float pixels of the landmark inside the
    query, "easy", "hard", "junk": sorted lists of indices into imlist}}. A landmark is a
    composite scene of shapes (sslcli.data.scenes); its db views are easy (mild crop / scale /
    colour jitter), hard (strong zoom in or out, strong jitter) or junk (mostly occluded);
    distractors are views of unrelated scenes; a query is a near-reference view pasted in
    clutter, bbx = the pasted rectangle. Counts per landmark: see difficulty_kinds.
    """
    if dataset not in RETRIEVAL_DATASETS:
        near = hint(dataset, RETRIEVAL_DATASETS) or f" (expected one of: {', '.join(RETRIEVAL_DATASETS)})"
        raise UsageError(f"unknown retrieval dataset {dataset!r}{near}")
    _check_int("db_per_landmark", db_per_landmark, 1)
    _check_int("landmarks", landmarks, 1)
    _check_int("distractors", distractors, 0)
    _check_int("queries_per_landmark", queries_per_landmark, 1)
    _check_int("size", size, 32)
    _check_int("seed", seed, -(2**63))
    db, queries, others = _retrieval_names(dataset, landmarks, db_per_landmark,
                                           queries_per_landmark, distractors)
    imlist = sorted([n for names in db for n in names] + others)
    stream = (_STREAM["retrieval"], RETRIEVAL_DATASETS.index(dataset))
    with _staged(out) as tmp:
        jpg = tmp / dataset / "jpg"
        gnd: list[dict] = []
        for l in range(landmarks):
            gnd += _write_landmark(jpg, imlist, db[l], queries[l], _rng(seed, *stream, 0, l), size)
        for i, name in enumerate(others):
            rng = _rng(seed, *stream, 1, i)
            _save_jpeg(scenes.Scene(rng, size).view(rng, "easy"), jpg / f"{name}.jpg")
        data = {"imlist": imlist, "qimlist": [q for names in queries for q in names], "gnd": gnd}
        (tmp / dataset / f"gnd_{dataset}.pkl").write_bytes(pickle.dumps(data, protocol=2))
    return Path(out)


GENERATORS: dict[str, Callable[..., Path]] = {
    "shapes": make_shapes_folder,
    "fewshot": make_fewshot_folder,
    "davis": make_davis,
    "retrieval": make_retrieval,
}
