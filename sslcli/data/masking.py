"""BEiT-style block masks for masked image modelling (iBOT / DINOv2 / SOVE).

A mask marks patches of a crop's h x w patch grid (True = masked); the student sees a mask token
there and the patch loss is taken on those positions. Masks are drawn on the CPU in the
data-loader workers, so plain Python loops over a few dozen blocks are fine (no device syncs).

Determinism: every draw comes from the `torch.Generator` passed in (never Python's `random` nor
torch's global RNG). With `mask_generator(seed, epoch, step)` the masks of a whole global batch
are a function of (seed, epoch, step) only, whatever the number of workers or processes (each
process later takes its slice of images).

Semantics follow BEiT's / DINOv2's `MaskingGenerator` and DINOv2's `collate_data_and_cast`, with
these deliberate choices (see `block_mask`):
- the per-block budget is min(remaining, max_block) as in BEiT, and drawing stops once it is below
  min_block (BEiT would still try blocks of area in [budget, min_block] and could get the last
  few patches; we never place a block smaller than min_block, so a mask can fall short of its
  target by up to min_block - 1 patches);
- uniform draws for one block's 10 attempts are taken in a single `torch.rand` call, and the
  top-left corner is floor(u * (h - bh + 1)) (uniform over the inclusive range, as BEiT's
  `random.randint(0, h - bh)`).
Consequence of the first choice: with SOVE's 16-patch blocks, a 30 % target (58 of 196) ends at
43..58 patches (~26 % on average) when no block fails; DINOv2's 4-patch blocks lose <= 3.

Training batches (`data.masking`, `MaskPlan`): the masks are split in two draws so that they depend
on neither workers nor processes while each worker only sees its own samples. The sampler (main
process) draws per global batch the target patch count of every global-crop slot from
`mask_generator(seed, epoch, step)` (`MaskPlan.targets`); each sample's key carries its slots'
targets, and the worker draws the sample's block masks from its own per-(seed, epoch, image)
generator (`MaskPlan.draw`), apart from the crops' generators, so enabling masks changes no crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sslcli.config import DataConfig

MIN_ASPECT = 0.3  # block aspect ratio (height / width) is log-uniform in [0.3, 1 / 0.3]
LOG_ASPECT = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
ATTEMPTS = 10  # placements tried per block before the block "fails"
MASK_SALT = 0x6D61736B  # "mask": keeps mask seeds apart from the per-sample crop seeds


def mask_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, step) with numpy's SeedSequence hash.

    Same construction as `sslcli.data.loader.sample_seed` plus a salt word (loader imports this
    module, so it cannot be imported from here): nearby (epoch, step) give unrelated streams.
    """
    words = np.random.SeedSequence([seed % 2**63, epoch, step, MASK_SALT]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))


def _rectangle(u_area: float, u_aspect: float, min_block: int, cap: int) -> tuple[int, int]:
    """(height, width) of a block of area ~ U[min_block, cap] and log-uniform aspect ratio."""
    area = min_block + (cap - min_block) * u_area
    aspect = math.exp(LOG_ASPECT[0] + (LOG_ASPECT[1] - LOG_ASPECT[0]) * u_aspect)
    return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))


def _place_block(rows: list[list[int]], min_block: int, cap: int, generator: torch.Generator) -> int:
    """Mask one rectangle in `rows` (h lists of w 0/1 ints), in place; return the newly masked count.

    Up to ATTEMPTS placements: a rectangle that does not fit (BEiT: height < h and width < w) or
    whose not-yet-masked patches are not in (0, cap] is discarded, so overlaps are allowed but a
    block never overshoots the budget. Returns 0 when every attempt failed. Python lists, not a
    tensor: counting a window is ~2 us on lists vs ~9 us as a tensor slice + sum.
    """
    h, w = len(rows), len(rows[0])
    draws = torch.rand(ATTEMPTS, 4, generator=generator, dtype=torch.float64).tolist()
    for u_area, u_aspect, u_top, u_left in draws:
        bh, bw = _rectangle(u_area, u_aspect, min_block, cap)
        if not (bh < h and bw < w):
            continue
        top, left = int(u_top * (h - bh + 1)), int(u_left * (w - bw + 1))
        window = rows[top:top + bh]
        delta = bh * bw - sum(sum(row[left:left + bw]) for row in window)
        if 0 < delta <= cap:
            for row in window:
                row[left:left + bw] = [1] * bw
            return delta
    return 0


