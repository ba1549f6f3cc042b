"""Feature files, the feature cache and the protocol pipelines (k-NN, few-shot, retrieval)."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from sslcli.config import ModelConfig
from sslcli.data.generators import make_retrieval, make_shapes_folder
from sslcli.errors import DataError, UsageError
from sslcli.eval.featurefiles import (FeatureCache, FeatureSet, check_same_dim, load_features,
                                      save_features)
from sslcli.eval.pipelines import (fewshot_features, fewshot_transform, knn_features,
                                   retrieval_features)
from sslcli.eval.retrieval import evaluate_retrieval
from sslcli.eval.weights import WeightsInfo
from sslcli.models import create_backbone

ARCH = "vit_small_patch16_224"
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread start-up costs more than it saves (and dominates on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone(ModelConfig(arch=ARCH, drop_path_rate=0.0, kwargs=dict(TINY_VIT))).eval()


@pytest.fixture
def info(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"stand-in weights file")
    return WeightsInfo(path=str(weights), arch=ARCH, kwargs=dict(TINY_VIT), image_size=32)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("knn") / "shapes", n=40, size=48)


@pytest.fixture(scope="module")
def retrieval_root(tmp_path_factory):
    return make_retrieval(tmp_path_factory.mktemp("retrieval") / "root")


def feature_set(n: int = 5, d: int = 4, labels: bool = True, ids: bool = True) -> FeatureSet:
    return FeatureSet(torch.randn(n, d), torch.arange(n) % 2 if labels else None,
                      torch.arange(10, 10 + n) if ids else None, {"protocol": "knn", "crop": "224"})


# --------------------------------------------------------------------------- feature files


@pytest.mark.parametrize("labels, ids", [(True, True), (False, False), (True, False)])
def test_save_load_round_trip(tmp_path, labels, ids):
    fs = feature_set(labels=labels, ids=ids)
    path = save_features(tmp_path / "sub" / "f.safetensors", fs)
    back = load_features(path)
    assert torch.equal(back.features, fs.features) and back.features.dtype == torch.float32
    assert back.meta == fs.meta
    for name in ("labels", "ids"):
        mine, theirs = getattr(fs, name), getattr(back, name)
        assert (theirs is None) == (mine is None)
        if mine is not None:
            assert theirs.dtype == torch.int64 and torch.equal(theirs, mine)
    assert [p.name for p in path.parent.iterdir()] == ["f.safetensors"]  # no temp file left


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found.*missing.safetensors"):
        load_features(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(DataError, match="bad.safetensors"):
        load_features(bad)
    from safetensors.torch import save_file
    save_file({"feats": torch.zeros(2, 3)}, str(tmp_path / "nokey.safetensors"))
    with pytest.raises(DataError, match="nokey.safetensors.*'features'"):
        load_features(tmp_path / "nokey.safetensors")
    save_file({"features": torch.zeros(3, 4), "labels": torch.zeros(2, dtype=torch.int64)},
              str(tmp_path / "shape.safetensors"))
    with pytest.raises(DataError, match="shape.safetensors.*labels"):
        load_features(tmp_path / "shape.safetensors")
    save_file({"features": torch.zeros(3)}, str(tmp_path / "flat.safetensors"))
    with pytest.raises(DataError, match=r"flat.safetensors.*\[N, D\]"):
        load_features(tmp_path / "flat.safetensors")


def test_mismatched_dims():
    a, b = feature_set(d=384), feature_set(d=768)
    with pytest.raises(DataError, match=r"^features of mismatched sizes: train has D=384, val has D=768$"):
        check_same_dim(a, b, "train", "val")
    check_same_dim(a, feature_set(d=384), "train", "val")


# --------------------------------------------------------------------------- cache


def test_cache_computes_once(tmp_path, info):
    cache, calls = FeatureCache(tmp_path / "cache"), []

    def compute():
        calls.append(1)
        return feature_set()

    first = cache.features(info, "builtin:shapes", {"crop": 32}, compute)
    second = cache.features(info, "builtin:shapes", {"crop": 32}, compute)
    assert len(calls) == 1 and torch.equal(first.features, second.features)
    assert second.meta == first.meta and "cache_key" in second.meta
    cache.features(info, "builtin:shapes", {"crop": 64}, compute)
    assert len(calls) == 2
    nocache = FeatureCache(None)
    nocache.features(info, "builtin:shapes", {"crop": 32}, compute)
    nocache.features(info, "builtin:shapes", {"crop": 32}, compute)
    assert len(calls) == 4


def test_cache_key_depends_on_weights_data_preprocessing(tmp_path, info, monkeypatch):
    cache = FeatureCache(tmp_path)
    key = cache.key(info, str(tmp_path), {"crop": 224, "protocol": "knn"})
    assert len(key) == 40 and int(key, 16) >= 0
    assert cache.key(info, str(tmp_path), {"protocol": "knn", "crop": 224}) == key  # canonical order
    assert cache.key(info, str(tmp_path), {"crop": 256, "protocol": "knn"}) != key
    assert cache.key(info, "builtin:shapes", {"crop": 224, "protocol": "knn"}) != key
    monkeypatch.chdir(tmp_path.parent)  # a relative folder spec keys as its absolute path
    assert cache.key(info, tmp_path.name, {"crop": 224, "protocol": "knn"}) == key
    student = WeightsInfo(**{**info.__dict__, "which": "student"})
    assert cache.key(student, str(tmp_path), {"crop": 224, "protocol": "knn"}) != key
    st = os.stat(info.path)
    os.utime(info.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache.key(info, str(tmp_path), {"crop": 224, "protocol": "knn"}) != key


def test_corrupt_cache_entry_is_recomputed(tmp_path, info):
    cache = FeatureCache(tmp_path)
    key = cache.key(info, "builtin:shapes", {})
    cache.path(key).write_bytes(b"garbage")
    assert cache.get(key) is None
    fs = cache.features(info, "builtin:shapes", {}, feature_set)
    assert torch.equal(load_features(cache.path(key)).features, fs.features)


# --------------------------------------------------------------------------- k-NN / few-shot


def test_knn_features(backbone, info, shapes, tmp_path):
    fs = knn_features(backbone, info, str(shapes), "cpu", workers=0, batch_size=16)
    assert fs.features.shape == (40, 32) and fs.features.dtype == torch.float32
    assert torch.equal(fs.ids, torch.arange(40))
    names = sorted(p.name for p in shapes.iterdir())
    expected = [names.index(p.parent.name) for p in sorted(shapes.glob("*/*.png"))]
    assert fs.labels.tolist() == expected
    assert fs.meta["protocol"] == "knn" and fs.meta["crop"] == "32"
    # the cache: the second call does not run the backbone
    cache = FeatureCache(tmp_path / "cache")
    a = knn_features(backbone, info, str(shapes), "cpu", cache=cache, workers=0)
    calls = []
    hook = backbone.register_forward_hook(lambda *args: calls.append(1))
    try:
        b = knn_features(backbone, info, str(shapes), "cpu", cache=cache, workers=0)
        assert not calls and torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
        knn_features(backbone, info, str(shapes), "cpu", cache=cache, workers=0, image_size=24)
        assert calls  # another crop is another key
    finally:
        hook.remove()
    assert torch.allclose(a.features, fs.features, atol=1e-5)


def test_fewshot_features_and_unlabeled(backbone, info, shapes, tmp_path):
    fs = fewshot_features(backbone, info, str(shapes), "cpu", workers=0)
    assert fs.features.shape == (40, 32) and fs.meta["protocol"] == "fewshot"
    knn = knn_features(backbone, info, str(shapes), "cpu", workers=0)
    # the images are square: a square resize and a shorter-side resize to the same size coincide
    assert torch.allclose(fs.features, knn.features, atol=1e-5)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(shapes.glob("*/*.png"))[:5]:
        (flat / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    unlabeled = knn_features(backbone, info, str(flat), "cpu", workers=0)
    assert unlabeled.labels is None and unlabeled.features.shape == (5, 32)


def test_fewshot_square_resize_does_not_keep_aspect():
    img = Image.new("RGB", (400, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 100, 100))  # left quarter red
    x = fewshot_transform(224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(img)
    assert x.shape == (3, 224, 224)
    red = ((x[0] > 0.5) & (x[2] < 0.5)).float().mean().item()
    # square 257 x 257: red = columns < 64.25, the crop starts at 16.5 -> ~21 % of the crop.
    # Keeping the aspect (1028 x 257, centre crop) would show no red at all.
    assert red == pytest.approx((257 / 4 - 16.5) / 224, abs=0.02)
    tall = fewshot_transform(32, (0.0,) * 3, (1.0,) * 3)(Image.new("RGB", (30, 90)))
    assert tall.shape == (3, 32, 32)


# --------------------------------------------------------------------------- retrieval


def test_retrieval_features(backbone, info, retrieval_root, tmp_path):
    q, db, gnd = retrieval_features(backbone, info, retrieval_root, "roxford5k", "cpu", workers=0)
    assert q.features.shape == (len(gnd["qimlist"]), 32) and db.features.shape == (len(gnd["imlist"]), 32)
    for fs in (q, db):
        assert torch.allclose(fs.features.norm(dim=1), torch.ones(len(fs)), atol=1e-5)
        assert fs.labels is None and torch.equal(fs.ids, torch.arange(len(fs)))
    assert q.meta["query_crop"] == "true" and q.meta["imsize"] == "224"
    metrics = evaluate_retrieval(q.features, db.features, gnd["gnd"])
    assert all(v is None or 0 <= v <= 100 for v in metrics.values())

    small = dict(imsize=96, workers=0)
    q1, db1, _ = retrieval_features(backbone, info, retrieval_root, "roxford5k", "cpu", **small)
    q2, db2, _ = retrieval_features(backbone, info, retrieval_root, "roxford5k", "cpu",
                                    query_crop=False, **small)
    assert torch.equal(db2.features, db1.features)
    assert not torch.allclose(q2.features, q1.features, atol=1e-3)
    q3, db3, _ = retrieval_features(backbone, info, retrieval_root, "roxford5k", "cpu",
                                    multiscale=True, **small)
    assert q3.meta["multiscale"] == "true"
    assert not torch.allclose(db3.features, db1.features, atol=1e-3)
    assert torch.allclose(db3.features.norm(dim=1), torch.ones(len(db3)), atol=1e-5)


def test_retrieval_cache_and_progress(backbone, info, retrieval_root, tmp_path):
    seen = []
    cache = FeatureCache(tmp_path / "cache")
    q, db, gnd = retrieval_features(backbone, info, retrieval_root, "roxford5k", "cpu", imsize=64,
                                    cache=cache, on_batch=seen.append, workers=0)
    assert sum(seen) == len(gnd["qimlist"]) + len(gnd["imlist"])
    q2, db2, _ = retrieval_features(backbone, info, retrieval_root, "roxford5k", "cpu", imsize=64,
                                    cache=cache, on_batch=seen.append, workers=2)
    assert sum(seen) == len(gnd["qimlist"]) + len(gnd["imlist"])  # all from the cache
    assert torch.equal(q.features, q2.features) and torch.equal(db.features, db2.features)
    q3, _, _ = retrieval_features(backbone, info, retrieval_root, "roxford5k", "cpu", imsize=64,
                                  on_batch=seen.append, workers=2)  # decoded in loader workers
    assert sum(seen) == 2 * len(gnd["qimlist"]) + 2 * len(gnd["imlist"])
    assert torch.allclose(q3.features, q.features, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_retrieval_errors(backbone, info, retrieval_root, tmp_path):
    with pytest.raises(UsageError, match="roxford5k"):
        retrieval_features(backbone, info, retrieval_root, "oxford5k", "cpu")
    with pytest.raises(DataError, match="gnd_rparis6k.pkl"):
        retrieval_features(backbone, info, retrieval_root, "rparis6k", "cpu")
    broken = make_retrieval(tmp_path / "broken", landmarks=1, distractors=1, db_per_landmark=2)
    victim = sorted((broken / "roxford5k" / "jpg").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match=f"not found: .*{victim.name}"):
        retrieval_features(backbone, info, broken, "roxford5k", "cpu", workers=0)
    victim.write_bytes(b"not a jpeg")
    for workers in (0, 2):  # one line, also when the image is decoded in a loader worker
        with pytest.raises(DataError, match=f"^cannot read image .*{victim.name}: [^\\n]*$"):
            retrieval_features(backbone, info, broken, "roxford5k", "cpu", workers=workers)
