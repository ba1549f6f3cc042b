"""Image transforms: DINO's multi-crop augmentation and the evaluation transform.

DINO's multi-crop recipe (docs/methods.md, "Multi-crop augmentation"). Randomness comes only
from Python's `random` (blur, solarize) and torch's global CPU generator (crop, flip, jitter,
grayscale: torchvision's draws, which the device path's GeometryView makes with the same calls in
the same order), so seeding both before a call reproduces its crops exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping

from sslcli.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig

BICUBIC = InterpolationMode.BICUBIC
INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


class GaussianBlur:
    """PIL Gaussian blur with probability `p`, radius uniform in [radius_min, radius_max] px.

    Always draws one `random.random()` (then one `random.uniform` when applied), as DINO does.
    """

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        radius = random.uniform(self.radius_min, self.radius_max)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"GaussianBlur(p={self.p}, radius=[{self.radius_min}, {self.radius_max}])"


class Solarize:
    """PIL solarize (invert pixels >= `threshold`) with probability `p`."""

    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return ImageOps.solarize(img, threshold=self.threshold)
        return img

    def __repr__(self) -> str:
        return f"Solarize(p={self.p}, threshold={self.threshold})"


def _colour_block(cfg: DataConfig) -> T.Compose:
    """Flip p=0.5, colour jitter cfg.color_jitter (DINO: 0.4, 0.4, 0.2, 0.1) with
    p=color_jitter_prob, grayscale p=grayscale_prob."""
    brightness, contrast, saturation, hue = cfg.color_jitter
    return T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)],
                      p=cfg.color_jitter_prob),
        T.RandomGrayscale(p=cfg.grayscale_prob),
    ])


def _normalize(mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL -> float tensor [3, H, W] in [0, 1] -> (x - mean) / std."""
    return T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