def block_mask(h: int, w: int, n_masked: int, min_block: int, generator: torch.Generator,
               max_block: int | None = None) -> Tensor:
    """A (h, w) bool mask of at most n_masked patches made of random rectangles (BEiT).

    Blocks are added while the budget min(n_masked - masked, max_block) is >= min_block; each
    block's area is U[min_block, budget], so masks are a few large blobs rather than scattered
    patches (a harder prediction task than random patches). Stops early when a block fails
    (10 attempts added nothing), so the count can fall short on crowded grids, never exceed.
    """
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    if max_block is not None and max_block < min_block:
        raise ValueError(f"max_block ({max_block}) < min_block ({min_block})")
    rows = [[0] * w for _ in range(h)]
    count = 0
    while count < n_masked:
        cap = n_masked - count if max_block is None else min(n_masked - count, max_block)
        if cap < min_block:
            break
        delta = _place_block(rows, min_block, cap, generator)
        if delta == 0:
            break
        count += delta
    return torch.tensor(rows, dtype=torch.bool).view(h, w)  # (h, w) bool


def _by_view(masks: Tensor, n_global: int, n_images: int) -> Tensor:
    """(G, N) crop masks, crop c = view * n_images + image -> (n_global, n_images, N)."""
    return masks.view(n_global, n_images, masks.shape[-1])


def dinov2_masks(n_images: int, n_global: int, h: int, w: int, generator: torch.Generator,
                 mask_probability: float = 0.5, ratio_min: float = 0.1, ratio_max: float = 0.5,
                 min_block: int = 4) -> Tensor:
    """(n_global, n_images, h*w) bool masks of a batch's global crops, as DINOv2's collate.

    int(mask_probability * G) of the G = n_images * n_global crops are masked; their ratios are
    stratified (crop i draws U[r_i, r_{i+1}] on linspace(ratio_min, ratio_max, n + 1)), so each
    batch covers the whole ratio range evenly. The masks are then given to crops in a random
    permutation, so the global crops of one image are masked independently. Patch p = row * w + col.
    Block size is capped at half the grid (DINOv2's max_num_patches; never below min_block).
    """
    n_crops, n_patches = n_images * n_global, h * w
    n_masked = int(mask_probability * n_crops)
    bounds = torch.linspace(ratio_min, ratio_max, n_masked + 1, dtype=torch.float64).tolist()
    u = torch.rand(n_masked, generator=generator, dtype=torch.float64).tolist()
    max_block = max(min_block, int(0.5 * n_patches))
    masks = torch.zeros(n_crops, n_patches, dtype=torch.bool)  # (G, N) bool
    for i in range(n_masked):
        ratio = bounds[i] + (bounds[i + 1] - bounds[i]) * u[i]
        masks[i] = block_mask(h, w, int(n_patches * ratio), min_block, generator, max_block).flatten()
    order = torch.randperm(n_crops, generator=generator)
    return _by_view(masks[order], n_global, n_images)


