"""Faults during a run and hostile files: a kill inside a checkpoint write, a full disk, a dead
loader worker, two runs into one --out, broken or foreign weights, --resume with another config.

The long fault-injection campaign (20 kills, real worker and rank kills) is benchmarks/faults.py.
"""

from __future__ import annotations

import errno
import json
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import TINY
from run_checks import InterruptAt, losses
from sslcli import runfiles
from sslcli.cli.app import app
from sslcli.errors import Interrupted, StorageError, TrainingError
from sslcli.train.pretrain import RunOptions, pretrain

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def tiny_args(data, *extra) -> list[str]:
    args = ["pretrain", "--preset", "demo", "--data", str(data), "--quiet"]
    for item in TINY + list(extra):
        args += ["--set", item]
    return args


# ----------------------------------------------------------------------------- a kill inside a checkpoint write

KILL_IN_SECOND_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    from safetensors.torch import save
    import sslcli.runfiles as runfiles
    calls = [0]
    def half_then_die(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        calls[0] += 1
        with open(filename, "wb") as f:
            f.write(data if calls[0] < 2 else data[: len(data) // 2])
        if calls[0] == 2:  # the second checkpoint (epoch 2's last.safetensors), half written
            os.kill(os.getpid(), signal.SIGKILL)
    runfiles.save_file = half_then_die
    from sslcli.cli.app import app
    app(sys.argv[1:], prog_name="ssl")
""")


def test_kill_during_checkpoint_write_keeps_last_good_and_resumes_exactly(shapes_folder, tmp_path):
    args = tiny_args(shapes_folder, "train.epochs=3", "train.checkpoint_every=100")
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    assert run(*args, "--out", reference).exit_code == 0

    killed = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_CHECKPOINT, *args, "--out", str(victim)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = victim / "checkpoints"
    temps = list(checkpoints.glob(".*.tmp"))
    assert len(temps) == 1  # the half-written file never got the real name
    header = runfiles.read_checkpoint_header(checkpoints / "last.safetensors")
    steps_per_epoch = header.step // header.epoch
    assert header.epoch == 1  # the last good checkpoint
    runfiles.read_sections(checkpoints / "last.safetensors")  # and it reads back whole
    runfiles.parse_config((victim / "config.yaml").read_text(), victim / "config.yaml")
    assert runfiles.read_jsonl(victim / "metrics.jsonl")[-1]["step"] >= 2 * steps_per_epoch

    resumed = run("pretrain", "--out", victim, "--resume", "--quiet")  # the run's own config
    assert resumed.exit_code == 0, resumed.stderr
    assert not list(checkpoints.glob(".*.tmp"))
    assert losses(victim) == losses(reference)


# ----------------------------------------------------------------------------- a full disk


def test_atomic_save_on_full_disk_raises_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    runfiles.atomic_save({"w": torch.ones(3)}, {}, path)
    before = path.read_bytes()

    def no_space(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfiles, "save_file", no_space)
    with pytest.raises(StorageError, match=r"cannot write checkpoint '.*last\.safetensors': No space left on device"):
        runfiles.atomic_save({"w": torch.zeros(3)}, {}, path, what="checkpoint")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # no temporary file left


def test_full_disk_during_training_exits_1_and_the_run_resumes(shapes_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(*tiny_args(shapes_folder, "train.epochs=1"), "--out", out).exit_code == 0
    last = runfiles.last_checkpoint(out)
    before = last.read_bytes()
    real = runfiles.save_file

    def too_large(tensors, filename, metadata=None):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(runfiles, "save_file", too_large)
    failed = run("pretrain", "--out", out, "--resume", "--set", "train.epochs=2", "--quiet")
    assert failed.exit_code == 1
    assert "cannot write checkpoint" in one_line_error(failed) and "File too large" in failed.stderr
    assert last.read_bytes() == before
    monkeypatch.setattr(runfiles, "save_file", real)
    resumed = run("pretrain", "--out", out, "--resume", "--set", "train.epochs=2", "--quiet")
    assert resumed.exit_code == 0, resumed.stderr
    assert runfiles.read_checkpoint_header(last).epoch == 2


# ----------------------------------------------------------------------------- crashed workers, two runs, one --out


def test_dead_loader_worker_is_one_training_error(tiny_config, tmp_path, monkeypatch):
    import sslcli.train.trainer as trainer

    real = trainer.build_train_loader

    def dying_loader(*args, **kwargs):
        loader, sampler = real(*args, **kwargs)

        def batches():
            yield from list(loader)[:2]
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
        return batches(), sampler

    monkeypatch.setattr(trainer, "build_train_loader", dying_loader)
    with pytest.raises(TrainingError, match=r"a data-loading worker died \(DataLoader worker \(pid 4242\)"):
        pretrain(tiny_config("train.epochs=1"), RunOptions(out=tmp_path / "run", device="cpu"))


def test_second_run_into_a_locked_out_exits_2(shapes_folder, tmp_path):
    out = tmp_path / "run"
    with runfiles.run_lock(out):  # as a running `ssl pretrain` holds it
        result = run(*tiny_args(shapes_folder, "train.epochs=1"), "--out", out)
    assert result.exit_code == 2
    assert f"run directory '{out}' is in use by another ssl pretrain (pid" in one_line_error(result)
    assert not runfiles.last_checkpoint(out).exists()
    assert run(*tiny_args(shapes_folder, "train.epochs=1"), "--out", out).exit_code == 0  # released


# ----------------------------------------------------------------------------- hostile or wrong files


@pytest.fixture
def finished_run(shapes_folder, tmp_path):
    out = tmp_path / "run"
    assert run(*tiny_args(shapes_folder, "train.epochs=1"), "--out", out).exit_code == 0
    return out


def knn_args(weights, shapes_folder, shapes_val_folder):
    return ["eval", "knn", "--weights", weights, "--train", shapes_folder, "--val", shapes_val_folder,
            "--device", "cpu", "--workers", "0"]


@pytest.mark.parametrize("damage, fragment", [
    (lambda b: b[: len(b) // 2], "is not a valid safetensors file"),
    (lambda b: b"\x00" * 64, "is not a valid safetensors file"),
    (lambda b: b"garbage, not weights\n" * 10, "is not a valid safetensors file"),
])
def test_broken_safetensors_exit_2_for_weights_and_resume(finished_run, shapes_folder, shapes_val_folder,
                                                          damage, fragment):
    last = runfiles.last_checkpoint(finished_run)
    last.write_bytes(damage(last.read_bytes()))
    evaluated = run(*knn_args(last, shapes_folder, shapes_val_folder))
    assert evaluated.exit_code == 2 and fragment in one_line_error(evaluated)
    resumed = run("pretrain", "--out", finished_run, "--resume", "--set", "train.epochs=2", "--quiet")
    assert resumed.exit_code == 2 and fragment in one_line_error(resumed)


class _Payload:
    """Unpickling this would create a file: the test proves nothing is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pytorch_pickle_is_refused_and_never_unpickled(tmp_path, shapes_folder, shapes_val_folder, writer):
    marker, path = tmp_path / "was-unpickled", tmp_path / "dino_deitsmall16_pretrain.pth"
    payload = {"state_dict": {"w": torch.ones(2)}, "evil": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    result = run(*knn_args(path, shapes_folder, shapes_val_folder))
    assert result.exit_code == 2
    assert "is a PyTorch pickle file: sslcli never unpickles weights" in one_line_error(result)
    assert not marker.exists()


def test_weights_of_another_size_exit_2_naming_the_tensor(finished_run, tmp_path, shapes_folder, shapes_val_folder):
    export = tmp_path / "export.safetensors"
    assert run("export", "--weights", finished_run, "--out", export).exit_code == 0
    meta = runfiles.read_metadata(export)
    tensors = runfiles.read_tensors(export)
    tensors["cls_token"] = torch.zeros(1, 1, 48)  # as if from a wider model
    save_file(tensors, str(export), metadata=meta)
    result = run(*knn_args(export, shapes_folder, shapes_val_folder))
    assert result.exit_code == 2
    assert "size mismatch for cls_token" in one_line_error(result)


def test_resume_with_another_config_names_the_keys_and_the_allowed_ones(finished_run, shapes_folder):
    result = run(*tiny_args(shapes_folder, "train.epochs=2", "optim.lr=0.01", "model.kwargs.embed_dim=64"),
                 "--out", finished_run, "--resume")
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "model.kwargs.embed_dim (32 -> 64)" in line and "optim.lr (0.002 -> 0.01)" in line
    assert "only name, notes, source.*, data.path" in line and "train.epochs" in line
    assert "train.epochs (" not in line  # allowed, so not listed as a difference


def test_resume_takes_the_runs_config_and_allowed_overrides(finished_run):
    result = run("pretrain", "--out", finished_run, "--resume", "--set", "train.epochs=2", "--quiet", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and summary["steps"] == 2 * 3
    assert "epochs: 2" in (finished_run / "config.yaml").read_text()


def test_read_jsonl_skips_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert runfiles.read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_remove_stale_temp_deletes_only_temporary_files(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".last.safetensors.abc123.tmp").write_bytes(b"half")
    (folder / "last.safetensors").write_bytes(b"keep")
    assert [p.name for p in runfiles.remove_stale_temp(folder)] == [".last.safetensors.abc123.tmp"]
    assert [p.name for p in folder.iterdir()] == ["last.safetensors"]



def test_two_process_resume_is_exact(tiny_config, tmp_path):
    """Rank 1 restores its own RNG row of the checkpoint (a row view once restored garbage)."""
    cfg = tiny_config("train.epochs=2", "model.drop_path_rate=0.1")  # drop-path draws from each rank's stream
    pretrain(cfg, RunOptions(out=tmp_path / "full", device="cpu", procs=2))
    with pytest.raises(Interrupted):
        pretrain(cfg, RunOptions(out=tmp_path / "cut", device="cpu", procs=2), make_reporter=InterruptAt(4))
    pretrain(cfg, RunOptions(out=tmp_path / "cut", device="cpu", procs=2, resume=True))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
