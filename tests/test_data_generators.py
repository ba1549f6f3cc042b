"""Built-in data generators (sslcli.data.generators): layouts, scoring round trips, determinism."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslcli.data.builtin import SHAPE_CLASSES, make_shapes
from sslcli.data.datasets import open_dataset
from sslcli.data.generators import (
    difficulty_kinds, fewshot_class_names, make_davis, make_fewshot_folder, make_retrieval,
    make_shapes_folder,
)
from sslcli.errors import UsageError
from sslcli.eval.davis_score import davis_palette, evaluate_davis, read_mask
from sslcli.eval.fewshot import fewshot_episodes
from sslcli.eval.retrieval import load_gnd

SMALL_DAVIS = dict(sequences=2, frames=5, height=48, width=80, objects=3)
SMALL_RETRIEVAL = dict(db_per_landmark=8, landmarks=3, distractors=4, queries_per_landmark=2, size=48)


def files(root: Path) -> list[str]:
    """Sorted relative paths of every file under root."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- image folders


def test_shapes_folder_is_builtin_shapes_in_imagefolder_order(tmp_path):
    out = make_shapes_folder(tmp_path / "shapes", split="val", n=23, size=16, seed=3)
    assert out == tmp_path / "shapes"
    assert sorted(p.name for p in out.iterdir()) == SHAPE_CLASSES  # all 10 class folders
    images, labels, classes = make_shapes("val", n=23, size=16, seed=3)
    for i, (image, label) in enumerate(zip(images, labels)):
        with Image.open(out / classes[label] / f"{i:06d}.png") as written:
            assert written.mode == "RGB" and written.size == (16, 16)
            np.testing.assert_array_equal(np.asarray(written), np.asarray(image))
    dataset = open_dataset(str(out))
    assert dataset.classes == SHAPE_CLASSES and len(dataset) == 23
    assert sorted(dataset.labels.tolist()) == sorted(labels)


def test_shapes_folder_rejects_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match=r"did you mean: val\?"):
        make_shapes_folder(tmp_path / "a", split="vall")
    with pytest.raises(UsageError, match="size"):
        make_shapes_folder(tmp_path / "b", size=4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fewshot_folder_runs_episodes_on_raw_pixels(tmp_path):
    out = make_fewshot_folder(tmp_path / "fs", classes=6, per_class=20, size=16)
    dataset = open_dataset(str(out))
    assert dataset.classes == SHAPE_CLASSES[:6] and len(dataset) == 120
    features = torch.stack([torch.from_numpy(np.asarray(dataset.load(i), np.float32)).flatten()
                            for i in range(len(dataset))])
    result = fewshot_episodes(features, torch.from_numpy(dataset.labels), episodes=20)
    assert 0 <= result["accuracy"] <= 100 and result["episodes"] == 20


def test_fewshot_more_than_ten_classes_uses_hue_families(tmp_path):
    names = fewshot_class_names(12)
    assert names[0] == f"{SHAPE_CLASSES[0]}-hue0" and names[11] == f"{SHAPE_CLASSES[1]}-hue1"
    out = make_fewshot_folder(tmp_path / "fs", classes=12, per_class=2, size=16)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert len(files(out)) == 24
    with pytest.raises(UsageError, match="classes"):
        make_fewshot_folder(tmp_path / "bad", classes=101)


# --------------------------------------------------------------------------- DAVIS


def test_davis_layout_is_the_real_one(tmp_path):
    root = make_davis(tmp_path / "davis", **SMALL_DAVIS)
    assert sorted(p.name for p in root.iterdir()) == ["Annotations", "ImageSets", "JPEGImages"]
    for split in ("val", "train"):
        assert (root / "ImageSets/2017" / f"{split}.txt").read_text() == "shapes-00\nshapes-01\n"
    for seq in ("shapes-00", "shapes-01"):
        jpgs = sorted(p.name for p in (root / "JPEGImages/480p" / seq).iterdir())
        pngs = sorted(p.name for p in (root / "Annotations/480p" / seq).iterdir())
        assert jpgs == [f"{t:05d}.jpg" for t in range(5)]
        assert pngs == [f"{t:05d}.png" for t in range(5)]
        with Image.open(root / "JPEGImages/480p" / seq / "00003.jpg") as frame:
            assert frame.format == "JPEG" and frame.mode == "RGB" and frame.size == (80, 48)
        with Image.open(root / "Annotations/480p" / seq / "00003.png") as mask:
            assert mask.format == "PNG" and mask.mode == "P" and mask.size == (80, 48)
            assert mask.getpalette() == davis_palette()
        first = read_mask(root / "Annotations/480p" / seq / "00000.png")
        last = read_mask(root / "Annotations/480p" / seq / "00004.png")
        assert set(np.unique(first).tolist()) == {0, 1, 2, 3}  # every object visible in frame 0
        assert (first != last).any()  # objects move


def test_davis_own_annotations_score_100(tmp_path):
    root = make_davis(tmp_path / "davis", **SMALL_DAVIS)
    result = evaluate_davis(root, root / "Annotations/480p")
    assert result["J&F-Mean"] == pytest.approx(100) and result["J-Recall"] == pytest.approx(100)
    assert result["J-Decay"] == pytest.approx(0) and result["F-Decay"] == pytest.approx(0)
    assert len(result["per_object"]) == 6


def test_davis_is_trackable_by_pixel_patch_propagation(tmp_path):
    from sslcli.eval import davis

    class PixelPatches(torch.nn.Module):
        """8-px patches -> their 4x4 average-pooled pixels (48-d): no learning at all."""

        patch_size = 8

        def forward_features(self, x):
            pooled = torch.nn.functional.avg_pool2d(x, 2)
            return {"patch": torch.nn.functional.unfold(pooled, 4, stride=4).transpose(1, 2)}

    root = make_davis(tmp_path / "davis", sequences=1, frames=8)
    davis.run_davis(PixelPatches(), root, tmp_path / "pred", short_side=96)
    assert evaluate_davis(root, tmp_path / "pred")["J&F-Mean"] > 60


def test_davis_rejects_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="frames"):
        make_davis(tmp_path / "a", frames=2)
    with pytest.raises(UsageError, match="objects"):
        make_davis(tmp_path / "b", objects=0)
    with pytest.raises(UsageError, match="too small"):
        make_davis(tmp_path / "c", width=40, objects=3)


