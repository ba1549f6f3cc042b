"""`ssl pretrain --init-from`: backbones start from existing weights, heads fresh; head warm-up."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import TINY
from run_checks import assert_resume_is_exact
from sslcli import runfiles
from sslcli.cli.app import app
from sslcli.config import HEAD_WARMUP_EPOCHS, TrainConfig, load_config
from sslcli.errors import CheckpointError
from sslcli.methods import build_method
from sslcli.models.backbone import resample_pos_embed
from sslcli.models.pretrained import load_init_weights, read_init_weights
from sslcli.train.optim import lr_multipliers
from sslcli.train.pretrain import RunOptions, pretrain
from sslcli.train.trainer import init_backbones
from test_presets_build import shrink

runner = CliRunner()
SMALLER = "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}"  # one block fewer than TINY


@pytest.fixture
def export(tiny_export):
    return tiny_export


def backbone_state(run, which="teacher"):
    path = runfiles.last_checkpoint(run)
    return runfiles.read_tensors(path, runfiles.read_checkpoint_header(path).prefix(which))


def knn(weights, train, val) -> float:
    result = runner.invoke(app, ["eval", "knn", "--weights", str(weights), "--train", str(train), "--val", str(val),
                                 "--device", "cpu", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["metrics"]["top1"]


def test_frozen_epochs_keep_the_export_and_its_knn(export, tiny_config, tmp_path, shapes_folder, shapes_val_folder):
    """One epoch with the backbone frozen: both backbones still equal the export (the heads
    trained), so the run's k-NN equals the export's, and the summary records the file."""
    cfg = tiny_config("train.epochs=1", "train.freeze_backbone_epochs=1", f"model.init_from={export}")
    summary = pretrain(cfg, RunOptions(out=tmp_path / "run", device="cpu"))
    exported = runfiles.read_tensors(export)
    for which in ("teacher", "student"):
        state = backbone_state(tmp_path / "run", which)
        assert state.keys() == exported.keys()
        assert all(torch.equal(state[k], exported[k]) for k in exported), which
    assert summary["init_from"] == {"path": str(export.resolve()), "kind": "export",
                                    "sha256": hashlib.sha256(export.read_bytes()).hexdigest()}
    assert knn(tmp_path / "run", shapes_folder, shapes_val_folder) == knn(export, shapes_folder, shapes_val_folder)


def test_without_the_freeze_the_backbone_trains(export, tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=1", "train.freeze_backbone_epochs=0", f"model.init_from={export}")
    pretrain(cfg, RunOptions(out=tmp_path / "run", device="cpu"))
    state, exported = backbone_state(tmp_path / "run", "student"), runfiles.read_tensors(export)
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("preset", ["dino-vits16", "simdino-vits16", "dinov2-vitb16", "simdinov2-vitb16",
                                    "sove-vits16", "simsiam-rn50", "adasim-dino2-vits16"])
def test_every_method_starts_both_backbones_from_the_file(preset, tmp_path):
    cfg = shrink(load_config(preset))
    torch.manual_seed(0)
    source = build_method(cfg.model, cfg.method, cfg.train.epochs, 2).evaluated_backbone.model
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "timm.safetensors")
    torch.manual_seed(1)
    method = build_method(cfg.model, cfg.method, cfg.train.epochs, 2)
    init = read_init_weights(tmp_path / "timm.safetensors")
    assert init.kind == "timm"
    init_backbones(method, init)
    for backbone in (method.student_backbone, method.evaluated_backbone):
        loaded = backbone.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_position_embeddings_are_resampled_to_another_image_size(export, tiny_config):
    bigger = TINY[0].replace("img_size: 16", "img_size: 32")
    cfg = load_config("demo", overrides=TINY + [bigger, "data.global_crop_size=32"])
    method = build_method(cfg.model, cfg.method, cfg.train.epochs, 2)
    notes = load_init_weights(method.student_backbone, read_init_weights(export))
    assert notes == ["pos_embed resampled from a 4x4 to a 8x8 patch grid"]
    exported, model = runfiles.read_tensors(export), method.student_backbone.model
    expected = resample_pos_embed(exported["pos_embed"], (4, 4), (8, 8), 1, antialias=False)
    assert model.pos_embed.shape == (1, 65, 32) and torch.equal(model.pos_embed.data, expected)
    assert torch.equal(model.blocks[1].mlp.fc2.weight.data, exported["blocks.1.mlp.fc2.weight"])


def test_missing_and_mis_shaped_keys_exit_2_naming_them(export, shapes_folder, tmp_path):
    base = ["pretrain", "--preset", "demo", "--data", str(shapes_folder), "--init-from", str(export), "--dry-run"]
    tiny = [x for o in TINY for x in ("--set", o)]
    fits = runner.invoke(app, base + tiny)
    assert fits.exit_code == 0, fits.stderr
    deeper = runner.invoke(app, base + tiny + ["--set", TINY[0].replace("depth: 2", "depth: 3")])
    assert deeper.exit_code == 2 and "missing blocks.2.norm1.weight" in deeper.stderr
    shallower = runner.invoke(app, base + tiny + ["--set", SMALLER])
    assert shallower.exit_code == 2 and ": unexpected blocks.1." in shallower.stderr
    wider = runner.invoke(app, base + tiny + ["--set", TINY[0].replace("embed_dim: 32", "embed_dim: 48")])
    assert wider.exit_code == 2 and "mis-shaped cls_token [1, 1, 32] vs [1, 1, 48]" in wider.stderr
    for result in (deeper, shallower, wider):  # the error is one line (INFO lines above it: the folder index)
        assert result.stderr.strip().splitlines()[-1].startswith("error: --init-from")


def test_register_tokens_and_layer_scale_name_the_kwargs_to_set(export, tmp_path):
    state = runfiles.read_tensors(export)
    with_registers = dict(state, reg_token=torch.zeros(1, 4, 32))
    save_file(with_registers, tmp_path / "reg.safetensors")
    cfg = load_config("demo", overrides=TINY)
    method = build_method(cfg.model, cfg.method, cfg.train.epochs, 2)
    with pytest.raises(CheckpointError, match=r"unexpected reg_token.*set model.kwargs.reg_tokens=4"):
        load_init_weights(method.student_backbone, read_init_weights(tmp_path / "reg.safetensors"))
    scaled = load_config("demo", overrides=TINY + [TINY[0].replace("}", ", init_values: 0.1}")])
    method = build_method(scaled.model, scaled.method, scaled.train.epochs, 2)
    with pytest.raises(CheckpointError, match=r"missing blocks.0.ls1.gamma.*set model.kwargs.init_values=null"):
        load_init_weights(method.student_backbone, read_init_weights(export))


def test_a_run_directory_and_a_checkpoint_give_the_teacher(tiny_run):
    teacher = backbone_state(tiny_run, "teacher")
    for source in (tiny_run, runfiles.last_checkpoint(tiny_run)):
        init = read_init_weights(source)
        assert init.kind == "checkpoint" and all(torch.equal(init.state[k], teacher[k]) for k in teacher)


def test_resume_of_an_init_from_run_is_exact_and_does_not_read_the_file_again(export, tiny_config, tmp_path):
    copy = tmp_path / "init.safetensors"
    copy.write_bytes(export.read_bytes())
    cfg = tiny_config("train.freeze_backbone_epochs=1", f"model.init_from={copy}")
    assert_resume_is_exact(cfg, tmp_path, interrupt_step=4)
    copy.unlink()  # a finished run resumes (with more epochs) without the file
    more = tiny_config("train.freeze_backbone_epochs=1", f"model.init_from={copy}", "train.epochs=3")
    summary = pretrain(more, RunOptions(out=tmp_path / "full", device="cpu", resume=True))
    assert summary["init_from"]["sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()


def test_runs_from_weights_warm_the_heads_up_by_default():
    assert TrainConfig(epochs=10).frozen_backbone_epochs(init_from="w.safetensors") == HEAD_WARMUP_EPOCHS
    assert TrainConfig(epochs=10).frozen_backbone_epochs(init_from="") == 0  # from scratch: nothing frozen
    assert TrainConfig(epochs=1).frozen_backbone_epochs(init_from="w.safetensors") == 0  # never the whole run
    assert TrainConfig(epochs=10, freeze_backbone_epochs=0).frozen_backbone_epochs(init_from="w") == 0


def test_backbone_lr_scale_multiplies_the_backbone_weights_only(tiny_config):
    cfg = tiny_config("optim.backbone_lr_scale=0.1")
    method = build_method(cfg.model, cfg.method, cfg.train.epochs, 2)
    mults = lr_multipliers(method.student, cfg.optim)
    names = [n for n, _ in method.student.named_parameters()]
    assert {mults[n] for n in names if n.startswith("backbone.model.")} == {0.1}
    assert not any(n in mults for n in names if n.startswith("head."))


def test_init_from_refuses_resume_and_a_freeze_longer_than_the_run(export, shapes_folder):
    resumed = runner.invoke(app, ["pretrain", "--out", "x", "--resume", "--init-from", str(export)])
    assert resumed.exit_code == 2 and "--init-from starts a new run" in resumed.stderr
    long = runner.invoke(app, ["pretrain", "--preset", "demo", "--set", "train.epochs=2", "--set",
                               "train.freeze_backbone_epochs=3", "--dry-run"])
    assert long.exit_code == 2 and "train.freeze_backbone_epochs must not exceed train.epochs (2)" in long.stderr


def test_a_bootstrapped_run_starts_from_weights(export, tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=2", "bootstrap.name=adasim", "bootstrap.window=1", "bootstrap.top_k=3",
                      f"model.init_from={export}")
    summary = pretrain(cfg, RunOptions(out=tmp_path / "ada", device="cpu"))
    assert summary["init_from"]["kind"] == "export" and "bootstrap_ratio" in summary["bootstrap"]
    exported, student = runfiles.read_tensors(export), backbone_state(tmp_path / "ada", "student")
    assert student.keys() == exported.keys()  # epoch 1 frozen (the default), epoch 2 trained on from the export
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])
