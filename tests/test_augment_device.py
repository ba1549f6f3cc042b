"""`data.augment_on: device`: workers crop, flip and draw the colour parameters; the colour chain runs
batched where the model runs. Same draws as the PIL reference path, per image, worker-independent."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from PIL import Image

from sslcli.config import DataConfig
from sslcli.data import Batch
from sslcli.data.loader import TrainSet, collate_views, sample_seed
from sslcli.data.photometric import apply_photometric
from sslcli.data.transforms import MultiCropGeometry, MultiCropTransform

CROPS = DataConfig(global_crop_size=24, local_crop_size=12, local_crops=2)
NO_COLOUR = dataclasses.replace(CROPS, color_jitter_prob=0.0, grayscale_prob=0.0, blur_probs=(0.0, 0.0, 0.0),
                                solarize_prob=0.0)


def picture(seed: int = 0, size: int = 40) -> Image.Image:
    """A smooth colourful image (gradients + a disc), so that colour ops and blur have work to do."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.rand(3, generator=g)
    rgb = torch.stack([base[0] * x + 0.2, base[1] * y + 0.1, 0.8 - 0.5 * x * y])
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05).float()
    rgb = (rgb * (1 - disc) + disc * torch.rand(3, 1, 1, generator=g)).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0) * 255).round().byte().numpy())


def seeded(fn, seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn()


def device_views(cfg: DataConfig, img: Image.Image, seed: int) -> list[torch.Tensor]:
    crops, params = seeded(lambda: MultiCropGeometry(cfg)(img), seed)
    batch = collate_views([{"crops": crops, "params": params, "index": 0, "second": 0, "label": 0, "seed": seed,
                            "bad": 0}])
    return [v[0] for v in batch.colour(cfg.mean, cfg.std).views]


def unnormalise(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    return x * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)


def test_same_seed_same_crops_as_the_reference_path():
    """Without colour ops the two paths are the same function: crops, flips, normalisation."""
    img = picture()
    for seed in range(5):
        reference = seeded(lambda: MultiCropTransform(NO_COLOUR)(img), seed)
        device = device_views(NO_COLOUR, img, seed)
        assert [tuple(v.shape) for v in device] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 2
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference, device))


def test_same_seed_same_colours_up_to_pil_rounding():
    """Full DINO colour chain: the device path draws the reference path's parameters, so the views
    differ only by PIL's uint8 rounding between ops (and its 8-bit HSV): a few grey levels."""
    img = picture(1)
    diffs, unrelated = [], []
    for seed in range(12):
        reference = seeded(lambda: MultiCropTransform(CROPS)(img), seed)
        device = device_views(CROPS, img, seed)
        other = device_views(CROPS, img, seed + 100)
        for r, d, o in zip(reference, device, other):
            diffs.append((unnormalise(r, CROPS) - unnormalise(d, CROPS)).abs().mean())
            unrelated.append((unnormalise(r, CROPS) - unnormalise(o, CROPS)).abs().mean())
    diffs, unrelated = torch.stack(diffs), torch.stack(unrelated)
    assert diffs.mean() < 2.0 / 255 and diffs.max() < 8.0 / 255  # measured: see the assertion message
    assert unrelated.mean() > 10 * diffs.mean(), (diffs.mean(), unrelated.mean())


def test_drawn_parameters_follow_the_reference_distributions():
    """2,000 draws (fixed seed): rates and ranges of the DINO recipe (p = 0.8 jitter, 0.2 grayscale;
    view 1 blur p = 1, view 2 blur p = 0.1 and solarize p = 0.2; brightness U(0.6, 1.4), hue U(-0.1, 0.1),
    sigma U(0.1, 2); a uniformly random order of the four jitter ops)."""
    geometry = MultiCropGeometry(dataclasses.replace(CROPS, local_crops=0))
    img = picture(2, size=16)
    random.seed(0)
    torch.manual_seed(0)
    draws = [geometry(img)[1] for _ in range(2000)]
    v1, v2 = [d[0] for d in draws], [d[1] for d in draws]
    rate = lambda rows, key: sum(bool(r[key]) for r in rows) / len(rows)  # noqa: E731
    jittered = [r for r in v1 + v2 if r["brightness"] != 1.0]
    assert abs(len(jittered) / 4000 - 0.8) < 0.03 and abs(rate(v1 + v2, "grayscale") - 0.2) < 0.03
    assert rate(v1, "blur_sigma") == 1.0 and abs(rate(v2, "blur_sigma") - 0.1) < 0.03
    assert rate(v1, "solarize") == 0.0 and abs(rate(v2, "solarize") - 0.2) < 0.03
    b = torch.tensor([r["brightness"] for r in jittered])
    h = torch.tensor([r["hue"] for r in jittered])
    s = torch.tensor([r["blur_sigma"] for r in v1])
    for values, lo, hi in ((b, 0.6, 1.4), (h, -0.1, 0.1), (s, 0.1, 2.0)):  # uniform: mean and variance
        assert values.min() >= lo and values.max() <= hi
        assert abs(values.mean() - (lo + hi) / 2) < 0.03 * (hi - lo)
        assert abs(values.var() - (hi - lo) ** 2 / 12) < 0.1 * (hi - lo) ** 2 / 12
    firsts = torch.tensor([r["order"][0] for r in jittered])
    assert all(abs((firsts == k).float().mean() - 0.25) < 0.03 for k in range(4))
    assert all(sorted(r["order"]) == [0, 1, 2, 3] for r in jittered)


