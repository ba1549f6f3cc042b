"""Built-in procedural datasets (no download): `builtin:shapes`.

`builtin:shapes` has 10 classes = 5 shapes (circle, cross, square, star, triangle) x {filled,
outline}. Each image is one bright, randomly coloured shape of random size and position on a
uniform dark background; no rotation, no clutter, so that a tiny model learns it in minutes
(harder nuisances left a tiny model at chance). Generation is deterministic given (split, n, size, seed).
"""

from __future__ import annotations

import colorsys
import logging
import math

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ("circle", "cross", "square", "star", "triangle")
STYLES = ("filled", "outline")
SHAPE_CLASSES = sorted(f"{shape}_{style}" for shape in SHAPES for style in STYLES)
SPLITS = {"train": (0, 2000), "val": (1, 500)}  # split -> (seed stream, default size)

_SUPERSAMPLE = 2  # draw at 2x and downsample (box filter) for smooth edges
# Large shapes on black: with small shapes on random dark backgrounds, colour and background are
# the easiest cues and a few hundred DINO steps never get to shape (k-NN of the demo stalls).
_RADIUS_RANGE = (0.35, 0.48)  # radius of the shape's bounding circle, fraction of the image side
_BACKGROUND_MAX = 0  # background channels uniform in [0, _BACKGROUND_MAX]: black


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Five-pointed star, one point up, inner radius 0.45 r."""
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Plus sign with arms of half-width 0.32 r reaching r from the centre (12 vertices)."""
    a, b = 0.32 * r, 0.9 * r
    unit = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
            (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    return [(cx + x, cy + y) for x, y in unit]


def _triangle(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Equilateral triangle pointing up, inscribed in the circle of radius r (shifted down 0.15 r
    so that it looks centred)."""
    cy += 0.15 * r
    return [(cx + r * math.cos(a), cy + r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, filled: bool, cx: float, cy: float,
                r: float, colour: tuple[int, int, int], width: int) -> None:
    """Draw one shape (coordinates in pixels of the drawing canvas)."""
    fill, outline = (colour, None) if filled else (None, colour)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif shape == "square":
        h = 0.8 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill, outline=outline, width=width)
    else:
        points = {"star": _star, "cross": _cross, "triangle": _triangle}[shape](cx, cy, r)
        draw.polygon(points, fill=fill, outline=outline, width=width)


def bright_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated, bright RGB colour (HSV: any hue, saturation 0.6-1, value 0.8-1)."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def render_shape(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB image [size x size] of class `label` (index into SHAPE_CLASSES)."""
    shape, style = SHAPE_CLASSES[label].split("_")
    background = tuple(int(c) for c in rng.integers(0, _BACKGROUND_MAX + 1, size=3))
    colour = bright_colour(rng)
    r = rng.uniform(*_RADIUS_RANGE) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), background)
    width = max(2, round(0.14 * r * k))
    draw_shape(ImageDraw.Draw(canvas), shape, style == "filled", cx * k, cy * k, r * k, colour, width)
    return canvas.reduce(k) if k > 1 else canvas


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels, each class n // num_classes times (the first n % num_classes once more), shuffled."""
    labels = np.arange(n, dtype=np.int64) % num_classes
    rng.shuffle(labels)
    return labels


def make_shapes(split: str = "train", n: int | None = None, size: int = 64,
                seed: int = 0) -> tuple[list[Image.Image], list[int], list[str]]:
    """Generate the `builtin:shapes` split.

    Args:
        split: "train" (default 2000 images) or "val" (default 500); the two splits draw from
            different random streams derived from `seed`, so they never share images.
        n: number of images (default per split); classes are balanced (counts differ by <= 1).
        size: image side in pixels.
        seed: base seed; same arguments -> identical images.

    Returns:
        (images, labels, classes): RGB PIL images [size x size], int labels in [0, 10), and the
        10 sorted class names ("circle_filled", "circle_outline", "cross_filled", ...).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (expected one of: {', '.join(SPLITS)})")
    stream, default_n = SPLITS[split]
    n = default_n if n is None else n
    if n < 0 or size < 8:
        raise ValueError(f"make_shapes needs n >= 0 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**63, stream]))
    labels = balanced_labels(n, len(SHAPE_CLASSES), rng)
    images = [render_shape(int(label), rng, size) for label in labels]
    logger.debug("generated builtin:shapes %s: %d images of %d px", split, n, size)
    return images, [int(x) for x in labels], list(SHAPE_CLASSES)
