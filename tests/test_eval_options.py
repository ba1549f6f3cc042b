"""Typed eval options (suite entries and CLI flags share one dataclass per task) and sslcli.device."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from typer.testing import CliRunner

from sslcli.cli import evals as cli_evals
from sslcli.cli.evals import app  # `ssl eval` itself (the root app adds only the prefix)
from sslcli.config import MonitorConfig
from sslcli.device import autocast, pick_device
from sslcli.errors import ConfigError, UsageError
from sslcli.eval.featurefiles import FeatureSet, save_features
from sslcli.config import KNN_HEADLINE_K, KNN_KS, KNN_TEMPERATURE
from sslcli.eval.logreg import L2_GRID
from sslcli.eval.options import (DavisOptions, FewshotOptions, KnnOptions, LinearOptions, RetrievalOptions,
                                 parse_options)
from sslcli.eval.suite import read_suite

runner = CliRunner()


def run_suite(tmp_path, entries: str, *extra: str):
    suite = tmp_path / "suite.yaml"
    suite.write_text("evals:\n" + entries)
    return runner.invoke(app, ["all", "--suite", str(suite), *extra])


def test_bad_value_exits_2_naming_the_key(tmp_path):
    result = run_suite(tmp_path, "  - {task: knn, train_features: a, val_features: b, temperature: abc}\n")
    assert result.exit_code == 2
    assert "'knn.temperature' must be float, got 'abc'" in result.stderr and "evals[0]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unknown_key_exits_2_with_a_suggestion(tmp_path):
    result = run_suite(tmp_path, "  - {task: fewshot, data: x}\n  - {task: knn, temprature: 0.1}\n")
    assert result.exit_code == 2
    assert "evals[1]" in result.stderr and "'knn.temprature'" in result.stderr
    assert "did you mean: knn.temperature" in result.stderr


def test_bad_values_are_caught_before_any_eval_runs(tmp_path):
    cases = {"  - {task: fewshot, metric: acuracy}\n": "mean-per-class",  # choices listed
             "  - {task: davis, split: val}\n": "davis.davis",  # the required root
             "  - {task: retrieval, dataset: roxford}\n": "did you mean: roxford5k",
             "  - {task: knn, k: [0, 20]}\n": "knn.k",
             "  - {task: linear, epochs: 1.5}\n": "'linear.epochs' must be int",
             "  - {task: linear, protocol: dinov}\n": "did you mean: dino",
             "  - {task: linear, epochs: 10}\n": "linear.epochs apply to protocol dino only",
             "  - {task: linear, protocol: dino, l2: [0.1]}\n": "linear.l2 applies to protocol logreg only",
             "  - {task: linear, l2: [0.1, 0]}\n": "linear.l2 must be a list of numbers > 0"}
    for entry, expected in cases.items():
        result = run_suite(tmp_path, entry)
        assert result.exit_code == 2 and expected in result.stderr, (entry, result.stderr)


def test_suite_entries_become_typed_options(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("evals:\n  - {task: knn, k: [5, 10], temperature: 1e-1}\n  - {task: linear, fast: true}\n"
                     "  - {task: fewshot}\n  - {task: davis, davis: /d, sequences: [a, b]}\n"
                     "  - {task: retrieval, dataset: rparis6k}\n")
    entries = read_suite(suite)
    assert [task for task, _ in entries] == ["knn", "linear", "fewshot", "davis", "retrieval"]
    assert entries[0][1] == KnnOptions(k=[5, 10], temperature=0.1)  # YAML 1.1 reads 1e-1 as a string
    assert entries[1][1] == LinearOptions(fast=True) and entries[2][1] == FewshotOptions()
    assert entries[3][1] == DavisOptions(davis="/d", sequences=["a", "b"])
    assert entries[4][1] == RetrievalOptions(dataset="rparis6k")


def test_linear_protocols_and_their_settings():
    assert LinearOptions().protocol == "logreg" and LinearOptions().l2 == list(L2_GRID)
    dino = parse_options("linear", {"protocol": "dino", "fast": True, "epochs": 10, "lr": 0.01, "batch_size": 64})
    assert (dino.protocol, dino.epochs, dino.lr, dino.batch_size) == ("dino", 10, 0.01, 64)
    assert parse_options("linear", {"l2": [1, 0.1]}).l2 == [1.0, 0.1]  # YAML integers are numbers too
    assert parse_options("linear", {"fast": True}).protocol == "logreg"  # logreg always runs on cached features


def test_parse_options_rejects_unknown_tasks():
    with pytest.raises(ConfigError, match="did you mean: knn"):
        parse_options("knnn", {})


def test_knn_defaults_are_defined_once():
    defaults = KnnOptions()
    assert defaults.k == list(KNN_KS) == [10, 20, 100, 200]
    assert defaults.temperature is KNN_TEMPERATURE and KNN_TEMPERATURE == 0.07
    flags = inspect.signature(cli_evals.knn).parameters
    assert flags["temperature"].default is KNN_TEMPERATURE
    assert cli_evals.parse_ks(flags["k"].default) == KNN_KS
    # the online monitor (MonitorConfig) uses the same constants
    assert MonitorConfig().knn_k is KNN_HEADLINE_K and MonitorConfig().knn_temperature is KNN_TEMPERATURE


def test_cli_flags_and_suite_share_defaults():
    for command, cls in ((cli_evals.fewshot, FewshotOptions), (cli_evals.linear, LinearOptions),
                         (cli_evals.retrieval, RetrievalOptions)):
        flags = inspect.signature(command).parameters
        for name in ("seed", "ways", "shots", "queries", "episodes", "metric", "epochs", "lr", "dataset",
                     "multiscale", "query_crop", "protocol"):
            if name in flags:
                assert flags[name].default == getattr(cls, name), (command.__name__, name)
    assert inspect.signature(cli_evals.linear).parameters["probe_batch_size"].default == LinearOptions.batch_size
    davis_flags = inspect.signature(cli_evals.davis).parameters
    assert (davis_flags["split"].default, davis_flags["short_side"].default, davis_flags["out_dir"].default) == \
        (DavisOptions.split, DavisOptions.short_side, DavisOptions.out_dir)


def test_knn_command_and_suite_report_the_same_default_config(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    centers = torch.randn(3, 8, generator=g) * 5
    for name in ("train", "val"):
        save_features(tmp_path / f"{name}.safetensors", FeatureSet(centers[labels] + torch.randn(30, 8, generator=g),
                                                                  labels))
    train, val = tmp_path / "train.safetensors", tmp_path / "val.safetensors"
    files = ["--train-features", str(train), "--val-features", str(val)]
    single = runner.invoke(app, ["knn", *files, "--device", "cpu", "--json"])
    assert single.exit_code == 0, single.stderr
    suite = run_suite(tmp_path, f"  - {{task: knn, train_features: '{files[1]}', val_features: '{files[3]}'}}\n",
                      "--device", "cpu", "--json")
    assert suite.exit_code == 0, suite.stderr
    expected = {"k": [10, 20, 100, 200], "temperature": 0.07, "image_size": None}
    assert json.loads(single.stdout)["config"] == expected == json.loads(suite.stdout)["results"][0]["config"]
    assert json.loads(single.stdout)["metrics"] == json.loads(suite.stdout)["results"][0]["metrics"]


def test_autocast_policy_on_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu")):  # auto: fp32 on the CPU
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(UsageError, match="precision"):
        autocast(torch.device("cpu"), "fp16")


def test_pick_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu") == pick_device("cpu")
    with pytest.raises(UsageError, match="auto, cpu, cuda"):
        pick_device("gpu")


def test_device_cuda_without_a_gpu_exits_2(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    labels = torch.arange(6) % 2
    save_features(tmp_path / "f.safetensors", FeatureSet(torch.randn(6, 4), labels))
    result = runner.invoke(app, ["knn", "--train-features", str(tmp_path / "f.safetensors"),
                                 "--val-features", str(tmp_path / "f.safetensors"), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr
