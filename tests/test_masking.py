"""Block masks for masked image modelling (sslcli.data.masking): counts, shapes, strata, seeding."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sslcli.data.masking import MIN_ASPECT, block_mask, dinov2_masks, mask_generator, sove_masks


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bounding_box(mask: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the bounding box of a non-empty (h, w) bool mask."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# ---------------------------------------------------------------- block_mask


@pytest.mark.parametrize("target", [20, 35, 50, 75, 98])
def test_block_mask_count_never_exceeds_and_nearly_reaches_target(target):
    counts = torch.tensor([int(block_mask(14, 14, target, 4, gen(s)).sum()) for s in range(200)])
    assert counts.max() <= target
    assert counts.float().mean() >= 0.9 * target
    # Below 50 % of the grid no block fails: the shortfall is only the final budget < min_block.
    assert (counts > target - 4).all()
    assert (counts == target).any()


def test_block_mask_shape_dtype_and_non_square_grid():
    mask = block_mask(6, 11, 20, 4, gen(0))
    assert mask.shape == (6, 11) and mask.dtype == torch.bool
    assert 16 < int(mask.sum()) <= 20


@pytest.mark.parametrize("area", [4, 9, 16, 30, 50])
def test_single_block_is_a_rectangle_with_bounded_aspect_and_area(area):
    # n_masked == min_block: one block, then the budget left is < min_block and drawing stops.
    slack = 0.5 * (math.sqrt(area * MIN_ASPECT) + math.sqrt(area / MIN_ASPECT))
    shapes = set()
    for seed in range(100):
        mask = block_mask(14, 14, area, area, gen(seed))
        assert mask.any()
        bh, bw = bounding_box(mask)
        assert int(mask.sum()) == bh * bw  # a filled rectangle
        assert area - slack + 0.25 <= bh * bw <= area  # sides are round(sqrt(area * r)), round(sqrt(area / r))
        assert (bh + 0.5) / (bw - 0.5) >= MIN_ASPECT and (bh - 0.5) / (bw + 0.5) <= 1 / MIN_ASPECT
        shapes.add((bh, bw))
    if area >= 9:  # both orientations occur
        assert any(bh > bw for bh, bw in shapes) and any(bh < bw for bh, bw in shapes)


def test_budget_below_min_block_stops():
    for seed in range(20):
        assert not block_mask(14, 14, 3, 4, gen(seed)).any()
        assert not block_mask(14, 14, 15, 16, gen(seed)).any()


def test_zero_target_is_all_false_and_draws_nothing():
    g = gen(0)
    state = g.get_state()
    mask = block_mask(14, 14, 0, 4, g)
    assert mask.shape == (14, 14) and not mask.any()
    assert torch.equal(g.get_state(), state)


def test_max_block_caps_each_block():
    # With max_block == min_block every block has area <= 4, so each block adds <= 4 patches.
    for seed in range(20):
        mask = block_mask(14, 14, 40, 4, gen(seed), max_block=4)
        assert 36 < int(mask.sum()) <= 40
    with pytest.raises(ValueError):
        block_mask(14, 14, 40, 4, gen(0), max_block=3)


def test_block_mask_reproducible_and_uses_only_the_generator():
    torch.manual_seed(1)
    random.seed(1)
    a = block_mask(14, 14, 60, 4, gen(7))
    torch.manual_seed(2)
    random.seed(2)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    assert torch.equal(a, block_mask(14, 14, 60, 4, gen(7)))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert not torch.equal(a, block_mask(14, 14, 60, 4, gen(8)))


# ---------------------------------------------------------------- dinov2_masks


def test_dinov2_masks_shape_count_and_strata():
    n_images, n_global, h, w = 8, 2, 14, 14
    n_crops, n_masked = n_images * n_global, int(0.5 * n_images * n_global)
    bounds = torch.linspace(0.1, 0.5, n_masked + 1)
    for seed in range(20):
        masks = dinov2_masks(n_images, n_global, h, w, gen(seed))
        assert masks.shape == (n_global, n_images, h * w) and masks.dtype == torch.bool
        flat = masks.reshape(n_crops, h * w)
        assert int(flat.any(1).sum()) == n_masked
        fractions = flat.float().mean(1).sort().values[-n_masked:]
        assert (fractions <= bounds[1:] + 1e-6).all()
        assert (fractions >= bounds[:-1] - 0.05).all()


def test_dinov2_views_of_one_image_are_masked_independently():
    together = apart = 0
    for seed in range(30):
        masked = dinov2_masks(8, 2, 14, 14, gen(seed)).any(-1)  # (2, 8) bool
        together += int((masked[0] & masked[1]).sum())
        apart += int((masked[0] != masked[1]).sum())
    assert together > 0 and apart > 0


def test_dinov2_masked_crops_spread_over_positions():
    hits = torch.zeros(2, 4)
    for seed in range(200):
        hits += dinov2_masks(4, 2, 14, 14, gen(seed)).any(-1).float()
    assert (hits > 50).all() and (hits < 150).all()  # each crop masked ~half the time


def test_dinov2_mask_probability_and_small_grid():
    masks = dinov2_masks(5, 2, 7, 9, gen(0), mask_probability=0.3)
    assert masks.shape == (2, 5, 63)
    assert int(masks.any(-1).sum()) == 3


# ---------------------------------------------------------------- sove_masks


def test_sove_masks_about_30_percent_every_crop():
    masks = sove_masks(32, 2, 14, 14, gen(0))
    assert masks.shape == (2, 32, 196) and masks.dtype == torch.bool
    counts = masks.sum(-1)
    target = int(0.3 * 196)  # 58; blocks of >= 16 patches, so the last < 16 are not masked
    assert (counts <= target).all() and (counts > target - 16).all()
    assert 0.24 <= counts.float().mean() / 196 <= 0.3


def test_sove_blocks_are_at_least_16_patches():
    # A budget of exactly 16 (the min block on 14 x 14) gives one 16-patch-ish rectangle per crop.
    masks = sove_masks(16, 2, 14, 14, gen(1), ratio=16.5 / 196)
    for mask in masks.reshape(-1, 14, 14):
        bh, bw = bounding_box(mask)
        assert int(mask.sum()) == bh * bw and 12 <= bh * bw <= 16


def test_sove_layout_is_row_major():
    # One block per crop on a 12 x 9 grid (min block 9): each mask read row-major is a rectangle.
    h, w = 12, 9
    masks = sove_masks(4, 2, h, w, gen(2), ratio=9.5 / (h * w))
    for flat in masks.reshape(-1, h * w):
        mask = flat.view(h, w)
        assert mask.any()
        bh, bw = bounding_box(mask)
        assert int(mask.sum()) == bh * bw


# ---------------------------------------------------------------- mask_generator


def test_mask_generator_determines_the_batch_masks():
    def masks(seed, epoch, step):
        return dinov2_masks(16, 2, 14, 14, mask_generator(seed, epoch, step))

    ref = masks(0, 3, 5)
    assert torch.equal(ref, masks(0, 3, 5))
    for other in [(1, 3, 5), (0, 4, 5), (0, 3, 6), (-1, 3, 5)]:
        assert not torch.equal(ref, masks(*other))
    assert mask_generator(0, 3, 5).device.type == "cpu"
