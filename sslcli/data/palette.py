"""Indexed (palette) PNG masks as DAVIS stores them: pixel value = object id, 0 background, 255 void.

The palette is the PASCAL VOC / DAVIS colour map, generated here (no download). Used by the
DAVIS generators (data layer), label propagation and the scorer (eval layer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sslcli.errors import DataError, UsageError



def davis_palette() -> list[int]:
    """768 ints [r0, g0, b0, r1, ...]: the PASCAL VOC / DAVIS colour map (bit interleaving)."""
    palette: list[int] = []
    for index in range(256):
        rgb = [0, 0, 0]
        code = index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
            code >>= 3
        palette.extend(rgb)
    return palette


def write_indexed_png(mask: np.ndarray, path: str | Path) -> None:
    """Write `mask` [H, W] (integer object ids 0..255) as a palette PNG; creates parent folders."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype.kind not in "uib":
        raise UsageError(f"mask for {path} must be a 2-D integer array, got {mask.dtype} {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise UsageError(f"mask for {path} has ids outside 0..255")
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    image.putpalette(davis_palette())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def read_mask(path: str | Path) -> np.ndarray:
    """Object ids [H, W] uint8 of a palette (or greyscale) PNG: 0 background, 255 void."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("P", "L"):
                raise DataError(f"{path}: expected an indexed (palette) PNG, got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"mask not found: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read mask {path}: {err}") from None
