"""Training engine: one epoch, DDP on CPU, exact resume, divergence guard, corrupt images."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from sslcli import runs
from sslcli.errors import Interrupted, TrainingError
from sslcli.eval.monitor import KnnMonitor
from sslcli.runfiles import read_metadata
from sslcli.train.pretrain import RunOptions, pretrain
from run_checks import InterruptAt, losses


def test_one_epoch_single_process(tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=1")
    summary = pretrain(cfg, RunOptions(out=tmp_path / "run", device="cpu"))
    run = tmp_path / "run"
    assert summary["steps"] == 3  # 48 images / batch 16
    assert len(losses(run)) == 3 and all(0 < v < 20 for v in losses(run))
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("epoch", "step", "lr", "wd", "momentum", "img_per_s", "teacher_temp", "teacher_entropy", "kl",
                "embed_std", "embed_rank", "data_wait"):
        assert key in record
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    meta = read_metadata(run / "checkpoints" / "last.safetensors")
    assert meta["step"] == "3" and meta["epoch"] == "1" and meta["arch"] == cfg.model.arch
    assert (run / "checkpoints" / "epoch-0001.safetensors").exists()
    with safe_open(str(run / "checkpoints" / "last.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model/center" in keys and any(k.startswith("optim/") for k in keys) and "rng/torch" in keys


def test_two_processes_match_one(tiny_config, tmp_path):
    """--procs 2 (gloo DDP) trains on the same global batches as one process: same losses."""
    cfg = tiny_config("train.epochs=1")
    pretrain(cfg, RunOptions(out=tmp_path / "one", device="cpu"))
    pretrain(cfg, RunOptions(out=tmp_path / "two", device="cpu", procs=2))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_interrupt_and_resume_is_exact(tiny_config, tmp_path):
    cfg = tiny_config("train.epochs=2", "model.drop_path_rate=0.1")
    pretrain(cfg, RunOptions(out=tmp_path / "full", device="cpu"))
    with pytest.raises(Interrupted):
        pretrain(cfg, RunOptions(out=tmp_path / "cut", device="cpu"), InterruptAt(step=4))
    assert read_metadata(tmp_path / "cut" / "checkpoints" / "last.safetensors")["step"] == "4"
    pretrain(cfg, RunOptions(out=tmp_path / "cut", device="cpu", resume=True))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exactly, not approximately


def test_divergence_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.epochs=2")
    run = tmp_path / "run"


    import sslcli.methods.dino as dino

    real = dino.dino_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 5 else loss  # step 5 = second step of epoch 2

    monkeypatch.setattr(dino, "dino_loss", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite dino at step 5"):
        pretrain(cfg, RunOptions(out=run, device="cpu"))
    last = run / "checkpoints" / "last.safetensors"
    assert read_metadata(last)["step"] == "3"  # the end of epoch 1, written before the NaN
    assert not any(p.name.startswith(".") for p in last.parent.iterdir())  # no temp files left
    assert runs.status(run) == "diverged"  # run.log keeps the outcome for `ssl runs`


def test_corrupt_image_is_skipped_and_counted(shapes_folder, tiny_config, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_folder, data)
    victim = sorted(data.rglob("*.png"))[5]
    victim.write_bytes(b"this is not a png")
    cfg = tiny_config("train.epochs=1", f"data.path={data}")
    summary = pretrain(cfg, RunOptions(out=tmp_path / "run", device="cpu"))
    assert summary["bad_images"] == 1 and summary["steps"] == 3


def test_knn_monitor_logs_initial_periodic_and_final(tiny_config, shapes_folder, shapes_val_folder, tmp_path):
    cfg = tiny_config("train.epochs=2", "monitor.knn_every=1", f"monitor.knn_train={shapes_folder}",
                      f"monitor.knn_val={shapes_val_folder}", "monitor.knn_k=5")
    summary = pretrain(cfg, RunOptions(out=tmp_path / "run", device="cpu"), make_monitor=KnnMonitor)
    assert list(summary["knn_top1"]) == ["0", "1", "2"]
    assert summary["knn_top1_init"] == summary["knn_top1"]["0"]
    assert summary["knn_top1_final"] == summary["knn_top1"]["2"]
    assert all(0.0 <= v <= 100.0 for v in summary["knn_top1"].values())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "knn_top1" in r] == [0, 1, 2]



def test_knn_monitor_cache_equals_streaming_the_splits(tiny_config, shapes_folder, shapes_val_folder, monkeypatch):
    """Small splits are preprocessed once and reused; the accuracy equals the streamed path's, and
    a changed backbone changes it (the cache holds images, not features)."""
    from sslcli.eval import monitor as monitor_module
    from sslcli.methods import build_method

    cfg = tiny_config(f"monitor.knn_train={shapes_folder}", f"monitor.knn_val={shapes_val_folder}", "monitor.knn_k=5")
    torch.manual_seed(0)
    backbone = build_method(cfg.model, cfg.method, 1, 1).evaluated_backbone
    cached = KnnMonitor(cfg.monitor, cfg.data, cfg.data.path, torch.device("cpu"), workers=0)
    first = cached.evaluate(backbone)
    assert all(v is not None for v in cached._inputs.values()) and len(cached._inputs) == 2
    monkeypatch.setattr(monitor_module, "CACHE_BYTES", 0)
    streamed = KnnMonitor(cfg.monitor, cfg.data, cfg.data.path, torch.device("cpu"), workers=0)
    assert streamed.evaluate(backbone) == first == cached.evaluate(backbone)
    assert all(v is None for v in streamed._inputs.values())
    train_x, _ = cached._features(backbone, cached.train)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.allclose(cached._features(backbone, cached.train)[0], train_x)


def test_knn_monitor_needs_labeled_splits_for_folders(tiny_config, tmp_path):
    from sslcli.errors import ConfigError

    with pytest.raises(ConfigError, match="monitor.knn_train"):
        pretrain(tiny_config("monitor.knn_every=1"), RunOptions(out=tmp_path / "run", device="cpu"),
                 make_monitor=KnnMonitor)


def test_knn_monitor_must_be_given_when_configured(tiny_config, tmp_path):
    """Training never imports eval: a configured monitor without an evaluator is an input error."""
    from sslcli.errors import UsageError

    with pytest.raises(UsageError, match="monitor.knn_every"):
        pretrain(tiny_config("monitor.knn_every=1"), RunOptions(out=tmp_path / "run", device="cpu"))
