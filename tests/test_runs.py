"""`ssl runs list|compare` on tiny runs: status from the files, a sweep's axis found."""

from __future__ import annotations

import csv
import io
import json
import sys

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


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_curves_are_in_epochs_and_labelled_by_the_swept_key(sweep):
    found = runs.curves([sweep / "lr-0.001", sweep / "lr-0.004"], ["loss", "lr"])
    assert found.x_unit == "epoch"
    loss = {c.run: c for c in found.curves if c.metric == "loss"}
    assert loss["lr-0.001"].label == "optim.lr=0.001" and loss["lr-0.004"].label == "optim.lr=0.004"
    logged = runfiles.read_jsonl(sweep / "lr-0.004" / "metrics.jsonl")
    assert loss["lr-0.004"].y == [r["loss"] for r in logged if "loss" in r]
    assert loss["lr-0.004"].x[-1] == 1.0  # the last line of a 1-epoch run sits at epoch 1
    assert loss["lr-0.004"].x == sorted(loss["lr-0.004"].x) and 0 < loss["lr-0.004"].x[0] < 1


def test_curves_fall_back_to_steps_when_the_epoch_length_is_unknown(sweep, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(sweep / "lr-0.001", old)
    shutil.rmtree(old / "checkpoints")  # no header, and no epoch-end line in metrics.jsonl
    found = runs.curves([old, sweep / "lr-0.004"], ["loss"])
    assert found.x_unit == "step"
    steps = [r["step"] for r in runfiles.read_jsonl(old / "metrics.jsonl") if "loss" in r]
    assert found.curves[0].x == steps


def test_plot_writes_one_png_with_a_panel_per_metric_and_a_colour_per_run(sweep, tmp_path):
    from PIL import Image

    one, three = tmp_path / "one.png", tmp_path / "three.png"
    dirs = [str(sweep / "lr-0.001"), str(sweep / "lr-0.004")]
    for out, metric in ((one, "loss"), (three, "loss,lr,img_per_s")):
        result = runner.invoke(app, ["runs", "plot", *dirs, "--metric", metric, "--out", str(out)])
        assert result.exit_code == 0, result.stderr
        assert out.stat().st_size > 5_000
    assert png_size(three)[0] > 2 * png_size(one)[0]  # three panels side by side
    colours = set(Image.open(one).convert("RGB").getdata())
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # the two runs' lines (C0, C1)
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_names_unknown_metrics_and_the_missing_extra(sweep, tmp_path, monkeypatch):
    out = tmp_path / "c.png"
    bad = runner.invoke(app, ["runs", "plot", str(sweep), "--metric", "loss,los", "--out", str(out)])
    assert bad.exit_code == 2 and "'los' (did you mean: loss" in bad.stderr
    absent = runner.invoke(app, ["runs", "plot", str(sweep), "--metric", "knn_top1", "--out", str(out)])
    assert absent.exit_code == 2 and "'knn_top1' (logged: bad_images," in absent.stderr
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    missing = runner.invoke(app, ["runs", "plot", str(sweep), "--metric", "loss", "--out", str(out)])
    assert missing.exit_code == 2 and "pip install 'sslcli[plot]'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not out.exists()
