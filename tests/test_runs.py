"""`ssl runs list|compare` on tiny runs: status from the files, a sweep's axis found."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from run_checks import InterruptAt
from sslcli import runfiles, runs
from sslcli.cli.app import app
from sslcli.errors import Interrupted
from sslcli.train.pretrain import RunOptions, pretrain

runner = CliRunner()


@pytest.fixture(scope="module")
def sweep(tiny_config_module, tmp_path_factory):
    """runs/lr-0.001 and runs/lr-0.004 (finished, differing in optim.lr) and runs/cut (Ctrl-C)."""
    root = tmp_path_factory.mktemp("sweep") / "runs"
    for lr in ("0.001", "0.004"):
        pretrain(tiny_config_module("train.epochs=1", f"optim.lr={lr}"), RunOptions(out=root / f"lr-{lr}", device="cpu"))
    with pytest.raises(Interrupted):
        pretrain(tiny_config_module("train.epochs=2"), RunOptions(out=root / "cut", device="cpu"),
                 make_reporter=InterruptAt(4))
    return root


def test_list_reads_status_epochs_and_loss_from_the_files(sweep):
    result = runner.invoke(app, ["runs", "list", str(sweep), "--json"])
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert sorted(rows) == ["cut", "lr-0.001", "lr-0.004"]
    assert rows["lr-0.001"]["status"] == "finished" and rows["lr-0.001"]["epoch"] == 1
    assert rows["cut"]["status"] == "interrupted" and rows["cut"]["epoch"] == 1 and rows["cut"]["epochs"] == 2
    last = runfiles.read_jsonl(sweep / "lr-0.004" / "metrics.jsonl")[-1]
    assert rows["lr-0.004"]["loss"] == last["loss"] and rows["lr-0.004"]["method"] == "dino"


def test_status_is_running_while_the_lock_is_held(sweep):
    with runfiles.run_lock(sweep / "cut"):
        assert runs.status(sweep / "cut") == "running"
    assert runs.status(sweep / "cut") == "interrupted"


def test_compare_finds_the_swept_key(sweep):
    result = runner.invoke(app, ["runs", "compare", str(sweep / "lr-0.001"), str(sweep / "lr-0.004"), "--csv"])
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0])[:2] == ["name", "optim.lr"]
    assert [r["optim.lr"] for r in rows] == ["0.001", "0.004"]
    axes, _ = runs.compare([sweep / "lr-0.001", sweep / "cut"])
    assert axes == ["optim.lr", "train.epochs"]


def test_list_sorts_and_refuses_unknown_columns_and_missing_folders(sweep, tmp_path):
    result = runner.invoke(app, ["runs", "list", str(sweep), "--sort", "epochs", "--json"])
    assert [r["name"] for r in json.loads(result.stdout)][-1] == "cut"
    bad = runner.invoke(app, ["runs", "list", str(sweep), "--sort", "los"])
    assert bad.exit_code == 2 and "did you mean: loss" in bad.stderr
    empty = runner.invoke(app, ["runs", "list", str(tmp_path)])
    assert empty.exit_code == 2 and "no run directory" in empty.stderr


def test_an_eval_of_a_run_is_saved_in_it_and_listed(sweep, shapes_folder, shapes_val_folder):
    run = sweep / "lr-0.001"
    result = runner.invoke(app, ["eval", "knn", "--weights", str(run), "--train", str(shapes_folder), "--val",
                                 str(shapes_val_folder), "--device", "cpu", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.stderr
    saved = json.loads((run / "evals" / "knn.json").read_text())
    assert saved == json.loads(result.stdout)
    row = runs.describe(run)
    assert row["knn_top1"] == saved["metrics"]["top1"]
