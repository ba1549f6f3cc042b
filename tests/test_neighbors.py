"""`ssl neighbors` and sslcli.neighbors: the AdaSim neighbour audit of a tiny run with bootstrapping.

Independent path: the checkpoint's window tensors read whole with safetensors.torch.load_file and
fed image by image to sslcli.bootstrap.adasim.window_distribution; labels and paths from
torchvision's ImageFolder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.datasets import ImageFolder
from typer.testing import CliRunner

import sslcli.neighbors as nb
from sslcli.contact_sheet import contact_sheet
from conftest import TINY
from sslcli.bootstrap.adasim import window_distribution
from sslcli.cli.app import app
from sslcli.config import load_config
from sslcli.errors import UsageError

runner = CliRunner()
TAU, TOP_K = 0.2, 3
QUERY_KEYS = {"query", "neighbors", "weights", "tau", "window", "epochs_done", "decision"}
NEIGHBOR_KEYS = {"id", "class_id", "class_name", "p_win", "m_win", "path", "is_query", "other_class"}


@pytest.fixture(scope="module")
def ada_run(shapes_folder, tmp_path_factory):
    """A 2-epoch tiny DINO run with AdaSim (tau 0.2, window 1, top_k 3), trained once per module."""
    from sslcli.train.pretrain import RunOptions, pretrain

    cfg = load_config("demo", overrides=TINY + [f"data.path={shapes_folder}", "train.epochs=2",
                                                "bootstrap.name=adasim", f"bootstrap.tau={TAU}", "bootstrap.window=1",
                                                f"bootstrap.top_k={TOP_K}"])
    out = tmp_path_factory.mktemp("runs") / "ada"
    pretrain(cfg, RunOptions(out=out, device="cpu"))
    return out


@pytest.fixture(scope="module")
def reference(ada_run, shapes_folder):
    """Per image: (candidate ids, p_win) from window_distribution; labels and files from torchvision."""
    state = load_file(str(ada_run / "checkpoints" / "last.safetensors"))
    ids, sims = state["extra/bootstrap.window_ids"], state["extra/bootstrap.window_sims"]
    dists = [window_distribution(ids[:, q].long(), sims[:, q], TAU, TOP_K) for q in range(ids.shape[1])]
    # window 1: m_win of a candidate is the similarity its one slot recorded
    m_win = [dict(zip(ids[0, q].tolist(), sims[0, q].tolist())) for q in range(ids.shape[1])]
    folder = ImageFolder(str(shapes_folder))
    return {"dists": [(c.tolist(), p.tolist()) for c, p in dists], "m_win": m_win, "labels": folder.targets,
            "paths": [os.path.abspath(p) for p, _ in folder.samples], "classes": folder.classes}


def invoke(*args):
    return runner.invoke(app, ["neighbors", *args])


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # (logs may precede it)
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr
    return lines[0]


def test_query_matches_window_distribution(ada_run, reference):
    n = len(reference["labels"])
    for q in (0, 17, n - 1):
        result = nb.query_neighbors(ada_run, q)
        assert set(result) == QUERY_KEYS and set(result["query"]) == {"id", "class_id", "class_name", "path"}
        assert result["tau"] == TAU and result["window"] == 1 and result["epochs_done"] == 2
        assert result["weights"].endswith("last.safetensors")
        label = reference["labels"][q]
        assert result["query"] == {"id": q, "class_id": label, "class_name": reference["classes"][label],
                                   "path": reference["paths"][q]}
        rows = result["neighbors"]
        assert all(set(r) == NEIGHBOR_KEYS for r in rows)
        p = [r["p_win"] for r in rows]
        assert p == sorted(p, reverse=True) and sum(p) == pytest.approx(1.0, abs=1e-5)
        cand, p_ref = reference["dists"][q]
        assert [r["id"] for r in rows] == cand and p == pytest.approx(p_ref, abs=1e-6)
        assert [r["m_win"] for r in rows] == pytest.approx([reference["m_win"][q][r["id"]] for r in rows], abs=1e-6)
        # AdaSim bootstraps an image only when its window ranks the image itself first
        assert result["decision"] == ("bootstrap" if cand[0] == q else "standard pair")
        for r in rows:
            j = r["id"]
            assert r["is_query"] == (j == q)
            assert r["class_id"] == reference["labels"][j] and r["path"] == reference["paths"][j]
            assert r["other_class"] == (reference["labels"][j] != label)
    top = nb.query_neighbors(ada_run, 17, top=2)["neighbors"]
    assert [r["id"] for r in top] == reference["dists"][17][0][:2]


@pytest.mark.parametrize("kind", ["not-self", "other-class"])
def test_scan_finds_exactly_the_independent_set(ada_run, reference, kind, monkeypatch):
    labels, expected = reference["labels"], {}
    for q, (cand, p) in enumerate(reference["dists"]):
        if cand and (cand[0] != q if kind == "not-self" else labels[cand[0]] != labels[q]):
            expected[q] = (cand[0], p[0])
    assert expected, f"the tiny run has no {kind} image: the check would be empty"
    rows = nb.scan_neighbors(ada_run, kind)
    assert {r["query"]: r["neighbor"] for r in rows} == {q: j for q, (j, _) in expected.items()}
    keys = [(-r["p_win"], r["query"]) for r in rows]
    assert keys == sorted(keys)
    for r in rows:
        assert r["p_win"] == pytest.approx(expected[r["query"]][1], abs=1e-6)
        assert r["query_class"] == labels[r["query"]] and r["neighbor_class"] == labels[r["neighbor"]]
        assert r["query_path"] == reference["paths"][r["query"]]
        assert r["neighbor_path"] == reference["paths"][r["neighbor"]]
        assert r["neighbor"] != r["query"] if kind == "not-self" else r["neighbor_class"] != r["query_class"]
    assert nb.scan_neighbors(ada_run, kind, limit=2) == rows[:2]
    monkeypatch.setattr(nb, "CHUNK_ELEMENTS", 10)  # blocks of 3 images: same answer
    assert nb.scan_neighbors(ada_run, kind) == rows


def test_cli_query_json_and_contact_sheet(ada_run, reference, tmp_path):
    result = invoke("--weights", str(ada_run), "--query", "5", "--json")
    assert result.exit_code == 0, result.stderr
    obj = json.loads(result.stdout)
    assert set(obj) == QUERY_KEYS and obj["query"]["id"] == 5
    assert [n["id"] for n in obj["neighbors"]] == reference["dists"][5][0]
    sheet = tmp_path / "sheet.png"
    result = invoke("--run", str(ada_run), "--query", "5", "--top", "2", "--image", str(sheet))
    assert result.exit_code == 0, result.stderr
    assert "AdaSim neighbours of image 5" in result.stdout
    with Image.open(sheet) as img:
        assert img.format == "PNG" and img.size == (132 * (1 + 2) + 12, 152)  # contact_sheet's formula
    with Image.open(contact_sheet(obj, lambda i: Image.new("RGB", (40, 20)), tmp_path / "all.png", cell=64)) as img:
        k = len(obj["neighbors"])
        assert img.size == ((1 + k) * (64 + 4) + 4 + 8, 64 + 16 + 2 * 4)


def test_cli_scan_out_csv_and_json(ada_run, tmp_path):
    out = tmp_path / "audit.csv"
    result = invoke("--weights", str(ada_run), "--scan", "other-class", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(nb.SCAN_FIELDS)
    expected = nb.scan_neighbors(ada_run, "other-class")
    assert [int(r["query"]) for r in rows] == [r["query"] for r in expected]
    result = invoke("--weights", str(ada_run), "--scan", "not-self", "--limit", "3", "--json",
                    "--out", str(tmp_path / "audit.json"))
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert len(printed) == 3 and set(printed[0]) == set(nb.SCAN_FIELDS)
    assert json.loads((tmp_path / "audit.json").read_text()) == printed


def test_default_weights_is_the_latest_run(ada_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_line(invoke("--query", "0")).endswith("no run with checkpoints/last.safetensors under 'runs/': "
                                                       "pass --weights RUN_DIR")
    shutil.copytree(ada_run, tmp_path / "runs" / "ada")
    result = invoke("--query", "0", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["weights"] == os.path.join("runs", "ada", "checkpoints", "last.safetensors")


def test_latest_run_picks_the_newest_checkpoint(tmp_path):
    for name, mtime in (("old", 1_000_000), ("new", 2_000_000), ("empty", 3_000_000)):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        if name != "empty":
            ckpt = tmp_path / name / "checkpoints" / "last.safetensors"
            ckpt.write_bytes(b"x")
            os.utime(ckpt, (mtime, mtime))
    assert nb.latest_run(tmp_path) == tmp_path / "new"
    os.utime(tmp_path / "old" / "checkpoints" / "last.safetensors", (4_000_000, 4_000_000))
    assert nb.latest_run(tmp_path) == tmp_path / "old"
    with pytest.raises(UsageError, match="no run with"):
        nb.latest_run(tmp_path / "nothing")


@pytest.mark.parametrize("args, fragment", [
    ([], "give exactly one of --query ID"),
    (["--query", "1", "--scan", "not-self"], "give exactly one of --query ID"),
    (["--query", "48"], "query id 48 is out of range: image ids are 0..47"),
    (["--query", "-1"], "query id -1 is out of range"),
    (["--scan", "not-slf"], "--scan must be one of not-self, other-class, duplicates, leakage, got 'not-slf' (did you mean: not-self?)"),
    (["--scan", "not-self", "--out", "audit.txt"], "--out must end in .csv or .json"),
    (["--scan", "not-self", "--image", "x.png"], "--image draws the neighbours of one --query image"),
    (["--query", "1", "--top", "0"], "--top must be >= 1"),
    (["--query", "1", "--data", "/no/such/folder"], "dataset folder '/no/such/folder' does not exist"),
])
def test_usage_errors_exit_2_with_one_line(ada_run, args, fragment):
    assert fragment in error_line(invoke("--weights", str(ada_run), *args))


def test_run_without_bootstrap_state(tiny_run):
    """not-self needs the AdaSim window; a query falls back to the feature graph of the run's data."""
    line = error_line(invoke("--weights", str(tiny_run), "--scan", "not-self"))
    assert "has no bootstrap state (trained with bootstrap.name none)" in line
    result = invoke("--weights", str(tiny_run), "--query", "0", "--workers", "0")
    assert result.exit_code == 0, result.stderr
    assert "nearest images of 0 (circle_filled) by cosine" in result.stdout


