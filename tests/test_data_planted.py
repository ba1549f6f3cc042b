"""The planted-fault dataset (sslcli.data.planted, `ssl data make audit`): layout, ground truth
against the pixels on disk, determinism, bad arguments."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sslcli.cli import data as data_cli
from sslcli.cli.app import app
from sslcli.data.builtin import SHAPE_CLASSES, make_shapes
from sslcli.data.datasets import open_dataset
from sslcli.data.planted import make_audit_folder, perturb
from sslcli.errors import UsageError

SMALL = dict(n_train=60, n_val=20, duplicates=4, flips=5, leaked=3, size=32)


def files(root: Path) -> list[str]:
    """Sorted relative paths of every file under root."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def pixels(path: Path) -> np.ndarray:
    """The image at path as float32 [H, W, 3], checking it is RGB."""
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image, dtype=np.float32)


def index_of(rel: str) -> int:
    """Train index i of '<split>/<class>/[dup-|leak-]<i:06d>.png'."""
    return int(Path(rel).stem.split("-")[-1])


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    root = make_audit_folder(tmp_path_factory.mktemp("audit") / "data", seed=3, **SMALL)
    return root, json.loads((root / "faults.json").read_text())


def test_layout_and_counts(planted):
    root, faults = planted
    assert sorted(p.name for p in root.iterdir()) == ["faults.json", "train", "val"]
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == SHAPE_CLASSES
    train, val = open_dataset(str(root / "train")), open_dataset(str(root / "val"))
    assert train.classes == SHAPE_CLASSES and len(train) == 60 + 4
    assert val.classes == SHAPE_CLASSES and len(val) == 20 + 3
    assert faults["counts"] == {"train_images": 64, "val_images": 23, "classes": 10,
                                "duplicates": 4, "label_flips": 5, "leaked": 3}
    assert faults["seed"] == 3
    assert len(faults["duplicates"]) == 4 and len(faults["label_flips"]) == 5 and len(faults["leaked"]) == 3
    names = {Path(p).name for p in files(root / "train")}
    assert names == {f"{i:06d}.png" for i in range(60)} | {Path(c).name for _, c in faults["duplicates"]}
    assert {Path(p).name for p in files(root / "val")} == (
        {f"{j:06d}.png" for j in range(20)} | {Path(c).name for c, _ in faults["leaked"]})
    with Image.open(root / faults["duplicates"][0][1]) as image:
        assert image.size == (32, 32) and image.format == "PNG"


def test_every_ground_truth_path_exists_and_is_relative(planted):
    root, faults = planted
    paths = ([p for pair in faults["duplicates"] + faults["leaked"] for p in pair]
             + [f["path"] for f in faults["label_flips"]])
    assert len(paths) == 2 * 4 + 2 * 3 + 5
    for rel in paths:
        assert not Path(rel).is_absolute() and (root / rel).is_file(), rel
    sources = [index_of(s) for s, _ in faults["duplicates"]], [index_of(f["path"]) for f in faults["label_flips"]], \
        [index_of(s) for _, s in faults["leaked"]]
    assert len(set().union(*map(set, sources))) == 4 + 5 + 3  # disjoint planted sets


def test_originals_and_flips_match_builtin_shapes(planted):
    root, faults = planted
    images, labels, classes = make_shapes("train", n=60, size=32, seed=3)
    flipped = {index_of(f["path"]): f for f in faults["label_flips"]}
    for f in flipped.values():
        folder = Path(f["path"]).parent.name
        assert folder == f["folder_class"] != f["true_class"]
    backgrounds = []
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = flipped[i]["folder_class"] if i in flipped else classes[label]
        if i in flipped:
            assert flipped[i]["true_class"] == classes[label]  # the picture is of its true class
        written, shape = pixels(root / "train" / folder / f"{i:06d}.png"), np.asarray(image)
        solid = shape.max(axis=2) >= 64  # the shape itself is drawn unchanged over the texture
        np.testing.assert_array_equal(written[solid], shape[solid])
        backgrounds.append(written.astype(float))
    # every image has its own background: no two images alike outside their shapes
    assert min(np.abs(a - b).mean() for a, b in zip(backgrounds, backgrounds[1:])) > 5
    val_images, val_labels, _ = make_shapes("val", n=20, size=32, seed=3)
    for j, (image, label) in enumerate(zip(val_images, val_labels)):
        written, shape = pixels(root / "val" / classes[label] / f"{j:06d}.png"), np.asarray(image)
        solid = shape.max(axis=2) >= 64
        np.testing.assert_array_equal(written[solid], shape[solid])


