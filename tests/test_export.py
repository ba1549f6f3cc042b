import json
import warnings

import pytest
import timm
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.errors import CheckpointError
from sslcli.eval.weights import load_backbone
from sslcli.export import export_backbone


def test_timm_export_loads_with_timm_create_model(tiny_run, tmp_path):
    out = tmp_path / "backbone.safetensors"
    result = export_backbone(tiny_run, out, "timm")
    with safe_open(str(out), "pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    assert header["arch"] == "vit_small_patch16_224" and header["preset"] == "demo" and header["epoch"] == "1"
    assert json.loads(header["timm_kwargs"])["depth"] == 2 and header["image_size"] == "16"
    assert "cls_token" in keys and not any(k.startswith(("model/", "head")) for k in keys)
    model = timm.create_model(header["arch"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                              num_classes=0, **json.loads(header["timm_kwargs"])).eval()
    teacher, _ = load_backbone(tiny_run)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(model(x), teacher(x), atol=1e-5)
    exported, info = load_backbone(out)  # an export is valid --weights
    assert torch.equal(exported(x), teacher(x)) and info.preset == "demo"
    assert result["embed_dim"] == 32


def test_student_differs_from_teacher(tiny_run):
    x = torch.randn(2, 3, 16, 16)
    teacher, _ = load_backbone(tiny_run, "teacher")
    student, _ = load_backbone(tiny_run / "checkpoints" / "last.safetensors", "student")
    assert not torch.allclose(teacher(x), student(x))


def test_torchscript_export_returns_the_global_feature(tiny_run, tmp_path):
    out = tmp_path / "backbone.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_backbone(tiny_run, out, "torchscript")
    traced = torch.jit.load(str(out))
    teacher, _ = load_backbone(tiny_run)
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(traced(x), teacher(x), atol=1e-5)


def test_bad_weights_are_usage_errors(tmp_path):
    with pytest.raises(CheckpointError, match="weights not found"):
        load_backbone(tmp_path / "nothing")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        load_backbone(junk)
    with pytest.raises(CheckpointError, match="--which"):
        load_backbone(tmp_path, which="both")


def test_unknown_arch_in_checkpoint_exits_2(tiny_run, tmp_path):
    src = tiny_run / "checkpoints" / "last.safetensors"
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta["config"] = meta["config"].replace("vit_small_patch16_224", "vit_nonexistent_patch16_224")
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(src)), str(bad), metadata=meta)
    result = CliRunner().invoke(app, ["export", "--weights", str(bad), "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "unknown model.arch 'vit_nonexistent_patch16_224'" in result.stderr
