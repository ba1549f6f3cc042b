"""Block masks delivered in the training batch (data.masking, MaskPlan in the loader and trainer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sslcli.config import DataConfig
from sslcli.data.datasets import open_dataset
from sslcli.data.loader import TrainSet, build_train_loader, sample_seed
from sslcli.data.masking import MaskPlan
from sslcli.data.transforms import MultiCropTransform

GRID = (8, 8)  # 32-px global crops, 4-px patches: N = 64
N = GRID[0] * GRID[1]
DINOV2 = DataConfig(global_crop_size=32, local_crop_size=16, local_crops=2, masking="dinov2")
IBOT = dataclasses.replace(DINOV2, masking="ibot", mask_ratio=(0.3, 0.3), mask_min_block=None)


@pytest.fixture(scope="module")
def dataset(shapes_folder):
    return open_dataset(str(shapes_folder))  # 48 images


def loader(dataset, cfg: DataConfig, batch: int = 16, rank: int = 0, world: int = 1, workers: int = 0,
           grid: tuple[int, int] | None = GRID):
    return build_train_loader(dataset, cfg, batch, rank, world, seed=3, workers=workers, pin_memory=False,
                              mask_grid=grid)


def test_dinov2_batch_masks_half_the_slots_with_stratified_ratios(dataset):
    batches = list(loader(dataset, DINOV2)[0])
    plan = MaskPlan.build(DINOV2, GRID, 16, seed=3)
    for step, batch in enumerate(batches):
        masks = batch.masks  # (G, B, N) bool, B = the whole global batch here
        assert masks.shape == (2, 16, N) and masks.dtype == torch.bool
        targets = plan.targets(0, step)  # (G, n) int64
        assert int((targets > 0).sum()) == int(0.5 * 32)
        counts = masks.sum(-1)
        assert (counts <= targets).all() and (counts[targets == 0] == 0).all()
        assert (counts[targets >= 4] > 0).all()
        # stratified: the i-th smallest target lies in the i-th of 16 equal strata of [0.1, 0.5]
        bounds = torch.linspace(0.1, 0.5, 17, dtype=torch.float64)
        ordered = targets[targets > 0].sort().values
        assert ((ordered >= (bounds[:-1] * N).long()) & (ordered <= (bounds[1:] * N).long())).all()
        assert counts.sum() >= 0.8 * targets.sum()  # block masks nearly reach their targets
    # an image's two crops are masked independently: some images have exactly one masked crop
    assert any(((b.masks.sum(-1) > 0).sum(0) == 1).any() for b in batches)


def test_masks_do_not_depend_on_workers_or_processes(dataset):
    single = list(loader(dataset, DINOV2)[0])
    workers = list(loader(dataset, DINOV2, workers=2)[0])
    ranks = [list(loader(dataset, DINOV2, rank=r, world=2)[0]) for r in range(2)]
    assert len(single) == len(workers) == len(ranks[0]) == 3
    for one, two, r0, r1 in zip(single, workers, *ranks):
        assert torch.equal(one.ids, two.ids) and torch.equal(one.masks, two.masks)
        assert torch.equal(one.ids, torch.cat([r0.ids, r1.ids]))
        assert torch.equal(one.masks, torch.cat([r0.masks, r1.masks], dim=1))  # (G, B, N): images on dim 1


def test_masks_leave_the_crops_unchanged(dataset):
    plain = list(loader(dataset, dataclasses.replace(DINOV2, masking="none"), grid=None)[0])
    masked = list(loader(dataset, DINOV2)[0])
    for a, b in zip(plain, masked):
        assert a.masks is None and b.masks is not None
        assert torch.equal(a.seeds, b.seeds)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
        for p, q in zip(a.photometric, b.photometric):
            assert all(torch.equal(getattr(p, f), getattr(q, f)) for f in ("order", "brightness", "blur_sigma"))


def test_masks_survive_device_decoding(dataset):
    """decode_on: device (forced on the CPU): the masks travel beside the encoded views, unchanged."""
    worker = next(iter(loader(dataset, DINOV2)[0]))
    cfg = dataclasses.replace(DINOV2, decode_on="device")
    encoded = next(iter(build_train_loader(dataset, cfg, 16, 0, 1, seed=3, workers=0, pin_memory=False,
                                           decode_on_cpu=True, mask_grid=GRID)[0]))
    assert encoded.encoded is not None
    batch = encoded.decode("cpu").to("cpu").colour(cfg.mean, cfg.std)
    assert torch.equal(batch.masks, worker.masks) and batch.masks.dtype == torch.bool


def test_ibot_masks_every_crop_at_the_fixed_ratio(dataset):
    grid = (14, 14)  # SOVE: 30 % of 196 = 58 patches in blocks of >= (14 // 3)**2 = 16
    plan = MaskPlan.build(IBOT, grid, 16, seed=3)
    assert plan.min_block == 16 and plan.max_block is None and (plan.targets(0, 0) == 58).all()
    batch = next(iter(loader(dataset, IBOT, grid=grid)[0]))
    counts = batch.masks.sum(-1)  # (G, B)
    assert batch.masks.shape == (2, 16, 196)
    assert (counts <= 58).all() and (counts >= 43).all()  # short of the target by < min_block
    assert 0.2 < counts.float().mean() / 196 <= 0.3


def test_masking_none_gives_no_masks(dataset):
    batch = next(iter(loader(dataset, dataclasses.replace(DINOV2, masking="none"), grid=GRID)[0]))
    assert batch.masks is None  # the grid is ignored without masking
    with pytest.raises(ValueError, match="mask_grid"):
        loader(dataset, DINOV2, grid=None)
    ts = TrainSet(dataset, MultiCropTransform(DINOV2), base_seed=3)
    assert ts[(0, 1)]["masks"] is None
    with pytest.raises(ValueError, match="no MaskPlan"):
        ts[(0, 1, 1, 10, 0)]


def test_resumed_sampler_gives_the_same_masks(dataset):
    full = list(loader(dataset, DINOV2, batch=8)[0])  # 6 steps
    resumed_loader, sampler = loader(dataset, DINOV2, batch=8)
    sampler.set_position(0, 4)
    resumed = list(resumed_loader)
    assert len(resumed) == 2
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.masks, b.masks)


def test_sample_masks_follow_the_image_seed_and_slot_targets(dataset):
    plan = MaskPlan.build(DINOV2, GRID, 16, seed=3)
    ts = TrainSet(dataset, MultiCropTransform(DINOV2), base_seed=3, masks=plan)
    sample = ts[(2, 5, 5, 20, 0)]
    assert sample["masks"].shape == (2, N)
    assert torch.equal(sample["masks"], plan.draw(sample_seed(3, 2, 5), [20, 0]))
    assert 16 < int(sample["masks"][0].sum()) <= 20 and not sample["masks"][1].any()
    assert not torch.equal(sample["masks"], ts[(3, 5, 5, 20, 0)]["masks"])  # another epoch, other blocks
    paired = ts[(2, 5, 7, 20, 0)]  # neighbour bootstrapping: view 2 from image 7, masks still image 5's
    assert paired["second"] == 7 and torch.equal(paired["masks"], sample["masks"])


def test_sampler_keys_carry_bootstrap_partner_and_slot_targets(dataset):
    _, sampler = loader(dataset, DINOV2, batch=8, rank=1, world=2)
    sampler.plan = torch.arange(48).flip(0)  # j* = 47 - i
    keys = next(iter(sampler))
    targets = sampler.mask_plan(0, 0)[:, 4:]  # rank 1's half of the global batch, (G, 4)
    assert [k[2] for k in keys] == [47 - k[1] for k in keys]
    assert [list(k[3:]) for k in keys] == targets.t().tolist()


def test_trainer_hands_masks_of_the_patch_grid_and_keeps_initial_weights(tiny_config, dataset, tmp_path):
    from sslcli.train.distributed import DistEnv
    from sslcli.train.reporting import NullReporter
    from sslcli.train.trainer import Trainer

    cfg = tiny_config()  # DINO takes no masks; the trainer's loader wiring does not look at the method
    masked = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, masking="dinov2"))
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    plain_t, masked_t = (Trainer(c, tmp_path, env, dataset, NullReporter()) for c in (cfg, masked))
    assert plain_t.sampler.mask_plan is None
    batch = next(iter(masked_t.loader))
    assert batch.masks.shape == (2, 16, 16)  # 16-px crops, 4-px patches: 4 x 4
    for (name, p), q in zip(plain_t.method.state_dict().items(), masked_t.method.state_dict().values()):
        assert torch.equal(p, q), name
