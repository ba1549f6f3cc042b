"""The `ssl` command: exit codes, one-line errors, --json purity."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY
from sslcli.cli.app import app
from sslcli.config import preset_names

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["pretrain", "--preset", "dino-vits61"], "unknown preset 'dino-vits61' (did you mean: dino-vits16"),
    (["pretrain", "--preset", "demo", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["pretrain", "--preset", "demo", "--set", "train.epochs=x"], "'train.epochs' must be int"),
    (["pretrain", "--preset", "demo", "--set", "model.arch=vit_tiny_patch16_22"], "unknown model.arch"),
    (["pretrain", "--preset", "demo", "--data", "/no/such/folder"], "dataset folder '/no/such/folder' does not exist"),
    (["pretrain", "--preset", "demo", "--data", "builtin:shape"], "unknown built-in dataset 'builtin:shape'"),
    (["pretrain"], "give --preset NAME"),
    (["pretrain", "--preset", "dino-vits16"], "preset 'dino-vits16' has no training data: pass --data PATH"),
    (["pretrain", "--preset", "demo", "--gpus", "2", "--procs", "2"], "--gpus and --procs are exclusive"),
    (["presets", "show", "nope"], "unknown preset 'nope'"),
])
def test_bad_input_exits_2_with_one_line(args, fragment):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert fragment in one_line_error(result)


def test_resume_without_checkpoint_exits_2(tmp_path):
    result = run("pretrain", "--preset", "demo", "--out", str(tmp_path / "empty"), "--resume")
    assert result.exit_code == 2 and "no checkpoint" in one_line_error(result)


def test_empty_dataset_folder_exits_2(tmp_path):
    (tmp_path / "data" / "cls").mkdir(parents=True)
    result = run("pretrain", "--preset", "demo", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "holds no images" in one_line_error(result)


def tiny_args(shapes_folder, out, *extra):
    args = ["pretrain", "--preset", "demo", "--data", str(shapes_folder), "--out", str(out)]
    for item in TINY + list(extra):
        args += ["--set", item]
    return args


def test_pretrain_json_prints_only_json(shapes_folder, tmp_path):
    result = run(*tiny_args(shapes_folder, tmp_path / "run", "train.epochs=1"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 3 and summary["name"] == "demo"
    again = run(*tiny_args(shapes_folder, tmp_path / "run", "train.epochs=1"))  # run dir already used
    assert again.exit_code == 2 and "--resume" in one_line_error(again)


def test_divergence_exits_1(shapes_folder, tmp_path, monkeypatch):
    import sslcli.methods.dino as dino

    monkeypatch.setattr(dino, "dino_loss", lambda *a: torch_nan())
    result = run(*tiny_args(shapes_folder, tmp_path / "run", "train.epochs=1"), "--quiet")
    assert result.exit_code == 1
    assert "training diverged: non-finite dino at step 1" in one_line_error(result)


def torch_nan():
    import torch

    return torch.tensor(float("nan"), requires_grad=True)


def test_presets_list_json_and_show_round_trip(tmp_path):
    result = run("presets", "list", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == preset_names()
    row = next(r for r in rows if r["name"] == "dino-vits16")
    assert row["crops"] == "2x224+10x96" and row["reported"]
    shown = run("presets", "show", "dino-vits16")
    assert shown.exit_code == 0 and yaml.safe_load(shown.stdout)["name"] == "dino-vits16"
    table = run("presets", "list")
    assert table.exit_code == 0 and "dino-vits16" in table.stdout


def test_help_names_only_methods_that_exist():
    result = run("--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for method in ("DINO", "DINO-2", "SimSiam", "NN", "AdaSim", "oracle"):
        assert method in text, method
    for missing in ("SimDINO", "SOVE"):
        assert missing not in text, missing


def test_python_dash_m_is_the_same_app():
    out = subprocess.run([sys.executable, "-m", "sslcli", "presets", "list", "--json"], capture_output=True,
                         text=True, check=True)
    assert [r["name"] for r in json.loads(out.stdout)] == preset_names()
