"""A dataset with planted faults (`ssl data make audit`): ground truth for measuring a dataset audit.

`make_audit_folder` writes builtin:shapes train and val, each image's shape over a dark random
texture of its own (`on_texture`), as ImageFolders plus three kinds of known faults, listed in `faults.json`, so that an audit (near duplicates, label errors, val/train
leakage) can be scored for precision and recall:

- duplicates: a perturbed copy of a train image in the SAME class folder ("dup-<i>.png");
- label flips: a train image saved, unperturbed, in a random WRONG class folder (same name);
- leaked: a perturbed copy of a train image in the val folder of its class ("leak-<i>.png").

The three source sets are disjoint, and no source of a duplicate or a leak is flipped, so each
planted image is exactly one fault. The perturbation (`perturb`) is a 97-99 % crop resized back
to full size plus a 2-5 % brightness and a 2-5 % contrast change: near, never identical.
Random streams come from (seed, _STREAM, kind, train index), so a fault's copy does not depend on
how many other faults are planted; which images are planted depends on (seed, n_train) only
(the first D, F, L of one permutation). Writing goes through generators._staged (atomic).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sslcli.data.builtin import SHAPE_CLASSES, make_shapes
from sslcli.data.generators import _check_int, _rng, _staged
from sslcli.data.scenes import texture
from sslcli.errors import UsageError

FAULTS_FILE = "faults.json"
CROP_RANGE = (0.97, 0.99)  # side of the kept crop, fraction of the image side
JITTER_RANGE = (0.02, 0.05)  # |factor - 1| of the brightness and of the contrast change
_STREAM = 40  # SeedSequence tag; generators._STREAM uses 10, 20, 30
_PICK, _DUP, _FLIP, _LEAK, _BACKGROUND = range(5)  # sub-streams
BACKGROUND = (0, 140)  # texture grey levels: darker than the shapes (value >= 0.8), which stay in front


def on_texture(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The shape of a builtin:shapes image (bright, on black) over a dark random texture of its
    own: every image becomes distinct (in builtin:shapes many images are near-identical: same
    shape, colour and place), so that a planted copy is the only near-duplicate of its source.
    Blend weight of the shape: its brightest channel / 64, clipped to [0, 1] (soft edges kept)."""
    shape = np.asarray(image, dtype=np.float32)
    alpha = np.clip(shape.max(axis=2, keepdims=True) / 64, 0, 1)
    ground = texture(rng, image.width, image.height, *BACKGROUND).astype(np.float32)
    return Image.fromarray((alpha * shape + (1 - alpha) * ground).round().astype(np.uint8), "RGB")


def perturb(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A near duplicate of an RGB image [S x S]: random crop of side CROP_RANGE x S resized back
    to S (bicubic), then contrast c and brightness b (each 1 +- JITTER_RANGE, random sign):
    pixel' = clip(b * (mean + c * (pixel - mean))), mean over the whole image; uint8 RGB [S x S]."""
    width, height = image.size
    side = rng.uniform(*CROP_RANGE)
    w, h = max(1, round(side * width)), max(1, round(side * height))
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = image.crop((x0, y0, x0 + w, y0 + h)).resize((width, height), Image.Resampling.BICUBIC)
    contrast, brightness = (1 + rng.choice([-1, 1]) * rng.uniform(*JITTER_RANGE) for _ in range(2))
    pixels = np.asarray(crop, dtype=np.float32)
    mean = pixels.mean()
    out = brightness * (mean + contrast * (pixels - mean))
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8), "RGB")


def _check_args(n_train: int, n_val: int, duplicates: int, flips: int, leaked: int, size: int,
                seed: int) -> None:
    """UsageError for a bad count, size or seed, or more faults than train images to plant them on."""
    _check_int("n_train", n_train, 1)
    _check_int("n_val", n_val, 0)
    for name, value in (("duplicates", duplicates), ("flips", flips), ("leaked", leaked)):
        _check_int(name, value, 0)
    _check_int("size", size, 8)
    _check_int("seed", seed, -(2**63))
    if duplicates + flips + leaked > n_train:
        raise UsageError(f"duplicates + flips + leaked = {duplicates + flips + leaked} planted faults need "
                         f"as many distinct train images, but n_train is {n_train}")


def _pick_sources(n_train: int, duplicates: int, flips: int, leaked: int,
                  seed: int) -> tuple[list[int], list[int], list[int]]:
    """Disjoint train indices (duplicate sources, flipped, leak sources), each sorted ascending."""
    order = _rng(seed, _STREAM, _PICK).permutation(n_train)
    cuts = np.cumsum([duplicates, flips, leaked])
    dup, flip, leak = np.split(order[:cuts[-1]], cuts[:2])
    return sorted(dup.tolist()), sorted(flip.tolist()), sorted(leak.tolist())