def test_each_image_keeps_its_own_parameters(shapes_folder):
    from sslcli.data.datasets import open_dataset

    trainset = TrainSet(open_dataset(str(shapes_folder)), MultiCropGeometry(CROPS), base_seed=3)
    samples = [trainset[(0, i)] for i in (5, 1, 7)]
    batch = collate_views(samples)
    assert batch.views[0].dtype == torch.uint8 and len(batch.photometric) == 4
    for i, sample in enumerate(samples):
        for v, params in enumerate(sample["params"]):
            p = batch.photometric[v]
            assert p.brightness[i].item() == pytest.approx(params["brightness"])
            assert p.order[i].tolist() == params["order"] and bool(p.grayscale[i]) == params["grayscale"]
        alone = collate_views([sample]).colour(CROPS.mean, CROPS.std)
        together = batch.colour(CROPS.mean, CROPS.std)
        assert all(torch.allclose(a[0], t[i], atol=1e-6) for a, t in zip(alone.views, together.views))
    assert batch.seeds.tolist() == [sample_seed(3, 0, i) for i in (5, 1, 7)]


def test_colour_is_a_no_op_for_augmented_batches():
    batch = Batch.from_views([torch.randn(2, 3, 8, 8)] * 2)
    assert batch.colour((0.5,) * 3, (0.5,) * 3) is batch
    uint8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    from sslcli.data.photometric import PhotometricParams

    coloured = dataclasses.replace(Batch.from_views([uint8, uint8]), photometric=[PhotometricParams.identity(2)] * 2)
    out = coloured.colour((0.5,) * 3, (0.5,) * 3)
    assert out.photometric is None and out.views[0].dtype == torch.float32
    assert torch.equal(out.views[0], apply_photometric(uint8, PhotometricParams.identity(2), (0.5,) * 3, (0.5,) * 3))


def _tensors_in(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, (list, tuple)):
        return sum(_tensors_in(o) for o in obj)
    return 0


def test_batch_crosses_processes_as_a_few_packed_tensors_and_comes_back_equal(shapes_folder):
    """A worker's batch is pickled into 4 tensors + the masks (not one per view, field and id
    column: 41 for the demo's 4 views), and unpickles to an equal Batch, dtypes included."""
    import pickle

    from sslcli.data.datasets import open_dataset

    trainset = TrainSet(open_dataset(str(shapes_folder)), MultiCropGeometry(CROPS), base_seed=3)
    batch = collate_views([trainset[(1, i)] for i in (4, 0, 6)])
    batch = dataclasses.replace(batch, masks=torch.rand(2, 3, 9) < 0.5, second_ids=torch.tensor([4, 2, 6]))
    _, args = batch.__reduce__()
    assert _tensors_in(args) == 5
    back = pickle.loads(pickle.dumps(batch))
    for f in dataclasses.fields(Batch):
        mine, theirs = getattr(batch, f.name), getattr(back, f.name)
        if f.name == "photometric":
            for p, q in zip(mine, theirs, strict=True):
                for g in dataclasses.fields(p):
                    a, b = getattr(p, g.name), getattr(q, g.name)
                    assert a.dtype == b.dtype and torch.equal(a, b), g.name
        elif isinstance(mine, list):
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
        elif isinstance(mine, torch.Tensor):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), f.name
        else:
            assert mine == theirs, f.name


@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_a_cpu_the_workers_colour_the_batch(shapes_folder, workers):
    """device="cpu": the batch arrives coloured (float32 views, no parameters left), equal to the
    uint8 batch that a GPU run would receive, coloured afterwards."""
    from sslcli.data.datasets import open_dataset
    from sslcli.data.loader import build_train_loader

    dataset = open_dataset(str(shapes_folder))

    def first_batch(device):
        loader, _ = build_train_loader(dataset, CROPS, 8, 0, 1, seed=5, workers=workers, pin_memory=False,
                                       device=device)
        return next(iter(loader))

    coloured, raw = first_batch("cpu"), first_batch(None)
    assert coloured.photometric is None and all(v.dtype == torch.float32 for v in coloured.views)
    assert raw.photometric is not None and all(v.dtype == torch.uint8 for v in raw.views)
    expected = raw.colour(CROPS.mean, CROPS.std)
    assert torch.equal(coloured.ids, raw.ids)
    for got, want in zip(coloured.views, expected.views, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
