"""`data.decode_on: device`: workers ship JPEG bytes + crop boxes, `Batch.decode` decodes and crops.

Run on the CPU here (decode_views with device cpu: libjpeg-turbo through torchvision, the same code
path as nvJPEG on CUDA up to the decoder). Measured on this module's folder (7 RGB JPEGs, 1 greyscale
JPEG, 1 PNG, 60-140 px, quality 90; 3 epochs x 9 images x 4 views of 32 / 16 px), in 0..255 units:
- decoding alone: PIL vs torchvision.io.decode_jpeg on the CPU, bit-identical (mean 0, max 0);
- crops, worker path (PIL crop + resize) vs device-decode path (resized_crop on the uint8 tensor,
  antialias=True): bicubic mean 0.0036, max 1; bilinear mean 0.0050, max 1 (PIL and torch round
  their fixed-point filters differently; with 96 / 48 px crops, mostly upscaled: bicubic mean
  0.0053, max 2; bilinear mean 0.0034, max 1);
- boxes, flips and photometric parameters: identical (the same draws, GeometryView.draw).
Asserted: mean < 0.02 and max <= 2. On CUDA, nvJPEG's IDCT and the float resize of uint8 images
differ more (not measured here: no GPU in these tests).
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from sslcli.config import DataConfig, load_config
from sslcli.data import decode
from sslcli.data.datasets import open_dataset
from sslcli.data.decode import DecodeGeometry, DecodePlan, EncodedViews, decode_images, decodes_on_device
from sslcli.data.loader import TrainSet, build_train_loader, collate_views
from sslcli.data.transforms import MultiCropGeometry
from sslcli.errors import ConfigError

CROPS = DataConfig(global_crop_size=32, local_crop_size=16, local_crops=2, decode_on="device")
MEAN_TOL, MAX_TOL = 0.02, 2  # 0..255 units; measured: see the module doc


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Bicubic-upsampled random colours + mild noise: JPEG-friendly, different per image."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (height, width, 3), dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder a/00-04.jpg, b/05-06.jpg, b/07.jpg (greyscale), b/08.png: ids 0..8 in that order."""
    root = tmp_path_factory.mktemp("decode") / "train"
    rng = np.random.default_rng(0)
    for i in range(9):
        folder = root / "ab"[i // 5]
        folder.mkdir(parents=True, exist_ok=True)
        img = smooth_image(rng, int(rng.integers(60, 140)), int(rng.integers(50, 120)))
        if i == 8:
            img.save(folder / f"{i:02d}.png")
        else:
            (img.convert("L") if i == 7 else img).save(folder / f"{i:02d}.jpg", quality=90)
    return root


def both_paths(dataset, cfg: DataConfig, keys: list[tuple[int, ...]], seed: int = 0):
    """(worker samples, device-decode samples) of `keys` under the same base seed."""
    worker = TrainSet(dataset, MultiCropGeometry(cfg), base_seed=seed)
    device = TrainSet(dataset, DecodeGeometry(cfg), base_seed=seed)
    return [worker[k] for k in keys], [device[k] for k in keys]


def crop_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(mean, max) |a - b| over all views, 0..255 units."""
    diff = torch.cat([(x.float() - y.float()).abs().flatten() for x, y in zip(a, b)])
    return float(diff.mean()), float(diff.max())


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_same_draws_and_crops_as_worker_decoding(folder, interpolation):
    cfg = dataclasses.replace(CROPS, interpolation=interpolation)
    dataset = open_dataset(str(folder))
    keys = [(epoch, i) for epoch in range(3) for i in range(len(dataset))]
    worker, device = both_paths(dataset, cfg, keys)
    for key, w, d in zip(keys, worker, device):
        assert d["params"] == w["params"]  # photometric draws: identical
        random.seed(w["seed"])
        torch.manual_seed(w["seed"])
        boxes_flips = [(box, flip) for box, flip, _ in MultiCropGeometry(cfg).draw(dataset.load(key[1]).size)]
        assert list(zip(d["crops"].boxes, d["crops"].flips)) == boxes_flips
    reference = collate_views(worker)
    decoded = collate_views(device).decode("cpu")
    assert [v.dtype for v in decoded.views] == [torch.uint8] * 4
    assert [tuple(v.shape) for v in decoded.views] == [tuple(v.shape) for v in reference.views]
    mean, peak = crop_difference(reference.views, decoded.views)
    assert mean < MEAN_TOL and peak <= MAX_TOL, (mean, peak)
    assert int(decoded.bad) == 0 and decoded.encoded is None
    assert torch.equal(decoded.seeds, reference.seeds)
    for p, q in zip(decoded.photometric, reference.photometric):
        assert torch.equal(p.order, q.order) and torch.equal(p.brightness, q.brightness)


def test_a_batch_mixing_png_and_jpegs_decodes(folder):
    dataset = open_dataset(str(folder))
    samples = TrainSet(dataset, DecodeGeometry(CROPS), base_seed=1)
    batch = collate_views([samples[(0, i)] for i in (8, 0, 7, 3)])  # PNG, RGB JPEG, greyscale JPEG, RGB JPEG
    kinds = [t.dim() for t in batch.encoded.images]
    assert kinds == [3, 1, 1, 1]  # the PNG was decoded in the worker, the JPEGs were not
    assert batch.views == [] and len(batch.photometric) == 4
    pinned_or_moved = batch.to("cpu")
    assert pinned_or_moved.encoded is batch.encoded  # bytes are never moved
    decoded = batch.decode("cpu")
    assert [tuple(v.shape) for v in decoded.views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    coloured = decoded.to("cpu").colour(CROPS.mean, CROPS.std)
    assert coloured.views[0].dtype == torch.float32 and torch.isfinite(coloured.views[0]).all()
    for b, i in enumerate((8, 0, 7, 3)):  # each sample decodes as it would alone
        alone = collate_views([samples[(0, i)]]).decode("cpu")
        assert all(torch.equal(a[0], t[b]) for a, t in zip(alone.views, decoded.views))


def test_second_view_comes_from_the_second_image(folder):
    dataset = open_dataset(str(folder))
    (w_pair, w_self), (d_pair, _) = both_paths(dataset, CROPS, [(2, 1, 4), (2, 1)])
    assert len(d_pair["crops"].images) == 2 and d_pair["crops"].source == [0, 1, 0, 0]
    assert d_pair["second"] == 4 and d_pair["index"] == 1
    decoded = collate_views([d_pair]).decode("cpu")
    assert decoded.second_ids.tolist() == [4] and decoded.encoded is None
    same, _ = crop_difference([decoded.views[1][0]], [w_pair["crops"][1]])
    other, _ = crop_difference([decoded.views[1][0]], [w_self["crops"][1]])
    assert same < MEAN_TOL and other > 10, (same, other)  # view 2 of image 4, not of image 1
    first, _ = crop_difference([decoded.views[0][0]], [w_pair["crops"][0]])
    assert first < MEAN_TOL


def test_decode_on_device_needs_augment_on_device():
    with pytest.raises(ConfigError, match=r"data\.decode_on: device needs data\.augment_on: device"):
        load_config("demo", overrides=["data.decode_on=device", "data.augment_on=worker"])
    assert load_config("demo", overrides=["data.decode_on=device"]).data.decode_on == "device"


def test_cpu_training_keeps_decoding_in_the_workers(folder, monkeypatch, caplog):
    monkeypatch.setattr(decode, "_said_ignored", False)
    dataset = open_dataset(str(folder))
    with caplog.at_level("INFO", logger="sslcli.data.decode"):
        loader, _ = build_train_loader(dataset, CROPS, 4, 0, 1, seed=0, workers=0, pin_memory=False, device="cpu")
        build_train_loader(dataset, CROPS, 4, 0, 1, seed=0, workers=0, pin_memory=False, device="cpu")
    assert sum("decode_on=device is ignored" in r.getMessage() for r in caplog.records) == 1  # once
    assert isinstance(loader.dataset.transform, MultiCropGeometry)
    batch = next(iter(loader))
    assert batch.encoded is None and batch.views[0].dtype == torch.float32  # decoded and coloured in the workers
    assert batch.decode("cpu") is batch  # a no-op, so the trainer calls it unconditionally
    forced, _ = build_train_loader(dataset, CROPS, 4, 0, 1, seed=0, workers=0, pin_memory=False, device="cpu",
                                   decode_on_cpu=True)  # benchmarks/loader.py's device-decode mode
    assert isinstance(forced.dataset.transform, DecodeGeometry)
    assert decodes_on_device(CROPS, torch.device("cuda", 0))  # policy only: nothing runs on CUDA
    assert not decodes_on_device(dataclasses.replace(CROPS, decode_on="worker"), "cuda")


def test_undecodable_jpegs_become_grey_and_count_as_bad(folder):
    dataset = open_dataset(str(folder))
    sample = TrainSet(dataset, DecodeGeometry(CROPS), base_seed=0)[(0, 1)]
    plan: DecodePlan = sample["crops"]
    plan.images[0] = torch.frombuffer(bytearray(b"\xff\xd8" + b"\x00" * 64 + b"\xff\xd9"), dtype=torch.uint8)
    batch = collate_views([sample])
    images, failed = decode_images(batch.encoded, "cpu")
    assert failed == [0] and images[0].unique().tolist() == [decode.FAILED_GREY]
    assert int(batch.decode("cpu").bad) == 1


def test_truncated_jpegs_are_decoded_in_the_worker_and_skipped(tmp_path, folder):
    data = (folder / "a" / "00.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # no end-of-image marker
    (tmp_path / "whole.jpg").write_bytes(data)
    dataset = open_dataset(str(tmp_path))
    sample = TrainSet(dataset, DecodeGeometry(CROPS), base_seed=0)[(0, 0)]  # cut.jpg: PIL fails, skipped
    assert sample["bad"] == 1 and sample["index"] == 1 and sample["crops"].images[0].dim() == 1
    assert isinstance(EncodedViews.collate([sample["crops"]], [(1, 1)], 2), EncodedViews)


def test_training_decodes_batches_on_the_device(folder, tiny_config, tmp_path, monkeypatch):
    """The trainer's decode -> to -> colour wiring, run on the CPU by lifting the CUDA-only policy;
    the losses follow the worker-decoding run up to the crops' rounding differences."""
    from sslcli.train.pretrain import RunOptions, pretrain

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    cfg = tiny_config(f"data.path={folder}", "optim.batch_size=4", "train.epochs=1")
    pretrain(cfg, RunOptions(out=tmp_path / "worker", device="cpu"))
    decoded = []
    monkeypatch.setattr("sslcli.data.loader.decodes_on_device", lambda c, d, allow_cpu=False: True)
    monkeypatch.setattr("sslcli.data.batch.decode_views", lambda e, d: decoded.append(d) or decode.decode_views(e, d))
    pretrain(tiny_config(f"data.path={folder}", "optim.batch_size=4", "train.epochs=1", "data.decode_on=device"),
             RunOptions(out=tmp_path / "device", device="cpu"))
    worker, device = losses(tmp_path / "worker"), losses(tmp_path / "device")
    assert len(device) == len(worker) == 2 and decoded == [torch.device("cpu")] * 2
    assert device == pytest.approx(worker, rel=2e-4), (worker, device)  # measured: 1.3e-5, 2.5e-5
