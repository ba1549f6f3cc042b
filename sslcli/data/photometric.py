"""DINO's photometric augmentation as batched torch ops with per-image parameters.

Replaces, on the training device, the per-image PIL chain of the data-loader workers
(sslcli/data/transforms.py): RandomApply(ColorJitter) -> RandomGrayscale -> GaussianBlur ->
Solarize -> ToTensor -> Normalize. The workers only draw the parameters (one dict per image,
`PhotometricParams.stack`) and ship uint8 crops; `apply_photometric` then runs the whole chain
for a [B, 3, H, W] batch on the tensor's device (CPU or GPU) without host synchronisation: every
per-image choice is a [B] tensor broadcast as [B, 1, 1, 1] into arithmetic / torch.where (no
.item(), no boolean-mask indexing, no branching on tensor values), so it also runs on `meta`.

Equivalence (tests/test_photometric.py; 80 smooth random 48x40 images, factors in [0.6, 1.4],
hue in [-0.1, 0.1]; |differences| in 0..255 units unless said otherwise):
- vs torchvision.transforms.functional on float images, image by image (0..1 units): brightness,
  contrast, saturation (torchvision's blend, written as a lerp), grayscale: <= 1.2e-7; hue
  (torchvision's RGB -> HSV -> RGB, in closed form): <= 1.2e-6; solarize: exact.
- vs the PIL path (uint8 after every op) on uint8 images with the same parameters:
  brightness / contrast / saturation mean <= 0.51, max <= 1.2 (PIL truncates blends and rounds the
  mean grey to an integer); grayscale mean 0.25, max 0.53; hue mean <= 0.84, max <= 13.2 (PIL's
  HSV is 8-bit and it shifts by int(255 * hue)); solarize: exact (threshold 128/255).
- Gaussian blur: PIL's GaussianBlur(radius=s) is not a sampled Gaussian but, per axis, 3 passes
  of an "extended" box (Gwosdek et al. 2011; Pillow's BoxBlur.c) whose composition has variance
  s^2, edges extended at every pass, uint8 rounding after each of the 6 passes. `gaussian_blur`
  runs exactly those passes in float, so only PIL's rounding differs: mean <= 0.62, max <= 2.5
  for s in (0.1, 0.5, 1, 2) (at s = 0.1 PIL rounds the tiny blur away; we do not).
- Whole chain vs the worker path (DINO-like draws): mean <= 1.4, max <= 20 (hue).
- Identity parameters leave an image bit-identical; apply_photometric(identity) equals
  ToTensor + Normalize bit for bit on CPU. Nothing is quantised between ops (as torchvision's
  float ops), unlike the PIL path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

SOLARIZE_THRESHOLD = 128 / 255
CPU_CHUNK_PIXELS = 1 << 18  # on CPU, apply_photometric works on this many pixels per image plane at a time


# PhotometricParams.pack's columns after the four of `order`
PACKED_SCALARS = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur_sigma", "solarize")


@dataclass
class PhotometricParams:
    """Per-image parameters of one view for B images (all tensors on one device)."""

    order: Tensor        # int64 [B, 4]: permutation of 0..3 = (brightness, contrast, saturation, hue)
    brightness: Tensor   # float32 [B], factor (1 = identity)
    contrast: Tensor     # float32 [B], factor (1 = identity)
    saturation: Tensor   # float32 [B], factor (1 = identity)
    hue: Tensor          # float32 [B], shift in [-0.5, 0.5] of the hue circle (0 = identity)
    grayscale: Tensor    # bool [B]
    blur_sigma: Tensor   # float32 [B], Gaussian sigma in pixels = PIL's radius (0 = no blur)
    solarize: Tensor     # bool [B]

    def _map(self, fn) -> PhotometricParams:
        return PhotometricParams(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = True) -> PhotometricParams:
        """All tensors on `device` (asynchronous from pinned memory, see `pin_memory`)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PhotometricParams:
        """Page-locked copies (called by DataLoader(pin_memory=True) on the collated batch)."""
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.order.shape[0]

    def __getitem__(self, index) -> PhotometricParams:
        """The parameters of the images `index` (a slice or index tensor) selects."""
        return self._map(lambda t: t[index])

    @classmethod
    def stack(cls, rows: list[dict]) -> PhotometricParams:
        """CPU params from per-image dicts {"order": [4 ints], "brightness", "contrast",
        "saturation", "hue", "blur_sigma": float, "grayscale", "solarize": bool}."""
        def col(key: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([r[key] for r in rows], dtype=dtype)
        return cls(order=col("order", torch.int64).reshape(-1, 4),
                   brightness=col("brightness", torch.float32), contrast=col("contrast", torch.float32),
                   saturation=col("saturation", torch.float32), hue=col("hue", torch.float32),
                   grayscale=col("grayscale", torch.bool), blur_sigma=col("blur_sigma", torch.float32),
                   solarize=col("solarize", torch.bool))

    def pack(self) -> Tensor:
        """float32 [B, 11]: order (4 columns), brightness, contrast, saturation, hue, grayscale,
        blur_sigma, solarize; every value is exact in float32 (`unpack` restores the dtypes)."""
        columns = [self.order.float(), *(getattr(self, k).float().unsqueeze(1) for k in PACKED_SCALARS)]
        return torch.cat(columns, dim=1)

    @classmethod
    def unpack(cls, packed: Tensor) -> PhotometricParams:
        """The inverse of `pack`: float32 [B, 11] -> PhotometricParams (columns as views/casts)."""
        scalars = {k: packed[:, 4 + i] for i, k in enumerate(PACKED_SCALARS)}
        for k in ("grayscale", "solarize"):
            scalars[k] = scalars[k] > 0.5
        return cls(order=packed[:, :4].long(), **scalars)

    @classmethod
    def identity(cls, b: int, device: torch.device | str | None = None) -> PhotometricParams:
        """Parameters that change nothing (order 0, 1, 2, 3; factors 1; no hue/grey/blur/solarize)."""
        ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)
        false = torch.zeros(b, dtype=torch.bool, device=device)
        return cls(order=torch.arange(4, device=device).repeat(b, 1), brightness=ones,
                   contrast=ones.clone(), saturation=ones.clone(), hue=zeros, grayscale=false,
                   blur_sigma=zeros.clone(), solarize=false.clone())