def test_duplicates_and_leaks_are_near_but_not_identical(planted):
    root, faults = planted
    _, labels, classes = make_shapes("train", n=60, size=32, seed=3)
    originals = {p: pixels(root / p) for p in files(root) if Path(p).stem.isdigit() and p.startswith("train/")}
    pairs = [(s, c) for s, c in faults["duplicates"]] + [(s, c) for c, s in faults["leaked"]]
    for source, copy in pairs:
        i = index_of(source)
        assert index_of(copy) == i and Path(source).parent.name == classes[labels[i]]
        assert Path(copy).parent.name == classes[labels[i]]  # same class folder: not a label error
        image = pixels(root / copy)
        mad = np.abs(image - originals[source]).mean()
        others = [np.abs(image - o).mean() for p, o in originals.items() if p != source]
        assert 0 < mad < 40 and mad < np.median(others), (copy, mad)
    assert all(c.startswith("train/") for _, c in faults["duplicates"])
    assert all(c.startswith("val/") for c, _ in faults["leaked"])


def test_perturb_is_near_and_random():
    image = make_shapes("train", n=1, size=64)[0][0]
    a = perturb(image, np.random.default_rng(0))
    b = perturb(image, np.random.default_rng(1))
    assert a.size == image.size and a.mode == "RGB"
    base = np.asarray(image, np.float32)
    for copy in (a, b):
        assert 0 < np.abs(np.asarray(copy, np.float32) - base).mean() < 40
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_same_seed_same_bytes(tmp_path, planted):
    root, faults = planted
    again = make_audit_folder(tmp_path / "again", seed=3, **SMALL)
    assert files(again) == files(root)
    for rel in files(root):
        assert (again / rel).read_bytes() == (root / rel).read_bytes(), rel
    other = make_audit_folder(tmp_path / "other", seed=4, **SMALL)
    other_faults = json.loads((other / "faults.json").read_text())
    assert other_faults["seed"] == 4
    assert [other_faults[k] for k in ("duplicates", "label_flips", "leaked")] != \
        [faults[k] for k in ("duplicates", "label_flips", "leaked")]


def test_no_faults_is_plain_shapes(tmp_path):
    root = make_audit_folder(tmp_path / "clean", n_train=12, n_val=0, duplicates=0, flips=0, leaked=0, size=16)
    faults = json.loads((root / "faults.json").read_text())
    assert faults["duplicates"] == faults["label_flips"] == faults["leaked"] == []
    assert len(files(root / "train")) == 12 and files(root / "val") == []


@pytest.mark.parametrize("kwargs, fragment", [
    ({"n_train": 0}, "n_train"),
    ({"n_val": -1}, "n_val"),
    ({"duplicates": -1}, "duplicates"),
    ({"flips": 2.0}, "flips"),
    ({"leaked": True}, "leaked"),
    ({"size": 4}, "size"),
    ({"seed": "1"}, "seed"),
    ({"n_train": 10, "duplicates": 4, "flips": 4, "leaked": 3}, "n_train is 10"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        make_audit_folder(tmp_path / "bad", **{**SMALL, **kwargs})
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left


def test_existing_non_empty_out_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("user data")
    with pytest.raises(UsageError, match="not empty"):
        make_audit_folder(tmp_path / "data", **SMALL)
    assert files(tmp_path) == ["data/mine.txt"]


def test_cli_make_audit(tmp_path, monkeypatch):
    small = functools.partial(make_audit_folder, n_train=20, n_val=5, duplicates=2, flips=2, leaked=1, size=16)
    monkeypatch.setitem(data_cli.KINDS, "audit", small)  # the CLI's defaults write 2,560 images
    result = CliRunner().invoke(app, ["data", "make", "audit", "--out", str(tmp_path / "a"), "--seed", "5", "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["kind"] == "audit" and "faults.json" in described["layout"]
    assert json.loads((tmp_path / "a" / "faults.json").read_text())["seed"] == 5
    result = CliRunner().invoke(app, ["data", "make", "audt", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "audit" in result.stderr
