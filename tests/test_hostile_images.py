"""Fault injection on the image path: odd and broken files are read, or skipped and counted, never a
crash or a hang (tests/hostile_images.py writes them)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.io import decode_jpeg
from typer.testing import CliRunner

from conftest import TINY
from hostile_images import (BOMB_SIDE, EXIF_ORIENTATION, READABLE, UNREADABLE, bomb_png_bytes,
                            deny_read, find, gradient16, make_fifo, make_symlink_loops,
                            run_with_timeout, write_bomb_png, write_exif_rotated_jpeg, write_good,
                            write_hostile_tree, write_png16)
from sslcli.cli.app import app
from sslcli.config import DataConfig
from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.data.decode import DecodeGeometry, DecodePlan, read_source
from sslcli.data.loader import TrainSet, collate_views
from sslcli.data.transforms import MultiCropGeometry, MultiCropTransform
from sslcli.errors import DataError
from sslcli.eval.features import TransformedImages

CROPS = DataConfig(global_crop_size=32, local_crop_size=16, local_crops=2)
TIMEOUT = 10.0  # seconds; each guarded call takes well under one

# what each unreadable input raises, from ImageDataset.load and from read_source alike
RAISES = {"zero.jpg": UnidentifiedImageError, "truncated.jpg": OSError, "text.jpg": UnidentifiedImageError,
          "bomb.png": Image.DecompressionBombError, "noperm.png": PermissionError,
          "deleted.png": FileNotFoundError}


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch) -> tuple[ImageDataset, dict[str, str]]:
    """The indexed hostile tree, after the injections: noperm.png unreadable, deleted.png gone."""
    kinds = write_hostile_tree(tmp_path / "data")
    ds = run_with_timeout(lambda: open_dataset(str(tmp_path / "data")), TIMEOUT)
    deny_read(ds.root / find(kinds, "noperm.png"), monkeypatch)
    (ds.root / find(kinds, "deleted.png")).unlink()
    return ds, kinds


# ----------------------------------------------------------------------------- the inputs themselves


def test_inputs_are_what_they_claim(tmp_path: Path):
    for name, (writer, size) in READABLE.items():
        with Image.open(writer(tmp_path / name)) as img:
            assert img.size == size, name
            modes = {"palette.png": "P", "rgba.png": "RGBA", "la.png": "LA", "grey16.png": "I;16",
                     "cmyk.jpg": "CMYK"}
            assert img.mode == modes.get(name, "RGB"), name
    with Image.open(tmp_path / "exif6.jpg") as img:
        assert img.getexif()[EXIF_ORIENTATION] == 6
        assert ImageOps.exif_transpose(img).size == (16, 40)  # what a viewer shows
    data = bomb_png_bytes()
    assert len(data) < 10_000  # claims 20000 x 20000 pixels in a few KB; nothing allocated
    with pytest.raises(Image.DecompressionBombError):
        Image.open(write_bomb_png(tmp_path / "bomb.png"))
    assert BOMB_SIDE ** 2 > 2 * Image.MAX_IMAGE_PIXELS


def test_deny_read_blocks_every_opener(tmp_path: Path, monkeypatch):
    path = write_good(tmp_path / "a.png")
    deny_read(path, monkeypatch)
    for opener in (lambda: open(path, "rb"), path.read_bytes, lambda: Image.open(path)):
        with pytest.raises(PermissionError):
            opener()
    assert write_good(tmp_path / "b.png").read_bytes()  # other files unaffected


# ----------------------------------------------------------------------------- indexing


def test_open_dataset_indexes_hostile_tree(tmp_path: Path, caplog):
    kinds = write_hostile_tree(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="sslcli.data.folder"):
        ds = run_with_timeout(lambda: open_dataset(str(tmp_path / "data")), TIMEOUT)
    assert ds.paths == sorted(kinds) and len(ds) == 32  # the FIFO and the loops left out
    assert ds.classes == ["odd", "plain"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("x.jpg" in m and "not regular files" in m for m in messages)
    assert sum("not following symlink loop" in m for m in messages) == 2


def test_fifo_left_out_otherwise_imagefolder_order(tmp_path: Path, caplog):
    root = tmp_path / "data"
    for rel in ["b/1.png", "b/x/2.png", "a/3.png", "a/z.png"]:
        write_good(root / rel, (16, 16))
    fifo = make_fifo(root / "a" / "x.jpg")
    reference = [(os.path.relpath(p, root), t) for p, t in ImageFolder(str(root)).samples]  # lists x.jpg
    assert ("a/x.jpg", 0) in reference
    with caplog.at_level(logging.WARNING, logger="sslcli.data.folder"):
        ds = run_with_timeout(lambda: open_dataset(str(root)), TIMEOUT, fifo=fifo)
    assert list(zip(ds.paths, ds.labels.tolist())) == [s for s in reference if s[0] != "a/x.jpg"]
    assert "a/x.jpg" not in ds.paths and "x.jpg" in caplog.text
    ts = TrainSet(ds, MultiCropTransform(CROPS), base_seed=0)
    samples = run_with_timeout(lambda: [ts[(0, i)] for i in range(len(ds))], TIMEOUT, fifo=fifo)
    assert [s["bad"] for s in samples] == [0] * len(ds)


def test_symlinks_loops_files_and_dangling(tmp_path: Path, caplog):
    root = tmp_path / "data"
    write_good(root / "c" / "a.png", (16, 16))
    write_good(root / "c" / "sub" / "b.png", (16, 16))
    make_symlink_loops(root / "c")
    (root / "c" / "link.png").symlink_to("a.png")  # a symlink to an image: indexed (is_file follows it)
    (root / "c" / "dangling.jpg").symlink_to("missing.jpg")  # not a regular file: left out
    with caplog.at_level(logging.WARNING, logger="sslcli.data.folder"):
        ds = run_with_timeout(lambda: open_dataset(str(root)), TIMEOUT)
    assert ds.paths == ["c/a.png", "c/link.png", "c/sub/b.png"]
    assert caplog.text.count("not following symlink loop") == 2 and "dangling.jpg" in caplog.text
    assert ds.load(1).size == (16, 16)


# ----------------------------------------------------------------------------- the two readers


@pytest.mark.parametrize("name", list(READABLE))
def test_readable_inputs_load_as_rgb_of_stored_size(hostile, name):
    ds, kinds = hostile
    i = ds.paths.index(find(kinds, name))
    w, h = READABLE[name][1]
    img = ds.load(i)
    assert img.mode == "RGB" and img.size == (w, h)  # EXIF orientation not applied: stored size
    src = ds.load_source(i)
    assert (src.width, src.height) == (w, h)
    if src.encoded:  # RGB JPEG (exif6, tiny3x7): bytes for the device, which does not rotate either
        assert name.endswith(".jpg") and name != "cmyk.jpg"
        assert tuple(decode_jpeg(src.data).shape) == (3, h, w)
    else:  # decoded here exactly as load decodes it
        assert torch.equal(src.data, torch.from_numpy(np.asarray(img)).permute(2, 0, 1))


def test_readable_inputs_pixels(hostile):
    ds, kinds = hostile
    pixel = {name: ds.load(ds.paths.index(find(kinds, name))).getpixel((0, 0))
             for name in ("palette.png", "rgba.png", "la.png", "cmyk.jpg")}
    assert pixel["palette.png"] == (255, 0, 0)  # through the palette; its transparency dropped
    assert pixel["rgba.png"] == (10, 200, 30)  # alpha dropped, not composited (as torchvision)
    assert pixel["la.png"] == (77, 77, 77)
    assert max(abs(a - b) for a, b in zip(pixel["cmyk.jpg"], (255, 0, 0))) <= 8  # CMYK red -> RGB red


def test_png16_scaled_to_8_bits(tmp_path: Path):
    write_png16(tmp_path / "g.png", (64, 16))
    ds = open_dataset(str(tmp_path))
    expected = (gradient16((64, 16)) >> 8).astype(int)
    assert expected.min() == 0 and expected.max() == 255
    rgb = np.asarray(ds.load(0)).astype(int)
    assert all(np.abs(rgb[..., c] - expected).max() <= 1 for c in range(3))
    src = read_source(tmp_path / "g.png")
    assert not src.encoded and np.abs(src.data.numpy().astype(int) - expected[None]).max() <= 1


def test_exif_orientation_not_applied(tmp_path: Path):
    write_exif_rotated_jpeg(tmp_path / "r.jpg", (40, 16))
    ds = open_dataset(str(tmp_path))
    assert ds.load(0).size == (40, 16)
    src = ds.load_source(0)
    assert src.encoded and (src.width, src.height) == (40, 16)


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_inputs_raise_in_both_readers(hostile, name):
    ds, kinds = hostile
    i = ds.paths.index(find(kinds, name))
    with pytest.raises(RAISES[name]):
        ds.load(i)
    with pytest.raises(RAISES[name]):
        ds.load_source(i)


@pytest.mark.parametrize("name", UNREADABLE)
def test_evals_refuse_unreadable_with_data_error(hostile, name):
    """Evals never skip: an unreadable image is a one-line DataError naming the file."""
    ds, kinds = hostile
    rel = find(kinds, name)
    with pytest.raises(DataError, match=rel):
        TransformedImages(ds, lambda img: img)[ds.paths.index(rel)]


# ----------------------------------------------------------------------------- training samples


@pytest.mark.parametrize("transform", ["worker", "geometry", "decode"])
def test_trainset_sample_for_every_index(hostile, transform):
    """Readable odd images are used as they are; each unreadable one is replaced by the next image
    (its good neighbour) and counted once."""
    ds, kinds = hostile
    make = {"worker": MultiCropTransform, "geometry": MultiCropGeometry, "decode": DecodeGeometry}[transform]
    ts = TrainSet(ds, make(CROPS), base_seed=0)
    samples = run_with_timeout(lambda: [ts[(0, i)] for i in range(len(ds))], TIMEOUT, fifo=ds.root / "odd/x.jpg")
    for i, (rel, s) in enumerate(zip(ds.paths, samples)):
        bad = kinds[rel] == "unreadable"
        assert (s["index"], s["bad"]) == ((i + 1, 1) if bad else (i, 0)), rel
        if transform == "decode":
            assert isinstance(s["crops"], DecodePlan) and len(s["crops"].boxes) == 4
        else:
            assert [tuple(c.shape) for c in s["crops"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert int(collate_views(samples).bad) == len(UNREADABLE)


# ----------------------------------------------------------------------------- end to end


def test_pretrain_cli_on_hostile_tree(tmp_path: Path, monkeypatch):
    """`ssl pretrain` over every input: exit 0, bad_images = the unreadable files.

    32 indexed images, batch 8: one epoch draws a permutation of all 32 ids (nothing dropped), so
    each unreadable id is drawn exactly once; its next id is always a good image, so each draw
    skips one file. (A file is visited again when the id before it is unreadable too, or in every
    further epoch: bad_images counts skips, not distinct files.)"""
    kinds = write_hostile_tree(tmp_path / "data")
    root = tmp_path / "data"
    deny_read(root / find(kinds, "noperm.png"), monkeypatch)
    deleted = root / find(kinds, "deleted.png")
    real_init = TrainSet.__init__

    def init_then_delete(self, *args, **kwargs):  # after every indexing, before any loading
        real_init(self, *args, **kwargs)
        deleted.unlink(missing_ok=True)

    monkeypatch.setattr(TrainSet, "__init__", init_then_delete)
    args = ["pretrain", "--preset", "demo", "--data", str(root), "--out", str(tmp_path / "run"), "--quiet"]
    for item in TINY + ["optim.batch_size=8", "train.epochs=1"]:
        args += ["--set", item]
    result = run_with_timeout(lambda: CliRunner().invoke(app, args), 120.0, fifo=root / "odd" / "x.jpg")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["images"] == len(kinds) == 32 and summary["steps"] == 4
    assert summary["bad_images"] == list(kinds.values()).count("unreadable") == len(UNREADABLE) == 6
    assert not deleted.exists()
