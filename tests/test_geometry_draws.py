"""The device path's fast draws and crops are torchvision's, exactly: the same boxes, coins and
pixels under the same seed, and the generator left in the same state (same number of draws)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from sslcli.config import DataConfig
from sslcli.data.transforms import INTERPOLATION, CropBoxSampler, GeometryView, MultiCropGeometry, float32

SIZES = [(64, 64), (500, 375), (375, 500), (33, 17), (7, 300), (300, 7), (1, 1)]
SCALES = [(0.08, 1.0), (0.4, 1.0), (0.05, 0.4)]


@pytest.mark.parametrize("scale", SCALES)
def test_crop_boxes_are_torchvisions_get_params(scale):
    ratio = (3 / 4, 4 / 3)
    sampler = CropBoxSampler(scale, ratio)
    for width, height in SIZES:
        for seed in range(40):
            torch.manual_seed(seed)
            want = T.RandomResizedCrop.get_params(torch.empty(1).expand(1, height, width), list(scale), list(ratio))
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            got = sampler(width, height)
            assert got == tuple(want), (width, height, seed)
            assert torch.equal(torch.get_rng_state(), state), "a different number of draws"


def test_ten_misses_give_torchvisions_central_crop():
    """A 7 x 300 image has no box of scale >= 0.08 within ratio [3/4, 4/3]: after 10 attempts both
    fall back to the full width and h = round(7 / 0.75) = 9 rows, centred: top (300 - 9) // 2."""
    torch.manual_seed(0)
    assert CropBoxSampler((0.08, 1.0), (3 / 4, 4 / 3))(7, 300) == (145, 0, 9, 7)
    assert CropBoxSampler((0.08, 1.0), (3 / 4, 4 / 3))(300, 7) == (0, 145, 7, 9)


def torchvision_draws(cfg: DataConfig, size: int, scale, blur_p: float, solarize_p, width: int, height: int):
    """One view's draws made by the reference chain's own calls (MultiCropTransform's order)."""
    box = T.RandomResizedCrop.get_params(torch.empty(1).expand(1, height, width), list(scale), [3 / 4, 4 / 3])
    flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip
    params = {"order": [0, 1, 2, 3], "brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    if not cfg.color_jitter_prob < torch.rand(1):  # RandomApply
        j = T.ColorJitter(*cfg.color_jitter)
        order, *factors = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
        params["order"] = order.tolist()
        params.update({k: v for k, v in zip(("brightness", "contrast", "saturation", "hue"), factors) if v is not None})
    params["grayscale"] = bool(torch.rand(1) < cfg.grayscale_prob)  # RandomGrayscale
    params["blur_sigma"] = random.uniform(0.1, 2.0) if random.random() < blur_p else 0.0  # GaussianBlur
    params["solarize"] = solarize_p is not None and random.random() < solarize_p  # Solarize
    return box, flip, params


@pytest.mark.parametrize("jitter", [(0.4, 0.4, 0.2, 0.1), (0.4, 0.4, 0.4, 0.5), (0.4, 0.0, 0.4, 0.0)])
def test_view_draws_are_the_reference_chains_draws(jitter):
    """GeometryView.draw against torchvision's own calls in the reference order, over 300 seeds per
    view (DINO's probabilities: jitter 0.8, grayscale 0.2; zero-strength ops draw nothing)."""
    cfg = DataConfig(color_jitter=jitter, global_crop_size=24, local_crop_size=12, local_crops=1)
    geometry = MultiCropGeometry(cfg)
    specs = [(24, cfg.global_crops_scale, cfg.blur_probs[0], None), (24, cfg.global_crops_scale, cfg.blur_probs[1],
             cfg.solarize_prob), (12, cfg.local_crops_scale, cfg.blur_probs[2], None)]
    for view, spec in zip(geometry.views, specs, strict=True):
        for seed in range(300):
            random.seed(seed)
            torch.manual_seed(seed)
            want = torchvision_draws(cfg, *spec, 60, 45)
            state, py_state = torch.get_rng_state(), random.getstate()
            random.seed(seed)
            torch.manual_seed(seed)
            assert view.draw(60, 45) == want, seed
            assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state


@pytest.mark.parametrize("p", [0.8, 0.5, 0.2, 0.1, 1 / 3])
def test_coins_decide_as_torchs_float32_comparison(p):
    """`torch.rand(1) < p` compares in float32; the fast draws compare the drawn float with
    float32(p). At the float32 neighbours of p (where a float64 p would decide differently)."""
    q = float32(p)
    for r in (math.nextafter(q, 0.0), q, math.nextafter(q, 1.0)):
        r32 = float32(r)
        drawn = torch.tensor([r32])
        assert bool(drawn < p) == (r32 < q) and bool(p < drawn) == (q < r32)
    assert float32(0.8) != 0.8 and bool(torch.tensor([float32(0.8)]) < 0.8) is False


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATION))
def test_crop_resize_flip_are_torchvisions_pixels(interpolation):
    g = torch.Generator().manual_seed(1)
    img = Image.fromarray(torch.randint(0, 256, (50, 70, 3), generator=g, dtype=torch.uint8).numpy())
    view = GeometryView(DataConfig(interpolation=interpolation), 24, (0.1, 1.0), blur_p=0.0)
    mode = INTERPOLATION[interpolation]
    for box in [(0, 0, 50, 70), (3, 5, 20, 31), (10, 40, 9, 12), (45, 60, 5, 10)]:
        for flip in (False, True):
            want = TF.resized_crop(img, *box, [24, 24], mode, antialias=True)
            want = TF.pil_to_tensor(TF.hflip(want) if flip else want)
            got = view.apply(img, box, flip)
            assert got.dtype == torch.uint8 and torch.equal(got, want), (box, flip)
