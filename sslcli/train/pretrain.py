"""`ssl pretrain`: set up a run (directory, data, method, optimizer, resume) and drive the loop.

Entry point: `pretrain(cfg, opts, make_reporter)`. It runs in this process, joins a torchrun
group (environment variables set), or starts `opts.procs` local processes (`--gpus N` /
`--procs N`) that each run `train_process`.

Run directory: config.yaml, metrics.jsonl, summary.json, run.log, index cache,
checkpoints/last.safetensors and checkpoints/epoch-NNNN.safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch

import sslcli
from sslcli import runfiles
from sslcli.config import Config, flatten, load_config, to_dict, to_yaml
from sslcli.data import EpochBatchSampler
from sslcli.data.datasets import open_dataset
from sslcli.errors import SSLError, UsageError
from sslcli.methods import build_method
from sslcli.models.pretrained import fit_init_weights, read_init_weights
from sslcli.train.distributed import DistEnv, barrier, in_torchrun, init_distributed, launch, set_cpu_threads
from sslcli.train.engine import LoopState
from sslcli.train.reporting import NullReporter, Reporter
from sslcli.train.trainer import MonitorFactory, Trainer

log = logging.getLogger("sslcli.train")


@dataclass
class RunOptions:
    """How to run (not what to train: that is the Config)."""

    out: Path
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda
    procs: int = 1  # local processes to start (one per GPU with --gpus)


def pretrain(cfg: Config, opts: RunOptions, make_reporter: Callable[[], Reporter] = NullReporter,
             make_monitor: MonitorFactory | None = None) -> dict:
    """Train; return the summary dict (also written to summary.json).

    make_monitor: builds the online evaluator when `monitor.knn_every` is set (the CLI passes
    sslcli.eval.monitor.KnnMonitor; training never imports eval). Called on rank 0 only.
    The run directory is locked for the whole run (a second `ssl pretrain` into it exits 2);
    temporary files left by a killed run are removed first.
    """
    last = runfiles.last_checkpoint(opts.out)
    if opts.resume and not last.is_file():
        raise UsageError(f"--resume: no checkpoint at {last}")
    holds_lock = not in_torchrun() or os.environ.get("RANK") == "0"  # torchrun: rank 0 holds it
    with runfiles.run_lock(opts.out) if holds_lock else contextlib.nullcontext():
        if holds_lock:
            for folder in (opts.out, opts.out / runfiles.CHECKPOINTS):
                for path in runfiles.remove_stale_temp(folder):
                    log.info("removed %s, left by an interrupted write", path)
        if opts.resume:
            check_resume_config(runfiles.read_checkpoint_header(last).config, cfg, last)
        elif last.is_file():
            raise UsageError(f"run directory '{opts.out}' already holds a run: pass --resume to continue it, "
                             "or choose another --out")
        if not cfg.data.path:
            raise UsageError(f"preset '{cfg.name}' has no training data: pass --data PATH (an ImageFolder root, "
                             "a folder of images, or builtin:shapes)")
        open_dataset(cfg.data.path, cache_dir=opts.out)  # fail fast on a missing/empty dataset (exit 2)
        if opts.procs > 1 and not in_torchrun():
            return launch(train_process, (cfg, opts, make_reporter, make_monitor), opts.procs)
        return train_process(cfg, opts, make_reporter, make_monitor)


# Keys that may differ from the run's config on --resume: where the data lives (the same images),
# how long to train, and how the run is executed and reported. Prefixes end with ".".
RESUMABLE_KEYS = ("name", "notes", "source.", "data.path", "data.decode_on", "model.attention", "train.epochs",
                  "train.workers", "train.log_every", "train.checkpoint_every", "train.compile", "train.precision",
                  "monitor.")


def config_differences(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every leaf that differs, in config order."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in list(a) + [k for k in b if k not in a] if a.get(k) != b.get(k)]


def check_resume_config(saved: Config, cfg: Config, checkpoint: Path) -> None:
    """UsageError naming the keys where `cfg` differs from the run's config in a way a resume
    cannot honour (anything outside RESUMABLE_KEYS)."""
    fixed = [(k, a, b) for k, a, b in config_differences(saved, cfg)
             if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS)]
    if not fixed:
        return
    shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in fixed[:4])
    more = f" and {len(fixed) - 4} more" if len(fixed) > 4 else ""
    raise UsageError(f"--resume: the config differs from the run's ({checkpoint}) in {shown}{more}; on resume "
                     f"only {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUMABLE_KEYS)} "
                     "may change (start a new run for the others)")


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's own config (its last checkpoint's header) with `--set` overrides applied: what
    `ssl pretrain --resume --out DIR` trains when no preset or config file is given."""
    last = runfiles.last_checkpoint(run_dir)
    if not last.is_file():
        raise UsageError(f"--resume: no checkpoint at {last}")
    return load_config(overrides=overrides, base=to_dict(runfiles.read_checkpoint_header(last).config))


