"""Image transforms: DINO's multi-crop augmentation and the evaluation transform.

DINO's multi-crop recipe (docs/methods.md, "Multi-crop augmentation"). Randomness comes only
from Python's `random` (blur, solarize) and torch's global CPU generator (crop, flip, jitter,
grayscale, via torchvision), so seeding both before a call reproduces its crops exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms import InterpolationMode

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


def _dims(width: int, height: int) -> torch.Tensor:
    """A stand-in image [1, height, width] with one element of storage: RandomResizedCrop.get_params
    reads only an image's dimensions, so the draws need the size (e.g. from a JPEG header), not pixels."""
    return torch.empty(1).expand(1, height, width)


class GeometryView:
    """The worker half of one view on the device path: draw the view's crop box, flip and photometric
    parameters (`draw`), then crop + resize + flip the PIL image (`apply`) -> (uint8 [3, S, S], params).

    The random draws are made in the order and with the generators of the reference chain
    (RRC, flip, RandomApply + ColorJitter.get_params, RandomGrayscale: torch; blur, solarize:
    Python's `random`), so under the same seed both paths crop identically and draw the same
    colour parameters; only where the colour work runs differs. `draw` needs only the image size,
    which is what lets `data.decode_on: device` (sslcli.data.decode) make exactly these draws
    from a JPEG header and crop on the device. `solarize_p` None: no solarize step in this view
    (the reference chain then draws nothing for it).
    """

    def __init__(self, cfg: DataConfig, size: int, scale: tuple[float, float], blur_p: float,
                 solarize_p: float | None = None):
        self.rrc = T.RandomResizedCrop(size, scale=tuple(scale), interpolation=INTERPOLATION[cfg.interpolation])
        self.size = size
        self.jitter = T.ColorJitter(*cfg.color_jitter)
        self.jitter_p, self.gray_p, self.blur_p, self.solarize_p = (cfg.color_jitter_prob, cfg.grayscale_prob,
                                                                    blur_p, solarize_p)

    def draw(self, width: int, height: int) -> ViewDraw:
        """All random draws of the view for a width x height source image, in the reference order."""
        box = T.RandomResizedCrop.get_params(_dims(width, height), self.rrc.scale, self.rrc.ratio)
        flip = bool(torch.rand(1) < 0.5)
        params = {"order": [0, 1, 2, 3], "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
        if not self.jitter_p < torch.rand(1):  # RandomApply's test
            j = self.jitter
            order, *factors = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            params["order"] = order.tolist()
            for name, value in zip(("brightness", "contrast", "saturation", "hue"), factors):
                if value is not None:
                    params[name] = float(value)
        params["grayscale"] = bool(torch.rand(1) < self.gray_p)
        params["blur_sigma"] = random.uniform(0.1, 2.0) if random.random() < self.blur_p else 0.0
        params["solarize"] = self.solarize_p is not None and random.random() < self.solarize_p
        return box, flip, params

    def apply(self, img: Image.Image, box: Box, flip: bool) -> torch.Tensor:
        """PIL crop `box` resized to S x S (RandomResizedCrop's own resize), flipped -> uint8 [3, S, S]."""
        img = TF.resized_crop(img, *box, self.rrc.size, self.rrc.interpolation, antialias=self.rrc.antialias)
        return TF.pil_to_tensor(TF.hflip(img) if flip else img)  # (3, S, S) uint8; datasets load RGB

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