# --------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("dataset", ["roxford5k", "rparis6k"])
def test_retrieval_layout_and_gnd(tmp_path, dataset):
    root = make_retrieval(tmp_path / "r", dataset=dataset, **SMALL_RETRIEVAL)
    assert sorted(p.name for p in (root / dataset).iterdir()) == [f"gnd_{dataset}.pkl", "jpg"]
    assert (root / dataset / f"gnd_{dataset}.pkl").read_bytes()[:2] == b"\x80\x02"  # protocol 2
    gnd = load_gnd(root / dataset / f"gnd_{dataset}.pkl")
    ndb = 3 * 8 + 4
    assert len(gnd["imlist"]) == ndb and len(gnd["qimlist"]) == 6 == len(gnd["gnd"])
    names = gnd["imlist"] + gnd["qimlist"]
    assert len(set(names)) == len(names)
    assert files(root / dataset / "jpg") == sorted(f"{n}.jpg" for n in names)
    positives = set()
    for query, entry in zip(gnd["qimlist"], gnd["gnd"]):
        easy, hard, junk = (set(entry[k].tolist()) for k in ("easy", "hard", "junk"))
        assert (len(easy), len(hard), len(junk)) == (3, 3, 2)
        assert not (easy & hard or easy & junk or hard & junk)
        assert all(0 <= i < ndb for i in easy | hard | junk)
        positives |= easy | hard | junk
        with Image.open(root / dataset / "jpg" / f"{query}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            x1, y1, x2, y2 = entry["bbx"]
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
    distractors = {i for i, n in enumerate(gnd["imlist"]) if "landmark" not in n}
    assert len(distractors) == 4 and not distractors & positives


def test_retrieval_pickle_is_plain_data(tmp_path):
    root = make_retrieval(tmp_path / "r", **SMALL_RETRIEVAL)
    raw = pickle.loads((root / "roxford5k/gnd_roxford5k.pkl").read_bytes())
    assert isinstance(raw["gnd"][0]["easy"], list) and isinstance(raw["gnd"][0]["bbx"][0], float)


def test_retrieval_difficulty_split_and_bad_dataset(tmp_path):
    assert difficulty_kinds(1) == ["easy"]
    assert sorted(difficulty_kinds(8)) == ["easy"] * 3 + ["hard"] * 3 + ["junk"] * 2
    with pytest.raises(UsageError, match=r"did you mean: roxford5k\?"):
        make_retrieval(tmp_path / "r", dataset="roxford")
    with pytest.raises(UsageError, match="roxford5k, rparis6k"):
        make_retrieval(tmp_path / "r", dataset="imagenet")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- determinism, safety


def test_same_seed_same_bytes(tmp_path):
    picks = {
        "davis": ["JPEGImages/480p/shapes-01/00004.jpg", "Annotations/480p/shapes-01/00004.png"],
        "retrieval": ["roxford5k/gnd_roxford5k.pkl", "roxford5k/jpg/landmark02_000008.jpg",
                      "roxford5k/jpg/oxford_000003.jpg"],
        "fewshot": ["star_filled/0001.png"],
    }
    make = {
        "davis": lambda out, seed: make_davis(out, seed=seed, **SMALL_DAVIS),
        "retrieval": lambda out, seed: make_retrieval(out, seed=seed, **SMALL_RETRIEVAL),
        "fewshot": lambda out, seed: make_fewshot_folder(out, per_class=2, size=16, seed=seed),
    }
    for kind, paths in picks.items():
        runs = (("a", 7), ("b", 7), ("c", 8))
        a, b, c = (make[kind](tmp_path / f"{kind}-{run}", seed) for run, seed in runs)
        assert files(a) == files(b)
        for rel in paths:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        assert any((a / rel).read_bytes() != (c / rel).read_bytes() for rel in paths), kind


def test_existing_non_empty_out_is_refused(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    generators = [
        lambda: make_shapes_folder(out, n=5, size=16),
        lambda: make_fewshot_folder(out, classes=2, per_class=1, size=16),
        lambda: make_davis(out, **SMALL_DAVIS),
        lambda: make_retrieval(out, **SMALL_RETRIEVAL),
    ]
    for generate in generators:
        with pytest.raises(UsageError, match=str(out)):
            generate()
    assert files(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left
    with pytest.raises(UsageError, match="not a folder"):
        make_shapes_folder(out / "mine.txt", n=5, size=16)


def test_existing_empty_out_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    make_shapes_folder(out, n=5, size=16)
    assert len(files(out)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