def check_run(cfg: Config, world: int = 1) -> None:
    """What `ssl pretrain --dry-run` checks without training: the dataset opens and fits the batch
    over `world` processes, and the method builds (on the meta device: no memory, no weights)."""
    if not cfg.data.path:
        raise UsageError(f"preset '{cfg.name}' has no training data: pass --data PATH")
    dataset = open_dataset(cfg.data.path)
    steps_per_epoch = EpochBatchSampler.check_sizes(len(dataset), cfg.optim.batch_size, world)
    with torch.device("meta"):
        method = build_method(cfg.model, cfg.method, cfg.train.epochs, steps_per_epoch)
    if cfg.model.init_from:  # keys and shapes checked against the meta backbone
        fit_init_weights(method.student_backbone, read_init_weights(cfg.model.init_from))


def train_process(cfg: Config, opts: RunOptions, make_reporter: Callable[[], Reporter],
                  make_monitor: MonitorFactory | None = None) -> dict:
    env = init_distributed(opts.device)
    set_cpu_threads(env, cfg.train.workers)
    reporter = make_reporter() if env.is_main else NullReporter()
    handler = _prepare_run_dir(cfg, opts, env)
    try:
        return _train(cfg, opts, env, reporter, make_monitor)
    except SSLError as e:  # the outcome stays in the run directory (`ssl runs` reads it); stderr gets it once, from the CLI
        if handler is not None:
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (e,), None))
        raise
    finally:
        reporter.close()
        if handler is not None:
            logging.getLogger("sslcli").removeHandler(handler)
            handler.close()


def _prepare_run_dir(cfg: Config, opts: RunOptions, env: DistEnv) -> logging.Handler | None:
    if not env.is_main:
        return None
    (opts.out / runfiles.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    runfiles.atomic_write_text(opts.out / runfiles.CONFIG_FILE, to_yaml(cfg), what="run config")
    handler = logging.FileHandler(opts.out / runfiles.LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("sslcli").addHandler(handler)
    logging.getLogger("sslcli").setLevel(logging.INFO)
    return handler


def _train(cfg: Config, opts: RunOptions, env: DistEnv, reporter: Reporter,
           make_monitor: MonitorFactory | None) -> dict:
    started = time.time()
    if env.is_main:  # rank 0 indexes the folder (and caches the index) before the others read it
        open_dataset(cfg.data.path, cache_dir=opts.out)
    barrier(env)
    dataset = open_dataset(cfg.data.path, cache_dir=opts.out)
    trainer = Trainer(cfg, opts.out, env, dataset, reporter, make_monitor)
    if opts.resume:
        trainer.restore(runfiles.last_checkpoint(opts.out))
    elif cfg.model.init_from:
        init = trainer.init_backbones(cfg.model.init_from)
        if env.is_main:  # kept for the summaries of later invocations (--resume does not read the file again)
            record = json.dumps(init.describe(), indent=2) + "\n"
            runfiles.atomic_write_text(opts.out / runfiles.INIT_FILE, record, what="init record")
    knn = _read_knn_history(opts.out) if opts.resume else {}
    trainer.fit(opts.resume, knn)
    summary = _summary(cfg, env, trainer.state, knn, time.time() - started, len(dataset))
    summary["health_warnings"] = sorted(trainer.warned)  # collapse signals the method named (this invocation)
    init = runfiles.read_json(opts.out / runfiles.INIT_FILE) if cfg.model.init_from else None
    if init is not None:
        summary["init_from"] = init
    if env.is_main:
        runfiles.atomic_write_text(opts.out / runfiles.SUMMARY_FILE, json.dumps(summary, indent=2) + "\n", what="summary")
    return summary


def _read_knn_history(out: Path) -> dict[int, float]:
    return {r["epoch"]: r["knn_top1"] for r in runfiles.read_jsonl(out / runfiles.METRICS_FILE) if "knn_top1" in r}


def _summary(cfg: Config, env: DistEnv, state: LoopState, knn: dict[int, float], seconds: float, n: int) -> dict:
    summary = {
        "name": cfg.name, "epochs": cfg.train.epochs, "steps": state.step, "images": n,
        "final_loss": state.last_record.get("loss"), "bad_images": state.bad_images, "wall_seconds": round(seconds, 1), "world": env.world,
        "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
        "source": to_dict(cfg.source),
        "versions": {"sslcli": sslcli.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }
    if knn:
        summary["knn_top1_init"] = knn.get(0)
        summary["knn_top1_final"] = knn[max(knn)]
        summary["knn_top1"] = {str(k): v for k, v in sorted(knn.items())}
    if state.epoch_record:  # the last epoch's bootstrap_ratio, nn_acc, nn2_acc
        summary["bootstrap"] = state.epoch_record
    return summary