class MultiCropTransform:
    """PIL image -> list of crops: 2 global [3, G, G] then `local_crops` local [3, L, L] tensors.

    G = cfg.global_crop_size, L = cfg.local_crop_size (pixels); values normalised with
    cfg.mean / cfg.std. Global view 1: RRC -> colour block -> blur (p = blur_probs[0]);
    global view 2: RRC -> colour block -> blur (blur_probs[1]) -> solarize (solarize_prob);
    local views: RRC(local scale) -> colour block -> blur (blur_probs[2]). RRC interpolation is
    cfg.interpolation (DINO: bicubic; SimSiam / MoCo-v2: bilinear).
    """

    def __init__(self, cfg: DataConfig):
        if cfg.global_crops != 2:
            raise ValueError(f"MultiCropTransform makes exactly 2 global crops, got {cfg.global_crops}")
        colour, normalize = _colour_block(cfg), _normalize(cfg.mean, cfg.std)
        p1, p2, p_local = cfg.blur_probs

        def rrc(size: int, scale: tuple[float, float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=tuple(scale), interpolation=INTERPOLATION[cfg.interpolation])

        self.global1 = T.Compose([rrc(cfg.global_crop_size, cfg.global_crops_scale), colour,
                                  GaussianBlur(p1), normalize])
        self.global2 = T.Compose([rrc(cfg.global_crop_size, cfg.global_crops_scale), colour,
                                  GaussianBlur(p2), Solarize(cfg.solarize_prob), normalize])
        self.local = T.Compose([rrc(cfg.local_crop_size, cfg.local_crops_scale), colour,
                                GaussianBlur(p_local), normalize])
        self.local_crops = cfg.local_crops

    def __call__(self, img: Image.Image, second: Image.Image | None = None) -> list[torch.Tensor]:
        """Crops of `img`; global view 2 is cropped from `second` when given (neighbour
        bootstrapping: x_{j*}). The random draws are the same either way."""
        crops = [self.global1(img), self.global2(img if second is None else second)]
        crops.extend(self.local(img) for _ in range(self.local_crops))
        return crops

    def __repr__(self) -> str:
        return (f"MultiCropTransform(global1={self.global1}, global2={self.global2}, "
                f"local={self.local_crops} x {self.local})")


Box = tuple[int, int, int, int]  # (top, left, height, width) of a crop, in pixels of the source image
ViewDraw = tuple[Box, bool, dict]  # (crop box, horizontal flip, photometric parameters) of one view


def float32(p: float) -> float:
    """p rounded to float32: torch compares `torch.rand(1) < p` in float32, so comparing the drawn
    float against this value (exactly representable in a double) decides exactly as torch does."""
    return torch.tensor(p, dtype=torch.float32).item()


class TorchDraws:
    """Single draws from torch's global CPU generator through reused one-element tensors.

    `uniform(a, b)` is `torch.empty(1).uniform_(a, b).item()` (and `torch.rand(1)` for 0, 1),
    `randint(n)` is `torch.randint(0, n, (1,)).item()`: the same kernels on the same generator, so
    the same values and the same generator state after, without allocating a tensor per draw
    (a randint costs 1.7 us instead of 6). One per view transform; not shared between threads.
    """

    def __init__(self):
        self._float, self._long = torch.empty(1), torch.empty(1, dtype=torch.long)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return self._float.uniform_(low, high).item()

    def exp_uniform(self, low: float, high: float) -> float:
        """exp of a float32 uniform draw, in float32 (torch.exp(torch.empty(1).uniform_(low, high)))."""
        return self._float.uniform_(low, high).exp_().item()

    def randint(self, high: int) -> int:
        return self._long.random_(0, high).item()


class CropBoxSampler:
    """torchvision's RandomResizedCrop.get_params(img, scale, ratio) for a width x height image.

    `sampler(width, height)` -> (top, left, h, w) with the same draws from the global generator in
    the same order (so the same box under the same seed, and the same generator state after),
    without get_params' per-call overhead (a dimension query, the log of the ratio bounds, a
    tensor per draw): ~5x faster (26 vs 145 us per box), and drawing was most of a loader
    worker's time on small crops.
    """

    def __init__(self, scale: Sequence[float], ratio: Sequence[float], draws: TorchDraws | None = None):
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.log_ratio = tuple(torch.log(torch.tensor(self.ratio)).tolist())  # float32, as get_params
        self.draws = draws or TorchDraws()

    def __call__(self, width: int, height: int) -> Box:
        area, draws = height * width, self.draws
        (s0, s1), (r0, r1) = self.scale, self.log_ratio
        for _ in range(10):
            target_area = area * draws.uniform(s0, s1)
            aspect_ratio = draws.exp_uniform(r0, r1)
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = draws.randint(height - h + 1)
                return top, draws.randint(width - w + 1), h, w
        w, h = width, height  # 10 misses: the central crop at the nearest allowed ratio (no draw)
        if width / height < min(self.ratio):
            h = int(round(w / min(self.ratio)))
        elif width / height > max(self.ratio):
            w = int(round(h * max(self.ratio)))
        return (height - h) // 2, (width - w) // 2, h, w


class GeometryView:
    """The worker half of one view on the device path: draw the view's crop box, flip and photometric
    parameters (`draw`), then crop + resize + flip the PIL image (`apply`) -> (uint8 [3, S, S], params).

    The random draws are made in the order and with the generators of the reference chain
    (RRC, flip, RandomApply + ColorJitter.get_params, RandomGrayscale: torch; blur, solarize:
    Python's `random`), so under the same seed both paths crop identically and draw the same
    colour parameters; only where the colour work runs differs (tests/test_geometry_draws.py:
    the same boxes, coins and pixels as torchvision's calls, without their per-call overhead,
    which was most of a worker's time on small crops). `draw` needs only the image size,
    which is what lets `data.decode_on: device` (sslcli.data.decode) make exactly these draws
    from a JPEG header and crop on the device. `solarize_p` None: no solarize step in this view
    (the reference chain then draws nothing for it).
    """

    def __init__(self, cfg: DataConfig, size: int, scale: tuple[float, float], blur_p: float,
                 solarize_p: float | None = None):
        rrc = T.RandomResizedCrop(size, scale=tuple(scale))  # read for its scale and default ratio bounds
        self.draws = TorchDraws()
        self.crop_box = CropBoxSampler(rrc.scale, rrc.ratio, self.draws)
        self.size = size
        self.resample = pil_modes_mapping[INTERPOLATION[cfg.interpolation]]  # the PIL filter torchvision resizes with
        jitter = T.ColorJitter(*cfg.color_jitter)
        self.jitter_ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        # torch decides `torch.rand(1) < p` in float32: the same test on the drawn float needs p as float32
        self.jitter_p, self.gray_p = float32(cfg.color_jitter_prob), float32(cfg.grayscale_prob)
        self.blur_p, self.solarize_p = blur_p, solarize_p

    def draw(self, width: int, height: int) -> ViewDraw:
        """All random draws of the view for a width x height source image, in the reference order:
        RandomHorizontalFlip, RandomApply (`p < torch.rand(1)`: skip), ColorJitter.get_params (a
        permutation of the four ops, then each factor), RandomGrayscale, blur, solarize."""
        box, draws = self.crop_box(width, height), self.draws
        flip = draws.uniform() < 0.5
        params = {"order": [0, 1, 2, 3], "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
        if not self.jitter_p < draws.uniform():
            params["order"] = torch.randperm(4).tolist()
            for name, bounds in zip(("brightness", "contrast", "saturation", "hue"), self.jitter_ranges):
                if bounds is not None:
                    params[name] = draws.uniform(bounds[0], bounds[1])
        params["grayscale"] = draws.uniform() < self.gray_p
        params["blur_sigma"] = random.uniform(0.1, 2.0) if random.random() < self.blur_p else 0.0
        params["solarize"] = self.solarize_p is not None and random.random() < self.solarize_p
        return box, flip, params

    def apply(self, img: Image.Image, box: Box, flip: bool) -> torch.Tensor:
        """PIL crop `box` resized to S x S, flipped -> uint8 [3, S, S]: the PIL calls of torchvision's
        resized_crop + hflip (the reference path's), called directly, without their per-call checks."""
        top, left, h, w = box
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.resample)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)  # datasets load RGB
        return pixels.view(self.size, self.size, 3).permute(2, 0, 1)  # (3, S, S), a view of (S, S, 3)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, dict]:
        box, flip, params = self.draw(*img.size)
        return self.apply(img, box, flip), params