def _col(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1] in like's dtype (bool stays bool), to broadcast over an image batch."""
    return v.reshape(-1, 1, 1, 1).to(like.dtype if v.dtype != torch.bool else torch.bool)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's _blend for float images, clamp(f x + (1 - f) other, 0, 1) with f per image,
    as one lerp (other + f (x - other); exactly x for f = 1; within ~1e-7 of torchvision's form)."""
    return torch.lerp(other.expand_as(x), x, _col(factor, x)).clamp_(0.0, 1.0)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: 0.2989 R + 0.587 G + 0.114 B (torchvision's weights)."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """x float [B, 3, H, W] in [0, 1], factor [B] -> clamp(factor * x, 0, 1)."""
    return _blend(x, torch.zeros_like(x[:, :1]), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its grayscale image (a scalar per image), factor [B]."""
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its grayscale image, factor [B]."""
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """RGB -> HSV, h <- (h + shift) mod 1, -> RGB, shift [B] in [-0.5, 0.5]; shift 0 is exact.

    torchvision's _rgb2hsv / _hsv2rgb in closed form: the shift keeps v = max and c = max - min,
    so with h6 = 6 h + 6 shift (mod 6) channel n (R 5, G 3, B 1) is v - c clamp(min(k, 4 - k), 0, 1),
    k = (n + h6) mod 6 (the same piecewise-linear function; within ~2e-6 of torchvision's floats).
    """
    r, g, b = x.unbind(dim=1)
    v = x.amax(dim=1)  # amax / amin: no argmax indices (max(dim) computes them, ~3x slower on CPU)
    c = v - x.amin(dim=1)
    cd = torch.where(c == 0, 1.0, c)
    h6 = torch.where(v == r, (g - b) / cd, torch.where(v == g, 2.0 + (b - r) / cd, 4.0 + (r - g) / cd))
    h6 = (h6 + 6.0 * shift.reshape(-1, 1, 1).to(x.dtype)).remainder_(6.0).unsqueeze(1)
    n = 5.0 - 2.0 * torch.arange(3, device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)
    k = (n + h6).remainder_(6.0)
    out = v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.where(_col(shift == 0, x), x, out)


def solarize(x: Tensor, apply: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """1 - x for pixels >= threshold (PIL's 128 on uint8 = 128/255) of the images flagged in apply [B]."""
    return torch.where(_col(apply, x) & (x >= threshold), 1.0 - x, x)


def _box_radius(sigma: Tensor | float) -> tuple:
    """Pillow's _gaussian_blur_radius for 3 passes: integer part l and radius l + a of the
    extended box whose 3-fold self-convolution has variance sigma^2 (works on floats or tensors)."""
    floor, sqrt = (torch.floor, torch.sqrt) if isinstance(sigma, Tensor) else (math.floor, math.sqrt)
    s2 = sigma * sigma / 3.0
    whole = floor((sqrt(12.0 * s2 + 1.0) - 1.0) / 2.0)
    a = (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))
    return whole, whole + a


def _box_kernel(sigma: Tensor, max_sigma: float = 2.0) -> Tensor:
    """Per-image extended box [B, 2n + 1] (n = l_max + 1: 5 taps for max_sigma 2.0): weight 1 on
    |k| <= l, a on |k| = l + 1, normalised; 3 passes of it have variance sigma^2 (PIL's
    GaussianBlur). sigma is clamped to [0, max_sigma]; sigma 0 gives the unit impulse."""
    n = int(_box_radius(float(max_sigma))[0]) + 1
    whole, r = _box_radius(sigma.clamp(0.0, max_sigma).unsqueeze(1))
    k = torch.arange(-n, n + 1, device=sigma.device, dtype=sigma.dtype).abs()
    return ((k <= whole).to(sigma.dtype) + (k == whole + 1) * (r - whole)) / (2 * r + 1)


def gaussian_blur(x: Tensor, sigma: Tensor, max_sigma: float = 2.0) -> Tensor:
    """PIL's GaussianBlur(radius=sigma) on x float [B, C, H, W], sigma [B] in pixels per image
    (0 -> unchanged, exactly): per axis 3 passes of the extended box `_box_kernel`, each with
    replicate padding (as PIL extends edges at every pass), one kernel size for the batch. The
    composed kernel spans +-3 (l_max + 1) px (+-6 = 3 sigma at max_sigma 2), no uint8 rounding."""
    box = _box_kernel(sigma.to(x.dtype), max_sigma)
    size = box.shape[1]
    taps = [_col(box[:, j], x) for j in range(size)]
    for dim, pad in ((-1, (size // 2, size // 2, 0, 0)), (-2, (0, 0, size // 2, size // 2))):
        n = x.shape[dim]
        for _ in range(3):
            xp = F.pad(x, pad, mode="replicate")
            x = xp.narrow(dim, 0, n) * taps[0]
            for j in range(1, size):
                x.addcmul_(xp.narrow(dim, j, n), taps[j])
    return x


def _jitter_step(x: Tensor, op: Tensor, p: PhotometricParams, active: Tensor) -> Tensor:
    """One brightness (op 0) / contrast (1) / saturation (2) blend per image; factor 1 where
    not active. The three are one blend with a different second image (black, mean grey, grey)."""
    gray = rgb_to_grayscale(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    other = torch.where(_col(op == 2, x), gray, mean * _col(op == 1, x))  # op 0: black
    factors = torch.stack((p.brightness, p.contrast, p.saturation), dim=1).to(x.dtype)
    factor = factors.gather(1, op.clamp(0, 2).unsqueeze(1)).squeeze(1)
    return _blend(x, other, torch.where(active, factor, 1.0))


def _flagged_only(op, x: Tensor, flag: Tensor, param: Tensor) -> Tensor:
    """op(x, param), computed on the CPU for the flagged images only (op is the identity on the
    others, exactly: hue 0, sigma 0). On other devices every image is computed: selecting rows
    would need a host sync, and there the batched op is cheap."""
    if x.device.type != "cpu":
        return op(x, param)
    rows = flag.nonzero().flatten()
    if len(rows) == len(flag):
        return op(x, param)
    out = x.clone()
    if len(rows):
        out[rows] = op(x[rows], param[rows])
    return out


def apply_photometric(x: Tensor, p: PhotometricParams, mean: Sequence[float],
                      std: Sequence[float]) -> Tensor:
    """uint8 [B, 3, H, W] (or float in [0, 1]) -> float32 [B, 3, H, W], normalised.

    /255; the four jitter ops in each image's own `p.order`; grayscale (3 equal channels);
    blur (p.blur_sigma); solarize; (x - mean) / std per channel. `p` is moved to x's device
    (a no-op when already there: pin and move it non_blocking beforehand to avoid a sync).
    The hue op, the costly one, runs once: images apply the blends that precede hue in their
    order (3 masked steps), hue, then the blends that follow it (3 more masked steps). On CPU
    the batch is processed in pieces of CPU_CHUNK_PIXELS / (H W) images (cache locality).
    """
    p = p.to(x.device)
    chunk = max(1, CPU_CHUNK_PIXELS // (x.shape[-2] * x.shape[-1]))
    if x.device.type == "cpu" and x.shape[0] > chunk:  # cache-sized pieces: ~2.5x faster on CPU
        return torch.cat([apply_photometric(x[i:i + chunk], p[i:i + chunk], mean, std)
                          for i in range(0, x.shape[0], chunk)])
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    order = p.order.long()
    hue_pos = ((order == 3) * torch.arange(4, device=x.device)).sum(dim=1)
    slots = torch.arange(3, device=x.device).unsqueeze(0)
    blends = order.gather(1, slots + (slots >= hue_pos.unsqueeze(1)))  # order without hue, [B, 3]
    for m in range(3):
        x = _jitter_step(x, blends[:, m], p, m < hue_pos)
    x = _flagged_only(adjust_hue, x, p.hue != 0, p.hue)
    for m in range(3):
        x = _jitter_step(x, blends[:, m], p, m >= hue_pos)
    x = torch.where(_col(p.grayscale, x), rgb_to_grayscale(x).expand_as(x), x)
    x = _flagged_only(gaussian_blur, x, p.blur_sigma > 0, p.blur_sigma)
    x = solarize(x, p.solarize)
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(mean, std))], dim=1)
