"""Shared fixtures: a tiny ImageFolder of built-in shapes and a tiny DINO config."""

from __future__ import annotations

from pathlib import Path

import pytest

from sslcli.config import load_config
from sslcli.data.builtin import make_shapes

# A ViT of 2 blocks on 16-px crops: a training step takes milliseconds on one CPU core.
TINY = [
    "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}",
    "model.drop_path_rate=0.0",
    "method.out_dim=64", "method.hidden_dim=64", "method.bottleneck_dim=32",
    "data.global_crop_size=16", "data.local_crop_size=8", "data.local_crops=2",
    "optim.batch_size=16", "optim.warmup_epochs=1", "train.epochs=2", "train.workers=0", "train.log_every=1",
    "monitor.knn_every=0",
]


def write_shapes_folder(root: Path, split: str, per_class: int, classes: int = 3) -> Path:
    images, labels, names = make_shapes(split, n=per_class * 10, size=32)
    counts = {}
    for img, label in zip(images, labels):
        if label >= classes or counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{counts[label]:03d}.png")
    return root


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """48 training images (3 classes x 16) in ImageFolder layout."""
    return write_shapes_folder(tmp_path_factory.mktemp("shapes") / "train", "train", per_class=16)


@pytest.fixture(scope="session")
def shapes_val_folder(tmp_path_factory) -> Path:
    return write_shapes_folder(tmp_path_factory.mktemp("shapes") / "val", "val", per_class=6)


@pytest.fixture(scope="session")
def tiny_config_module(shapes_folder):
    """tiny_config for module- or session-scoped fixtures."""
    def make(*extra: str):
        return load_config("demo", overrides=TINY + [f"data.path={shapes_folder}"] + list(extra))

    return make


@pytest.fixture
def tiny_config(tiny_config_module):
    return tiny_config_module


@pytest.fixture(scope="session")
def tiny_run(shapes_folder, tmp_path_factory) -> Path:
    """A finished 1-epoch tiny DINO run directory (shared by export / eval tests)."""
    from sslcli.train.pretrain import RunOptions, pretrain

    cfg = load_config("demo", overrides=TINY + [f"data.path={shapes_folder}", "train.epochs=1"])
    out = tmp_path_factory.mktemp("runs") / "tiny"
    pretrain(cfg, RunOptions(out=out, device="cpu"))
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's teacher, exported by `ssl export` as a timm safetensors file."""
    from typer.testing import CliRunner

    from sslcli.cli.app import app

    out = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    result = CliRunner().invoke(app, ["export", "--weights", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out
