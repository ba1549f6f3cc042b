"""Tests of sslcli.data: built-in shapes, folder index (order + cache), transforms, loader."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from sslcli.config import DataConfig
from sslcli.data import folder as folder_mod
from sslcli.data.builtin import make_shapes
from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.data.folder import scan_image_folder
from sslcli.data.loader import (EpochBatchSampler, TrainSet, build_train_loader, collate_views,
                                sample_seed)
from sslcli.data.transforms import MultiCropTransform, eval_transform
from sslcli.errors import DataError

SMALL_CROPS = DataConfig(global_crop_size=32, local_crop_size=16, local_crops=2)


def _touch(path: Path, data: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _age(root: Path, seconds: float = 100.0) -> None:
    """Set the mtime of root and every directory below it `seconds` into the past."""
    past = time.time() - seconds
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (past, past))


def _write_png(path: Path, colour: tuple[int, int, int], size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _shapes_dataset(n: int) -> ImageDataset:
    images, labels, classes = make_shapes("train", n=n)
    paths = [f"builtin:shapes:train/{i:06d}" for i in range(n)]
    return ImageDataset("shapes-small", paths, np.array(labels), classes, images=images)


# ----------------------------------------------------------------------------- built-in shapes


def test_shapes_deterministic_balanced_and_splits_differ():
    imgs, labels, classes = make_shapes("train", n=200, size=48, seed=3)
    again, labels2, _ = make_shapes("train", n=200, size=48, seed=3)
    assert labels == labels2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, again))
    assert classes == sorted(classes) and len(classes) == 10
    assert np.bincount(labels, minlength=10).tolist() == [20] * 10
    assert imgs[0].mode == "RGB" and imgs[0].size == (48, 48)
    val, _, _ = make_shapes("val", n=200, size=48, seed=3)
    other, _, _ = make_shapes("train", n=200, size=48, seed=4)
    assert not np.array_equal(np.asarray(val[0]), np.asarray(imgs[0]))
    assert not np.array_equal(np.asarray(other[0]), np.asarray(imgs[0]))


def test_shapes_defaults_and_speed():
    t0 = time.perf_counter()
    imgs, labels, _ = make_shapes()
    assert time.perf_counter() - t0 < 2.0
    assert len(imgs) == 2000 and np.bincount(labels).tolist() == [200] * 10
    assert len(make_shapes("val")[0]) == 500


def test_open_builtin_specs():
    ds = open_dataset("builtin:shapes")
    assert len(ds) == 2000 and ds.num_classes == 10 and ds.labels.dtype == np.int64
    assert ds.paths[123] == "builtin:shapes:train/000123"
    img, label = ds[5]
    assert img.mode == "RGB" and label == ds.labels[5]
    assert len(open_dataset("builtin:shapes:val")) == 500
    with pytest.raises(DataError, match="did you mean: builtin:shapes"):
        open_dataset("builtin:shape")
    with pytest.raises(DataError, match="did you mean: builtin:shapes"):
        open_dataset("builtins:shapes")  # not a builtin prefix: a missing folder, with a hint


# ----------------------------------------------------------------------------- folder index


@pytest.fixture
def nested_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for rel in ["B_cls/z.JPG", "B_cls/a.png", "B_cls/sub/x.jpeg", "B_cls/sub-x/y.PNG",
                "B_cls/sub/deeper/k.webp", "B_cls/dir.jpg/m.bmp", "B_cls/notes.txt",
                "a_cls/1.Jpeg", "a_cls/10.jpg", "a_cls/2.jpg", "a_cls/.hidden.jpg",
                "a_cls/readme.md", "c_cls/only.TIF", "c_cls/Ä.ppm", "root_level.jpg"]:
        _touch(root / rel)
    return root


def test_folder_order_matches_torchvision(nested_tree: Path):
    index = scan_image_folder(nested_tree)
    reference = ImageFolder(str(nested_tree))
    assert index.classes == reference.classes
    assert index.paths == [os.path.relpath(p, nested_tree) for p, _ in reference.samples]
    assert index.labels.tolist() == [t for _, t in reference.samples]
    assert index.labels.dtype == np.int64
    assert "B_cls/sub-x/y.PNG" in index.paths and "B_cls/notes.txt" not in index.paths
    # '-' sorts before '/': sub-x's images come before sub/deeper's, as with sorted(os.walk)
    assert index.paths.index("B_cls/sub-x/y.PNG") < index.paths.index("B_cls/sub/deeper/k.webp")


def test_folder_empty_class_kept_like_allow_empty(nested_tree: Path):
    (nested_tree / "b_empty").mkdir()
    index = scan_image_folder(nested_tree)
    reference = ImageFolder(str(nested_tree), allow_empty=True)
    assert index.classes == reference.classes and "b_empty" in index.classes
    assert index.labels.tolist() == [t for _, t in reference.samples]


def test_unlabeled_folder(tmp_path: Path):
    for name in ["b.jpg", "a.PNG", "c.txt"]:
        _touch(tmp_path / name)
    index = scan_image_folder(tmp_path)
    assert index.paths == ["a.PNG", "b.jpg"]
    assert index.labels.tolist() == [-1, -1] and index.classes == []


def test_missing_or_empty_root(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    _touch(tmp_path / "file.jpg")
    with pytest.raises(DataError, match="not a directory"):
        scan_image_folder(tmp_path / "file.jpg")
    empty = tmp_path / "empty"
    _touch(empty / "cls" / "readme.txt")
    with pytest.raises(DataError, match="holds no images") as info:
        open_dataset(str(empty))
    assert info.value.exit_code == 2 and "\n" not in str(info.value) and str(empty) in str(info.value)


def test_index_cache_reused_then_rebuilt(nested_tree: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    _age(nested_tree)
    first = scan_image_folder(nested_tree, cache_dir=cache)
    files = list(cache.glob("index-*.json"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    real_scan = folder_mod._scan
    monkeypatch.setattr(folder_mod, "_scan", lambda root: pytest.fail("cache not used"))
    cached = scan_image_folder(nested_tree, cache_dir=cache)
    assert cached.paths == first.paths and cached.classes == first.classes
    assert np.array_equal(cached.labels, first.labels) and cached.labels.dtype == np.int64

    monkeypatch.setattr(folder_mod, "_scan", real_scan)
    _touch(nested_tree / "a_cls" / "3.jpg")  # changes a_cls's mtime -> stale
    rebuilt = scan_image_folder(nested_tree, cache_dir=cache)
    assert "a_cls/3.jpg" in rebuilt.paths and len(rebuilt) == len(first) + 1
    _touch(nested_tree / "B_cls" / "sub" / "deeper" / "new.jpg")  # nested directory too
    assert "B_cls/sub/deeper/new.jpg" in scan_image_folder(nested_tree, cache_dir=cache).paths


def test_index_cache_skips_racy_scan(nested_tree: Path, tmp_path: Path):
    scan_image_folder(nested_tree, cache_dir=tmp_path / "cache")  # tree modified just now
    assert not list((tmp_path / "cache").glob("index-*.json"))


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("local_crops", [0, 3])
def test_multicrop_shapes(local_crops: int):
    cfg = DataConfig(global_crop_size=40, local_crop_size=24, local_crops=local_crops)
    crops = MultiCropTransform(cfg)(make_shapes(n=1)[0][0])
    assert [tuple(c.shape) for c in crops] == [(3, 40, 40)] * 2 + [(3, 24, 24)] * local_crops
    assert all(c.dtype == torch.float32 for c in crops)


def test_multicrop_reproducible_from_global_rngs():
    transform, img = MultiCropTransform(SMALL_CROPS), make_shapes(n=1)[0][0]
    outs = []
    for _ in range(2):
        random.seed(7)
        torch.manual_seed(7)
        outs.append(transform(img))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_eval_transform():
    t = eval_transform(32)
    x = t(Image.new("RGB", (80, 50), (200, 10, 10)))
    assert x.shape == (3, 32, 32)
    assert t.transforms[0].size == 37  # round(32 * 256 / 224)


# ----------------------------------------------------------------------------- loader


def test_trainset_same_key_same_crops_and_rng_restored():
    ts = TrainSet(_shapes_dataset(20), MultiCropTransform(SMALL_CROPS), base_seed=1)
    torch.manual_seed(0)
    random.seed(0)
    a = ts[(3, 5)]
    after = (torch.rand(1), random.random())
    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(1), random.random())
    assert after == expected  # the caller's streams were not disturbed
    b = ts[(3, 5)]
    assert a["index"] == 5 and a["bad"] == 0 and a["label"] == int(ts.dataset.labels[5])
    assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
    c = ts[(4, 5)]
    assert not torch.equal(a["crops"][0], c["crops"][0])
    assert sample_seed(1, 3, 5) != sample_seed(1, 5, 3)


def _two_epochs_with_resume(workers: int) -> list[dict]:
    """Epoch 0 in full, then epoch 1 from step 2 (set_position between iterations)."""
    loader, sampler = build_train_loader(_shapes_dataset(32), SMALL_CROPS, batch_size_total=8,
                                         rank=0, world=1, seed=5, workers=workers,
                                         pin_memory=False)
    batches = list(loader)
    assert sampler.epoch == 1 and sampler.step == 0
    sampler.set_position(1, 2)
    batches += list(loader)  # persistent workers: the same worker processes are reused
    assert sampler.epoch == 2
    return batches


def test_loader_identical_across_worker_counts():
    runs = [_two_epochs_with_resume(workers) for workers in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == 4 + 2
    for b0, b1 in zip(*runs):
        assert torch.equal(b0.ids, b1.ids) and torch.equal(b0.labels, b1.labels)
        assert torch.equal(b0.seeds, b1.seeds)
        assert all(torch.equal(x, y) for x, y in zip(b0.views, b1.views))  # uint8 crops (augment_on: device)
        for p0, p1 in zip(b0.photometric, b1.photometric):  # and the colour parameters drawn with them
            assert all(torch.equal(getattr(p0, f), getattr(p1, f)) for f in ("order", "brightness", "blur_sigma"))
    expected = [[i for _, i in b] for b in EpochBatchSampler(32, 8, 0, 1, seed=5, start_epoch=1)]
    assert [b.ids.tolist() for b in runs[0][4:]] == expected[2:]
    first = runs[0][0]
    assert [tuple(c.shape) for c in first.global_views] == [(8, 3, 32, 32)] * 2
    assert [tuple(c.shape) for c in first.local_views] == [(8, 3, 16, 16)] * 2
    assert first.bad.shape == () and int(first.bad) == 0 and first.masks is None
    assert first.seeds.tolist() == [sample_seed(5, 0, i) for i in first.ids.tolist()]
    assert torch.equal(first.second_ids, first.ids)  # no bootstrapping: view 2 is of the same image


def test_corrupt_file_replaced_and_counted(tmp_path: Path, caplog):
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _write_png(tmp_path / "cls_a" / f"{i}.png", colour)
    _touch(tmp_path / "cls_a" / "1a.jpg", b"\x00garbage bytes, not a jpeg" * 10)
    _write_png(tmp_path / "cls_b" / "x.png", (9, 9, 9))
    ds = open_dataset(str(tmp_path))
    bad_id = ds.paths.index("cls_a/1a.jpg")
    with pytest.raises(Exception):
        ds.load(bad_id)
    ts = TrainSet(ds, MultiCropTransform(SMALL_CROPS), base_seed=0)
    with caplog.at_level(logging.WARNING, logger="sslcli.data.loader"):
        s1, s2 = ts[(0, bad_id)], ts[(1, bad_id)]
    assert s1["index"] == bad_id + 1 and s1["bad"] == 1 and s2["bad"] == 1
    assert sum("1a.jpg" in r.getMessage() for r in caplog.records) == 1  # warned once
    batch = collate_views([ts[(0, 0)], s1])
    assert int(batch.bad) == 1 and batch.ids.tolist() == [0, bad_id + 1]


def test_all_files_corrupt_gives_data_error(tmp_path: Path):
    for i in range(3):
        _touch(tmp_path / f"{i}.jpg", b"junk")
    ts = TrainSet(open_dataset(str(tmp_path)), MultiCropTransform(SMALL_CROPS), base_seed=0)
    with pytest.raises(DataError, match="consecutive unreadable images"):
        ts[(0, 1)]


# ----------------------------------------------------------------------------- sampler


def test_sampler_ranks_partition_global_batch():
    single = list(EpochBatchSampler(103, 12, rank=0, world=1, seed=9))
    ranks = [list(EpochBatchSampler(103, 12, rank=r, world=2, seed=9)) for r in range(2)]
    assert len(single) == 103 // 12
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
        assert all(e == 0 for e, _ in batch)
    flat = [i for batch in single for _, i in batch]
    assert len(set(flat)) == len(flat)


def test_sampler_epochs_and_resume():
    sampler = EpochBatchSampler(50, 8, rank=0, world=1, seed=2)
    assert sampler.steps_per_epoch == 6 and len(sampler) == 6
    epoch0, epoch1 = list(sampler), list(sampler)
    assert epoch1[0][0][0] == 1 and epoch0 != [[(0, i) for _, i in b] for b in epoch1]
    resumed = EpochBatchSampler(50, 8, rank=0, world=1, seed=2)
    resumed.set_position(1, 4)
    assert len(resumed) == 2 and list(resumed) == epoch1[4:]
    assert resumed.epoch == 2 and resumed.step == 0
    late = EpochBatchSampler(50, 8, rank=0, world=1, seed=2, start_epoch=0, start_step=6)
    assert late.epoch == 1 and list(late) == epoch1


def test_sampler_rejects_bad_sizes():
    with pytest.raises(DataError, match="dataset has 5 images, fewer than the batch size 8"):
        EpochBatchSampler(5, 8, rank=0, world=1, seed=0)
    with pytest.raises(DataError, match="not divisible"):
        EpochBatchSampler(50, 9, rank=0, world=2, seed=0)


def test_batch_moves_every_tensor_and_keeps_view_order():
    from sslcli.data import Batch

    views = [torch.randn(3, 3, 8, 8) for _ in range(2)] + [torch.randn(3, 3, 4, 4)]
    batch = Batch.from_views(views)
    batch.masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    moved = batch.to("meta")
    assert all(t.device.type == "meta" for t in moved.views + [moved.ids, moved.seeds, moved.masks, moved.bad])
    assert batch.ids.device.type == "cpu"  # a new batch, the original untouched
    assert [v.shape[-1] for v in batch.views] == [8, 8, 4] and batch.size == 3
    assert len(batch.global_views) == 2 and len(batch.local_views) == 1


def test_random_resized_crop_interpolation_is_a_key():
    from torchvision.transforms import InterpolationMode

    bilinear = MultiCropTransform(dataclasses.replace(SMALL_CROPS, interpolation="bilinear"))
    assert bilinear.global1.transforms[0].interpolation == InterpolationMode.BILINEAR
    assert MultiCropTransform(SMALL_CROPS).local.transforms[0].interpolation == InterpolationMode.BICUBIC
