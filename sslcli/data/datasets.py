"""Datasets of raw images with stable global ids (id = position in the dataset's order).

A dataset spec is either a folder path (ImageFolder layout or an unlabeled folder of images, see
sslcli.data.folder) or a built-in name: `builtin:shapes` (= `builtin:shapes:train`),
`builtin:shapes:train`, `builtin:shapes:val`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from sslcli.data.builtin import SPLITS, make_shapes
from sslcli.data.decode import Source, read_source, to_rgb
from sslcli.data.folder import scan_image_folder
from sslcli.errors import DataError, hint

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_SPECS = ("builtin:shapes", "builtin:shapes:train", "builtin:shapes:val")


class ImageDataset(Dataset):
    """Raw RGB images with global ids 0..N-1, labels and class names.

    Attributes:
        name: the spec it was opened from (folder path or builtin name).
        root: the folder (None for built-in data, whose images live in memory).
        paths: per image, its path relative to root (built-in: "builtin:shapes:train/000123").
        labels: int64 [N], class id, -1 for unlabeled images.
        classes: class names; class id = position ([] when unlabeled).
    """

    def __init__(self, name: str, paths: list[str], labels: np.ndarray, classes: list[str],
                 root: Path | None = None, images: Sequence[Image.Image] | None = None):
        if (root is None) == (images is None):
            raise ValueError("ImageDataset needs exactly one of root (files) or images (memory)")
        if len(paths) != len(labels) or (images is not None and len(images) != len(paths)):
            raise ValueError("ImageDataset: paths, labels (and images) must have the same length")
        self.name = name
        self.root = root
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self._images = images

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabeled folder)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        """Image `i` as an RGB PIL image (its native size), decoded as torchvision's ImageFolder
        loader does (PIL open + convert("RGB")): palette images through their palette, alpha
        dropped (not composited), CMYK converted by PIL, and the EXIF orientation NOT applied (the
        stored size and pixel order, as the reference code sees them). One deviation: 16-bit
        greyscale is scaled to 8 bits (value >> 8, `to_rgb`) where convert() clips it to white.

        Raises OSError / PIL errors on a corrupt, truncated, unreadable or missing file and
        DecompressionBombError on a header claiming over 2 x Image.MAX_IMAGE_PIXELS pixels, before
        any pixel is allocated (the caller decides: TrainSet skips and counts, evals refuse).
        In-memory (built-in) images are returned as-is: do not modify them in place.
        """
        if self._images is not None:
            return self._images[i]
        path = self.root / self.paths[i]  # type: ignore[operator]
        with open(path, "rb") as f:
            return to_rgb(Image.open(f))  # to_rgb decodes fully, inside the `with`

    def load_source(self, i: int) -> Source:
        """Image `i` for `data.decode_on: device`: the file's JPEG bytes and header size when the
        device can decode them, else decoded here (uint8 [3, H, W]); see sslcli.data.decode.

        Raises like `load` on an unreadable file or header (a JPEG body is only checked on the device).
        """
        if self._images is not None:
            return Source.from_pil(self._images[i])
        return read_source(self.root / self.paths[i])  # type: ignore[operator]

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        """(RGB PIL image, label) of image `i`."""
        return self.load(i), int(self.labels[i])

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, images={len(self)}, classes={self.num_classes})"


@functools.lru_cache(maxsize=len(SPLITS))
def _shapes_split(split: str) -> tuple[list, list[int], list[str]]:
    """make_shapes(split), generated once per process: a run opens builtin:shapes for training and
    its train split again for the k-NN monitor (the PIL images are never modified in place)."""
    return make_shapes(split)


def _open_builtin(spec: str) -> ImageDataset:
    """`builtin:shapes[:train|:val]` -> an in-memory dataset (seed 0, 64 px)."""
    if spec not in BUILTIN_SPECS:
        near = hint(spec, BUILTIN_SPECS) or f" (available: {', '.join(BUILTIN_SPECS)})"
        raise DataError(f"unknown built-in dataset '{spec}'{near}")
    parts = spec.split(":")
    split = parts[2] if len(parts) > 2 else "train"
    images, labels, classes = _shapes_split(split)
    name = f"builtin:shapes:{split}"
    paths = [f"{name}/{i:06d}" for i in range(len(images))]
    return ImageDataset(name, paths, np.asarray(labels, dtype=np.int64), classes, images=images)


def open_dataset(spec: str, cache_dir: Path | None = None) -> ImageDataset:
    """Open a dataset from its spec (folder path or builtin name, see module doc).

    `cache_dir` keeps the folder index (see scan_image_folder). Raises DataError for an unknown
    built-in name (with the closest valid names) and for a missing, empty or unreadable folder.
    """
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        return _open_builtin(spec)
    if not Path(spec).expanduser().exists() and hint(spec, BUILTIN_SPECS):  # e.g. "builtins:shapes"
        raise DataError(f"dataset folder '{spec}' does not exist{hint(spec, BUILTIN_SPECS)}")
    index = scan_image_folder(Path(spec), cache_dir=cache_dir)
    return ImageDataset(spec, index.paths, index.labels, index.classes, root=index.root)
