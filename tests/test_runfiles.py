"""One owner of the run and checkpoint format: header prefixes, 0.1.0 checkpoints, export + eval of
every method's run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslcli import runfiles
from sslcli.cli.app import app
from sslcli.errors import CheckpointError
from sslcli.eval.weights import load_backbone
from sslcli.train.checkpoint import load_training_state
from sslcli.train.pretrain import RunOptions, pretrain

LEGACY = Path(__file__).parent / "data" / "checkpoints-0.1.0"
SIMSIAM = ["method.name=simsiam", "method.out_dim=32", "method.hidden_dim=32", "method.pred_dim=8",
           "data.local_crops=0", "optim.name=sgd", "optim.lr=0.05", "optim.warmup_epochs=0"]
METHODS = {
    "dino": [],
    "dino2-adasim": ["data.local_crops=0", "bootstrap.name=adasim", "bootstrap.window=1", "bootstrap.top_k=3"],
    "simsiam": SIMSIAM,
    "simsiam-nn": SIMSIAM + ["bootstrap.name=nn", "bootstrap.top_k=3"],
}
EVALUATED = {"dino": "teacher", "dino2-adasim": "teacher", "simsiam": "student", "simsiam-nn": "student"}
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tiny_config_module, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for name, overrides in METHODS.items():
        out[name] = root / name
        pretrain(tiny_config_module("train.epochs=2", *overrides), RunOptions(out=out[name], device="cpu"))
    return out


@pytest.mark.parametrize("name", list(METHODS))
def test_header_names_the_evaluated_backbone(runs, name):
    header = runfiles.read_checkpoint_header(runfiles.last_checkpoint(runs[name]))
    assert (header.version, header.epoch, header.step) == (runfiles.FORMAT_VERSION, 2, 6)
    assert header.backbone_prefix == f"{EVALUATED[name]}.backbone.model."
    assert header.student_backbone_prefix == "student.backbone.model."
    meta = runfiles.read_metadata(runfiles.last_checkpoint(runs[name]))
    assert meta["format"] == "sslcli-train" and meta["format_version"] == str(runfiles.FORMAT_VERSION)


@pytest.mark.parametrize("name", list(METHODS))
def test_export_and_knn_on_every_method(runs, name, shapes_folder, shapes_val_folder, tmp_path):
    """0.1.0 bug: export / eval of a SimSiam run failed ("do not fit"): the reader assumed a teacher."""
    exported = tmp_path / "backbone.safetensors"
    result = runner.invoke(app, ["export", "--weights", str(runs[name]), "--out", str(exported)])
    assert result.exit_code == 0, result.stderr
    state = runfiles.read_tensors(exported)
    trained = runfiles.read_tensors(runfiles.last_checkpoint(runs[name]), f"model/{EVALUATED[name]}.backbone.model.")
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state)
    result = runner.invoke(app, ["eval", "knn", "--weights", str(runs[name]), "--train", str(shapes_folder),
                                 "--val", str(shapes_val_folder), "--k", "5", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.stderr
    assert 0 <= json.loads(result.stdout)["metrics"]["top1"] <= 100


@pytest.mark.parametrize("method, evaluated", [("dino", "teacher"), ("simsiam", "student")])
def test_checkpoints_of_0_1_0_still_load(method, evaluated, tmp_path):
    """Fixtures written by sslcli 0.1.0 (format sslcli-train-1, no prefixes, every method key)."""
    path = LEGACY / f"{method}-tiny.safetensors"
    assert runfiles.read_metadata(path)["format"] == "sslcli-train-1"
    header = runfiles.read_checkpoint_header(path)
    assert header.version == 1 and header.config.method.name == method
    assert header.prefix("teacher") == f"model/{evaluated}.backbone.model."
    backbone, info = load_backbone(path)
    raw = runfiles.read_tensors(path, header.prefix("teacher"))
    assert all(torch.equal(backbone.model.state_dict()[k], v) for k, v in raw.items())
    result = runner.invoke(app, ["export", "--weights", str(path), "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 0, result.stderr
    reloaded, _ = load_backbone(tmp_path / "x.safetensors")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(reloaded(x), backbone(x))


def test_not_a_checkpoint_is_an_input_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    runfiles.atomic_save({"w": torch.zeros(1)}, {"format": "other"}, junk)
    with pytest.raises(CheckpointError, match="not an sslcli training checkpoint"):
        runfiles.read_checkpoint_header(junk)
    with pytest.raises(CheckpointError, match="weights not found"):
        runfiles.resolve_weights_file(tmp_path / "missing")


def test_a_0_1_0_run_resumes(tiny_config, tmp_path):
    """The 0.1.0 DINO fixture continues as a run: weights, optimizer state (its groups had
    `apply_wd`, not multipliers: biases must stay undecayed) and the step counter."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.safetensors").write_bytes((LEGACY / "dino-tiny.safetensors").read_bytes())
    cfg = tiny_config("train.epochs=2", "method.out_dim=32", "data.local_crops=0")  # the fixture's config
    summary = pretrain(cfg, RunOptions(out=run, device="cpu", resume=True))
    assert summary["steps"] == 6  # 3 steps of epoch 2 after the fixture's 3
    saved, _ = load_training_state(runfiles.last_checkpoint(run))
    assert [(g["lr_mult"], g["wd_mult"]) for g in saved.optim_groups] == [(1.0, 1.0), (1.0, 0.0)]
    assert saved.optim_groups[1]["weight_decay"] == 0.0