class MultiCropGeometry:
    """`data.augment_on: device`: the worker half of MultiCropTransform (same views, same draws).

    PIL image -> (uint8 crops [3, S, S] per view, photometric parameter dict per view); the colour
    chain then runs batched on the training device (sslcli.data.photometric.apply_photometric).
    `draw` alone makes every view's draws from the image sizes (`data.decode_on: device`).
    """

    def __init__(self, cfg: DataConfig):
        p1, p2, p_local = cfg.blur_probs
        self.global1 = GeometryView(cfg, cfg.global_crop_size, cfg.global_crops_scale, p1)
        self.global2 = GeometryView(cfg, cfg.global_crop_size, cfg.global_crops_scale, p2, cfg.solarize_prob)
        self.local = GeometryView(cfg, cfg.local_crop_size, cfg.local_crops_scale, p_local)
        self.local_crops = cfg.local_crops

    @property
    def views(self) -> list[GeometryView]:
        """The view transforms in view order: global 1, global 2, then the local ones."""
        return [self.global1, self.global2] + [self.local] * self.local_crops

    def draw(self, size: tuple[int, int], second: tuple[int, int] | None = None) -> list[ViewDraw]:
        """Per view (box, flip, params) for an image of `size` = (width, height); global view 2 is
        drawn on the `second` image's size when given (neighbour bootstrapping)."""
        sizes = [size, size if second is None else second] + [size] * self.local_crops
        return [view.draw(*s) for view, s in zip(self.views, sizes)]

    def __call__(self, img: Image.Image, second: Image.Image | None = None) -> tuple[list[torch.Tensor], list[dict]]:
        sources = [img, img if second is None else second] + [img] * self.local_crops
        draws = self.draw(img.size, None if second is None else second.size)
        crops = [view.apply(src, box, flip) for view, src, (box, flip, _) in zip(self.views, sources, draws)]
        return crops, [params for _, _, params in draws]


def train_transform(cfg: DataConfig) -> MultiCropTransform | MultiCropGeometry:
    """The worker transform of `data.augment_on`: `worker` (the whole PIL chain, the reference)
    or `device` (crop + flip + parameter draws; colour on the training device)."""
    return MultiCropGeometry(cfg) if cfg.augment_on == "device" else MultiCropTransform(cfg)


def eval_transform(crop_size: int, resize_size: int | None = None,
                   mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Deterministic eval transform: PIL -> normalised tensor [3, crop_size, crop_size].

    Resize the shorter side to `resize_size` px (default round(crop_size * 256 / 224)), bicubic,
    then center-crop `crop_size` px, ToTensor, Normalize(mean, std).
    """
    if resize_size is None:
        resize_size = round(crop_size * 256 / 224)
    return T.Compose([T.Resize(resize_size, interpolation=BICUBIC), T.CenterCrop(crop_size),
                      _normalize(mean, std)])