def test_no_completed_epoch_yet(ada_run, tmp_path):
    src = ada_run / "checkpoints" / "last.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(src))
    state["extra/bootstrap.epochs_done"] = torch.zeros(1, dtype=torch.int64)
    save_file(state, str(tmp_path / "early.safetensors"), metadata=meta)
    assert "no completed epoch yet" in error_line(invoke("--weights", str(tmp_path / "early.safetensors"),
                                                         "--query", "0"))


def test_moved_and_unlabeled_data(ada_run, shapes_folder, tmp_path, reference):
    moved = shutil.copytree(shapes_folder, tmp_path / "moved")
    result = nb.query_neighbors(ada_run, 3, data=moved)
    assert result["query"]["path"] == str(moved / os.path.relpath(reference["paths"][3], shapes_folder))
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(reference["paths"]):
        shutil.copy(path, flat / f"{i:03d}.png")
    result = nb.query_neighbors(ada_run, 3, data=flat)
    assert result["query"]["class_id"] == -1 and result["query"]["class_name"] is None
    assert all(n["class_id"] == -1 and n["class_name"] is None and not n["other_class"] for n in result["neighbors"])
    assert "needs class labels" in error_line(invoke("--weights", str(ada_run), "--scan", "other-class",
                                                     "--data", str(flat)))
    (flat / "000.png").unlink()
    assert "has 47 images but the run's bootstrap state has 48" in error_line(
        invoke("--weights", str(ada_run), "--query", "0", "--data", str(flat)))