def sove_masks(n_images: int, n_global: int, h: int, w: int, generator: torch.Generator,
               ratio: float = 0.3) -> Tensor:
    """(n_global, n_images, h*w) bool masks: every global crop masked at `ratio` (SOVE).

    Blocks of at least (min(h, w) // 3)**2 patches (16 on 14 x 14, at least 1): a few large
    blocks, so masked regions cannot be filled in from immediate neighbours. Crops are drawn in
    (view, image) order; patch p = row * w + col.
    """
    min_block = max(1, (min(h, w) // 3) ** 2)
    n_masked = int(ratio * h * w)
    masks = [block_mask(h, w, n_masked, min_block, generator).flatten() for _ in range(n_images * n_global)]
    return _by_view(torch.stack(masks), n_global, n_images)  # (G, N) -> (n_global, n_images, N)


def default_min_block(h: int, w: int) -> int:
    """(min(h, w) // 3)**2, at least 1: iBOT / SOVE's large blocks (16 patches on 14 x 14)."""
    return max(1, (min(h, w) // 3) ** 2)


@dataclass(frozen=True)
class MaskPlan:
    """The block masks of the global crops of every training batch (`data.masking`, module doc).

    A global batch of n images has G * n crop slots, slot (v, k) = global view v of the k-th image
    of the global batch; `targets(epoch, step)` gives each slot's target patch count (0: unmasked):
    - dinov2: int(probability * G * n) slots are masked, the i-th with target int(N * U(r_i, r_{i+1})),
      r = linspace(low, high, n_masked + 1) (stratified: every global batch spans the ratio range),
      dealt to a random permutation of the slots (an image's crops are masked independently), as
      `dinov2_masks`; blocks are capped at half the grid (DINOv2's max_num_patches);
    - ibot: every slot targets int(N * U(low, high)) (low == high: a fixed ratio, SOVE's 0.3);
      blocks uncapped, as `sove_masks`.
    Drawn from `mask_generator(seed, epoch, step)` only, so a slot's target depends on (seed, epoch,
    step, slot), never on how the batch is split. `draw(sample_seed, targets)` then places the blocks
    of one image's crops. Frozen and plain: it travels to spawned workers with the dataset.
    """

    kind: str  # dinov2 | ibot
    grid: tuple[int, int]  # (h, w) patches of a global crop, N = h * w
    n_images: int  # images per global batch (all processes)
    views: int  # G global crops per image
    seed: int
    probability: float
    ratio: tuple[float, float]
    min_block: int

    @classmethod
    def build(cls, cfg: DataConfig, grid: tuple[int, int], n_images: int, seed: int) -> MaskPlan:
        """The plan of `cfg.masking` (dinov2 | ibot) on an (h, w) patch grid, n_images per global batch."""
        if cfg.masking not in ("dinov2", "ibot"):
            raise ValueError(f"no mask plan for data.masking={cfg.masking}")
        h, w = grid
        min_block = cfg.mask_min_block if cfg.mask_min_block is not None else default_min_block(h, w)
        return cls(cfg.masking, (h, w), n_images, cfg.global_crops, seed, cfg.mask_probability,
                   (float(cfg.mask_ratio[0]), float(cfg.mask_ratio[1])), min_block)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def max_block(self) -> int | None:
        """DINOv2 caps a block at half the grid (never below min_block); iBOT / SOVE do not."""
        return max(self.min_block, int(0.5 * self.n_patches)) if self.kind == "dinov2" else None

    def targets(self, epoch: int, step: int) -> Tensor:
        """int64 [G, n]: the target patch count of every slot of global batch `step` (0: unmasked)."""
        gen = mask_generator(self.seed, epoch, step)
        low, high = self.ratio
        if self.kind == "ibot":
            ratios = low + (high - low) * torch.rand(self.views, self.n_images, generator=gen, dtype=torch.float64)
            return (ratios * self.n_patches).long()  # truncation = int() for ratios >= 0
        n_slots = self.views * self.n_images
        n_masked = int(self.probability * n_slots)
        bounds = torch.linspace(low, high, n_masked + 1, dtype=torch.float64)
        u = torch.rand(n_masked, generator=gen, dtype=torch.float64)
        targets = torch.zeros(n_slots, dtype=torch.long)
        targets[:n_masked] = ((bounds[:-1] + (bounds[1:] - bounds[:-1]) * u) * self.n_patches).long()
        order = torch.randperm(n_slots, generator=gen)  # the masked slots: a random subset
        return targets[order].view(self.views, self.n_images)  # slot v * n + k -> (v, k)

    def draw(self, sample_seed: int, targets: Sequence[int]) -> Tensor:
        """(G, N) bool masks of one image's global crops with these targets (patch p = row * w + col).

        One generator seeded with sample_seed ^ MASK_SALT (sample_seed: the image's (seed, epoch, index)
        seed), drawn view after view: the masks depend on the image and its slots' targets only,
        and the crops' own generators are not touched.
        """
        h, w = self.grid
        gen = torch.Generator().manual_seed(sample_seed ^ MASK_SALT)
        masks = torch.zeros(len(targets), self.n_patches, dtype=torch.bool)  # (G, N) bool
        for v, target in enumerate(targets):
            if target > 0:
                masks[v] = block_mask(h, w, int(target), self.min_block, gen, self.max_block).flatten()
        return masks


def patch_grid(cfg: DataConfig, patch_size: int) -> tuple[int, int] | None:
    """(h, w) patches of a global crop, the loader's `mask_grid`; None with data.masking: none."""
    if cfg.masking == "none":
        return None
    side = cfg.global_crop_size // patch_size
    return side, side
