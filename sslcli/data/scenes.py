"""Procedural textures and composite "landmark" scenes of shapes, for the built-in eval data.

Used by sslcli.data.generators: `texture` (backgrounds of DAVIS videos and scenes), `Scene`
(one landmark of the retrieval set: views of varying difficulty and queries in clutter).
All functions draw from the given numpy Generator only, so results are deterministic by seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sslcli.data.builtin import SHAPE_CLASSES, bright_colour, draw_shape

# kind -> (scale range of the crop relative to the reference view, max centre shift as a
# fraction of the reference view, colour jitter strength); "hard" picks zoom-in or zoom-out.
VIEWS = {
    "easy": ((0.85, 1.15), 0.06, 0.10),
    "hard": (((0.50, 0.65), (1.45, 1.70)), 0.10, 0.35),
    "junk": ((0.90, 1.20), 0.06, 0.10),
}
QUERY_VIEW = ((0.95, 1.05), 0.03, 0.05)


def texture(rng: np.random.Generator, width: int, height: int, low: float = 30,
            high: float = 150) -> np.ndarray:
    """Textured RGB background uint8 [height, width, 3].

    Smooth colour noise (a 3-5 x 5-7 grid of colours in [low, high], bicubic-upsampled) plus a
    mosaic of blocks (side min(H, W) / 12, >= 4 px) shifted by +-18 and pixel noise (std 5).
    """
    rows = int(rng.integers(3, 6))
    grid = rng.uniform(low, high, size=(rows, rows + 2, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.float32)
    block = max(4, min(width, height) // 12)
    cells = rng.uniform(-18, 18, size=(-(-height // block), -(-width // block), 1))
    mosaic = np.repeat(np.repeat(cells, block, axis=0), block, axis=1)[:height, :width]
    noise = rng.normal(0, 5, size=(height, width, 3))
    return np.clip(smooth + mosaic + noise, 0, 255).round().astype(np.uint8)


def draw_random_shapes(image: Image.Image, rng: np.random.Generator, count: int,
                       box: tuple[float, float, float, float], radius: tuple[float, float]) -> None:
    """Draw `count` random builtin shapes (any class, bright colour) in place.

    Centres uniform in box (x1, y1, x2, y2), radii uniform in `radius`, all in pixels.
    """
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        shape, style = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))].split("_")
        colour = bright_colour(rng)
        r = rng.uniform(*radius)
        cx, cy = rng.uniform(box[0], box[2]), rng.uniform(box[1], box[3])
        draw_shape(draw, shape, style == "filled", cx, cy, r, colour, max(2, round(0.14 * r)))


def clutter(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """RGB [height x width] of unrelated content: a texture and 3-6 random shapes."""
    image = Image.fromarray(texture(rng, width, height, 20, 200))
    side = min(width, height)
    draw_random_shapes(image, rng, int(rng.integers(3, 7)), (0, 0, width, height), (0.1 * side, 0.25 * side))
    return image


def colour_jitter(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """RGB image x global gain (1 +- s) x per-channel gain (1 +- s/2) + bias (+- 40 s), clipped."""
    a = np.asarray(image, np.float32)
    gain = 1 + rng.uniform(-strength, strength)
    channels = 1 + rng.uniform(-strength / 2, strength / 2, size=3)
    bias = rng.uniform(-40, 40) * strength
    return Image.fromarray(np.clip(a * gain * channels + bias, 0, 255).round().astype(np.uint8))


class Scene:
    """A landmark: a world image [4H x 4W] whose central [2H x 2W] box is the reference view.

    Views are [H x W] with H = size, W = round(4/3 size). The world holds a texture, 6-8
    shapes inside the reference box (the landmark) and 6 more anywhere (its surroundings).
    """

    def __init__(self, rng: np.random.Generator, size: int):
        self.height, self.width = size, round(size * 4 / 3)
        rw, rh = 2 * self.width, 2 * self.height  # reference box in world pixels
        self.world = Image.fromarray(texture(rng, 2 * rw, 2 * rh, 20, 170))
        radius = (0.08 * rh, 0.16 * rh)
        core = (rw * 0.6, rh * 0.6, rw * 1.4, rh * 1.4)  # inside the reference box
        draw_random_shapes(self.world, rng, int(rng.integers(6, 9)), core, radius)
        draw_random_shapes(self.world, rng, 6, (0, 0, 2 * rw, 2 * rh), radius)

    def _crop(self, rng: np.random.Generator, scale: float, shift: float,
              out_size: tuple[int, int]) -> Image.Image:
        """World box of scale x the reference view, centre shifted by <= shift x its size,
        resized (bilinear, antialiased) to out_size (width, height)."""
        rw, rh = 2 * self.width, 2 * self.height
        cx = rw + rng.uniform(-shift, shift) * rw
        cy = rh + rng.uniform(-shift, shift) * rh
        box = (cx - scale * rw / 2, cy - scale * rh / 2, cx + scale * rw / 2, cy + scale * rh / 2)
        return self.world.resize(out_size, Image.BILINEAR, box=box)

    def view(self, rng: np.random.Generator, kind: str) -> Image.Image:
        """A database view [H x W] of difficulty `kind` (easy | hard | junk, see VIEWS).

        junk = an easy-like view with a clutter rectangle covering 64-87 % of it.
        """
        scales, shift, strength = VIEWS[kind]
        if kind == "hard":
            scales = scales[int(rng.integers(2))]
        image = self._crop(rng, rng.uniform(*scales), shift, (self.width, self.height))
        image = colour_jitter(image, rng, strength)
        if kind == "junk":
            ow, oh = round(rng.uniform(0.8, 0.92) * self.width), round(rng.uniform(0.8, 0.95) * self.height)
            x, y = int(rng.integers(0, self.width - ow + 1)), int(rng.integers(0, self.height - oh + 1))
            image.paste(clutter(rng, ow, oh), (x, y))
        return image

    def query(self, rng: np.random.Generator) -> tuple[Image.Image, list[float]]:
        """(query image [H x W], bbx [x1, y1, x2, y2]): a near-reference view scaled to 60-80 %
        of the image, pasted at a random place in clutter; bbx = that rectangle (zero-based,
        x2 / y2 exclusive, floats)."""
        frac = rng.uniform(0.6, 0.8)
        bw, bh = round(frac * self.width), round(frac * self.height)
        scales, shift, strength = QUERY_VIEW
        inner = colour_jitter(self._crop(rng, rng.uniform(*scales), shift, (bw, bh)), rng, strength)
        image = clutter(rng, self.width, self.height)
        x1, y1 = int(rng.integers(0, self.width - bw + 1)), int(rng.integers(0, self.height - bh + 1))
        image.paste(inner, (x1, y1))
        return image, [float(x1), float(y1), float(x1 + bw), float(y1 + bh)]