def _wrong_class(label: int, seed: int, index: int) -> int:
    """A class id != label, uniform over the others, drawn from train image `index`'s stream."""
    k = int(_rng(seed, _STREAM, _FLIP, index).integers(0, len(SHAPE_CLASSES) - 1))
    return k + (k >= label)  # skip the true class


def _write_split(root: Path, split: str, images: list[Image.Image], labels: list[int],
                 folders: dict[int, int]) -> None:
    """root/<split>/<class>/<i:06d>.png for every image (all 10 class folders created); image i
    goes to class folders.get(i, labels[i]) (a flip overrides the true class)."""
    for name in SHAPE_CLASSES:
        (root / split / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        image.save(root / split / SHAPE_CLASSES[folders.get(i, label)] / f"{i:06d}.png", format="PNG")


def _train_path(i: int, label: int, prefix: str = "") -> str:
    """Path of train image i (or of its copy, with prefix) relative to the dataset root."""
    return f"train/{SHAPE_CLASSES[label]}/{prefix}{i:06d}.png"


def make_audit_folder(out: Path | str, n_train: int = 2000, n_val: int = 500, duplicates: int = 40,
                      flips: int = 40, leaked: int = 20, size: int = 64, seed: int = 0) -> Path:
    """Write builtin:shapes train / val ImageFolders with planted faults, and their ground truth.

    Layout (PNG, RGB [size x size]; i = index in make_shapes("train"), j in make_shapes("val")):
    out/train/<class>/<i:06d>.png (n_train images; a flipped one sits in a wrong class folder),
    out/train/<class>/dup-<i:06d>.png (perturbed copy of train i, same class folder),
    out/val/<class>/<j:06d>.png (n_val images), out/val/<class>/leak-<i:06d>.png (perturbed copy of
    train i, its true class folder), out/faults.json = {"duplicates": [[source, copy], ...],
    "label_flips": [{"path", "true_class", "folder_class"}, ...], "leaked": [[val copy, train
    source], ...], "counts": {...}, "seed": seed}, paths relative to out, lists in train index
    order. Deterministic given the arguments; returns out.
    """
    _check_args(n_train, n_val, duplicates, flips, leaked, size, seed)
    train, train_labels, _ = make_shapes("train", n_train, size, seed)
    val, val_labels, _ = make_shapes("val", n_val, size, seed)
    train = [on_texture(im, _rng(seed, _STREAM, _BACKGROUND, 0, i)) for i, im in enumerate(train)]
    val = [on_texture(im, _rng(seed, _STREAM, _BACKGROUND, 1, j)) for j, im in enumerate(val)]
    dup_src, flip_src, leak_src = _pick_sources(n_train, duplicates, flips, leaked, seed)
    folders = {i: _wrong_class(train_labels[i], seed, i) for i in flip_src}
    faults: dict = {"duplicates": [], "label_flips": [], "leaked": []}
    with _staged(out) as tmp:
        _write_split(tmp, "train", train, train_labels, folders)
        _write_split(tmp, "val", val, val_labels, {})
        for i in dup_src:
            copy = _train_path(i, train_labels[i], "dup-")
            perturb(train[i], _rng(seed, _STREAM, _DUP, i)).save(tmp / copy, format="PNG")
            faults["duplicates"].append([_train_path(i, train_labels[i]), copy])
        for i in flip_src:
            faults["label_flips"].append({"path": _train_path(i, folders[i]),
                                          "true_class": SHAPE_CLASSES[train_labels[i]],
                                          "folder_class": SHAPE_CLASSES[folders[i]]})
        for i in leak_src:
            copy = f"val/{SHAPE_CLASSES[train_labels[i]]}/leak-{i:06d}.png"
            perturb(train[i], _rng(seed, _STREAM, _LEAK, i)).save(tmp / copy, format="PNG")
            faults["leaked"].append([copy, _train_path(i, train_labels[i])])
        faults["counts"] = {"train_images": n_train + duplicates, "val_images": n_val + leaked,
                            "classes": len(SHAPE_CLASSES), "duplicates": duplicates,
                            "label_flips": flips, "leaked": leaked}
        faults["seed"] = int(seed)
        (tmp / FAULTS_FILE).write_text(json.dumps(faults, indent=2) + "\n")
    return Path(out)
