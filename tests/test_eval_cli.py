"""End to end on built-in data: pretrain (tiny) -> export -> every eval through the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.data.generators import make_davis, make_fewshot_folder, make_retrieval
from sslcli.eval.featurefiles import FeatureSet, save_features

runner = CliRunner()


def run_json(*args):
    result = runner.invoke(app, list(args) + ["--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def exported(tiny_export):
    return tiny_export


def test_knn_from_images_features_and_export_agree(tiny_run, exported, shapes_folder, shapes_val_folder, tmp_path):
    common = ["--train", str(shapes_folder), "--val", str(shapes_val_folder), "--k", "5,10", "--workers", "0"]
    from_run = run_json("eval", "knn", "--weights", str(tiny_run), *common, "--cache", str(tmp_path / "cache"))
    assert from_run["task"] == "knn" and set(from_run["metrics"]["k"]) == {"5", "10"}
    assert 0 <= from_run["metrics"]["top1"] <= 100 and from_run["data"]["n_train"] == 48
    from_export = run_json("eval", "knn", "--weights", str(exported), *common)
    assert from_export["metrics"] == from_run["metrics"]  # an export is the same backbone
    cached = run_json("eval", "knn", "--weights", str(tiny_run), *common, "--cache", str(tmp_path / "cache"))
    assert cached["metrics"] == from_run["metrics"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train + val, reused


def test_knn_on_feature_files_and_size_mismatch(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    centers = torch.randn(4, 16, generator=g) * 5
    train = FeatureSet(centers[labels] + torch.randn(40, 16, generator=g), labels)
    val = FeatureSet(centers[labels[:20]] + torch.randn(20, 16, generator=g), labels[:20])
    save_features(tmp_path / "train.safetensors", train)
    save_features(tmp_path / "val.safetensors", val)
    result = run_json("eval", "knn", "--train-features", str(tmp_path / "train.safetensors"),
                      "--val-features", str(tmp_path / "val.safetensors"), "--k", "10")
    assert result["metrics"]["top1"] == 100.0 and result["weights"] is None
    save_features(tmp_path / "wide.safetensors", FeatureSet(torch.randn(20, 32), labels[:20]))
    bad = runner.invoke(app, ["eval", "knn", "--train-features", str(tmp_path / "train.safetensors"),
                              "--val-features", str(tmp_path / "wide.safetensors")])
    assert bad.exit_code == 2 and "mismatched sizes" in bad.stderr
    files = ["--train-features", str(tmp_path / "train.safetensors"),
             "--val-features", str(tmp_path / "val.safetensors")]
    lin = run_json("eval", "linear", *files, "--protocol", "dino", "--epochs", "20", "--lr", "1.0")
    assert lin["metrics"]["protocol"] == "fast-linear" and lin["metrics"]["top1"] == 100.0
    logreg = run_json("eval", "linear", *files, "--l2", "1e-3,1e-1")
    assert logreg["metrics"]["protocol"] == "logreg" and logreg["metrics"]["top1"] == 100.0
    assert logreg["config"]["l2"] == [1e-3, 1e-1] and logreg["metrics"]["l2"] in (1e-3, 1e-1)
    ignored = runner.invoke(app, ["eval", "linear", *files, "--epochs", "20"])  # an SGD setting with logreg
    assert ignored.exit_code == 2 and "linear.epochs apply to protocol dino only" in ignored.stderr


def test_fewshot_and_linear(tiny_run, shapes_folder, shapes_val_folder, tmp_path):
    folder = make_fewshot_folder(tmp_path / "fs", classes=5, per_class=8, size=32)
    fs = run_json("eval", "fewshot", "--weights", str(tiny_run), "--data", str(folder), "--ways", "3", "--shots",
                  "2", "--queries", "3", "--episodes", "20", "--workers", "0")
    assert set(fs["metrics"]) >= {"accuracy", "ci95", "episodes"} and fs["metrics"]["episodes"] == 20
    data = ["--train", str(shapes_folder), "--val", str(shapes_val_folder), "--workers", "0"]
    lin = run_json("eval", "linear", "--weights", str(tiny_run), *data, "--protocol", "dino", "--fast",
                   "--epochs", "2", "--n-last-blocks", "2")
    assert lin["metrics"]["protocol"] == "fast-linear" and 0 <= lin["metrics"]["top1"] <= 100
    assert any("SGD steps" in note for note in lin["notes"])  # 2 epochs on 48 images: flagged
    logreg = run_json("eval", "linear", "--weights", str(tiny_run), *data, "--l2", "1e-2")
    assert logreg["metrics"]["protocol"] == "logreg" and 0 <= logreg["metrics"]["top1"] <= 100
    assert logreg["data"]["n_train"] == 48 and logreg["notes"] == []


def test_davis_propagation_then_scoring_alone(tiny_run, tmp_path):
    root = make_davis(tmp_path / "davis", sequences=1, frames=4, height=64, width=96, objects=2)
    preds = tmp_path / "preds"
    full = run_json("eval", "davis", "--weights", str(tiny_run), "--davis", str(root), "--out-dir", str(preds),
                    "--short-side", "64")
    assert 0 <= full["metrics"]["J&F-Mean"] <= 100 and len(list(preds.rglob("*.png"))) == 4
    alone = run_json("eval", "davis", "--davis", str(root), "--predictions", str(preds))
    assert alone["metrics"] == full["metrics"] and alone["weights"] is None
    own = run_json("eval", "davis", "--davis", str(root), "--predictions", str(root / "Annotations" / "480p"))
    assert own["metrics"]["J&F-Mean"] == 100.0


def test_retrieval_images_and_feature_files(tiny_run, tmp_path):
    root = make_retrieval(tmp_path / "rox", landmarks=2, db_per_landmark=4, distractors=2, size=48)
    result = run_json("eval", "retrieval", "--weights", str(tiny_run), "--data", str(root), "--imsize", "32",
                      "--workers", "0")
    assert set(result["metrics"]) >= {"mAP-E", "mAP-M", "mAP-H", "mP@1-M"}
    gnd = root / "roxford5k" / "gnd_roxford5k.pkl"
    import torch

    from sslcli.eval.retrieval import load_gnd

    truth = load_gnd(gnd)
    # perfect features: each query is the sum of one-hot codes of its easy + hard positives
    db = torch.eye(len(truth["imlist"]))
    q = torch.stack([db[list(g["easy"]) + list(g["hard"])].sum(0) for g in truth["gnd"]])
    save_features(tmp_path / "q.safetensors", FeatureSet(q))
    save_features(tmp_path / "db.safetensors", FeatureSet(db))
    byo = run_json("eval", "retrieval", "--query-features", str(tmp_path / "q.safetensors"), "--db-features",
                   str(tmp_path / "db.safetensors"), "--gnd", str(gnd))
    assert byo["metrics"]["mAP-M"] == 100.0


def test_eval_all_writes_json_and_markdown(tiny_run, shapes_folder, shapes_val_folder, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"evals:\n  - {{task: knn, train: '{shapes_folder}', val: '{shapes_val_folder}', k: [5]}}\n"
                     f"  - {{task: fewshot, data: '{shapes_folder}', ways: 3, shots: 2, queries: 3, episodes: 5}}\n"
                     f"  - {{task: linear, train: '{shapes_folder}', val: '{shapes_val_folder}', l2: [0.01, 0.1]}}\n")
    report = run_json("eval", "all", "--weights", str(tiny_run), "--suite", str(suite), "--cache",
                      str(tmp_path / "cache"), "--workers", "0", "--markdown", str(tmp_path / "r.md"))
    assert [r["task"] for r in report["results"]] == ["knn", "fewshot", "linear"]
    table = (tmp_path / "r.md").read_text()
    assert table.startswith("| task | data | metric | value | paper |") and "| knn |" in table
    assert "| top1 (logreg) |" in table  # the protocol beside the figure
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 5  # knn x2, fewshot, linear x2
    suite.write_text("evals:\n  - {task: knnn}\n")
    bad = runner.invoke(app, ["eval", "all", "--weights", str(tiny_run), "--suite", str(suite)])
    assert bad.exit_code == 2 and "unknown task 'knnn' (did you mean: knn" in bad.stderr


def test_missing_layout_is_exit_2(tmp_path):
    result = runner.invoke(app, ["eval", "davis", "--davis", str(tmp_path), "--predictions", str(tmp_path)])
    assert result.exit_code == 2 and str(tmp_path) in result.stderr
