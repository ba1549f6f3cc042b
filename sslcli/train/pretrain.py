"""`ssl pretrain`: set up a run (directory, data, method, optimizer, resume) and drive the loop.

Entry point: `pretrain(cfg, opts, make_reporter)`. It runs in this process, joins a torchrun
group (environment variables set), or starts `opts.procs` local processes (`--gpus N` /
`--procs N`) that each run `train_process`.

Run directory: config.yaml, metrics.jsonl, summary.json, run.log, index cache,
checkpoints/last.safetensors and checkpoints/epoch-NNNN.safetensors.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from torch.nn.parallel import DistributedDataParallel

import sslcli
from sslcli.bootstrap import Bootstrapper
from sslcli.config import Config, to_dict, to_yaml
from sslcli.data.datasets import open_dataset
from sslcli.data.loader import build_train_loader
from sslcli.errors import Interrupted, UsageError
from sslcli.methods import Method, build_method
from sslcli.train import checkpoint as ckpt
from sslcli.train.distributed import (DistEnv, all_gather_rows, any_rank, barrier, in_torchrun, init_distributed, launch,
                                      set_cpu_threads)
from sslcli.train.engine import (DivergenceGuard, LoopState, Schedules, StopRequest, health_warnings, log_record,
                                 reset_interval, timed, train_step)
from sslcli.train.monitor import KnnMonitor
from sslcli.train.optim import build_optimizer
from sslcli.train.reporting import MetricsWriter, NullReporter, Reporter

log = logging.getLogger("sslcli.train")


@dataclass
class RunOptions:
    """How to run (not what to train: that is the Config)."""

    out: Path
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda
    procs: int = 1  # local processes to start (one per GPU with --gpus)


def pretrain(cfg: Config, opts: RunOptions, make_reporter: Callable[[], Reporter] = NullReporter) -> dict:
    """Train; return the summary dict (also written to summary.json)."""
    if opts.resume and not (opts.out / "checkpoints" / "last.safetensors").is_file():
        raise UsageError(f"--resume: no checkpoint at {opts.out / 'checkpoints' / 'last.safetensors'}")
    if not opts.resume and (opts.out / "checkpoints" / "last.safetensors").is_file():
        raise UsageError(f"run directory '{opts.out}' already holds a run: pass --resume to continue it, "
                         "or choose another --out")
    if not cfg.data.path:
        raise UsageError(f"preset '{cfg.name}' has no training data: pass --data PATH (an ImageFolder root, "
                         "a folder of images, or builtin:shapes)")
    open_dataset(cfg.data.path, cache_dir=opts.out)  # fail fast on a missing/empty dataset (exit 2)
    if opts.procs > 1 and not in_torchrun():
        return launch(train_process, (cfg, opts, make_reporter), opts.procs)
    return train_process(cfg, opts, make_reporter)


def train_process(cfg: Config, opts: RunOptions, make_reporter: Callable[[], Reporter]) -> dict:
    env = init_distributed(opts.device)
    set_cpu_threads(env, cfg.train.workers)
    reporter = make_reporter() if env.is_main else NullReporter()
    handler = _prepare_run_dir(cfg, opts, env)
    try:
        return _train(cfg, opts, env, reporter)
    finally:
        reporter.close()
        if handler is not None:
            logging.getLogger("sslcli").removeHandler(handler)
            handler.close()


def _prepare_run_dir(cfg: Config, opts: RunOptions, env: DistEnv) -> logging.Handler | None:
    if not env.is_main:
        return None
    (opts.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (opts.out / "config.yaml").write_text(to_yaml(cfg))
    handler = logging.FileHandler(opts.out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("sslcli").addHandler(handler)
    logging.getLogger("sslcli").setLevel(logging.INFO)
    return handler


def _build(cfg: Config, opts: RunOptions, env: DistEnv):
    if env.is_main:  # rank 0 indexes the folder (and caches the index) before the others read it
        open_dataset(cfg.data.path, cache_dir=opts.out)
    barrier(env)
    dataset = open_dataset(cfg.data.path, cache_dir=opts.out)
    loader, sampler = build_train_loader(dataset, cfg.data, cfg.optim.batch_size, env.rank, env.world,
                                         cfg.train.seed, cfg.train.workers, env.device.type == "cuda")
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    method = build_method(cfg.model, cfg.method, cfg.train.epochs, sampler.steps_per_epoch).to(env.device)
    torch.manual_seed(cfg.train.seed + 1 + env.rank)  # then one random stream per rank (drop-path)
    if env.world > 1:
        if env.device.type == "cuda":  # SyncBN in every network the method owns (gloo has no SyncBN)
            for name, network in list(method.named_children()):
                setattr(method, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(network))
        ids = [env.device.index] if env.device.type == "cuda" else None
        method.distribute(lambda m: DistributedDataParallel(m, device_ids=ids))
    if cfg.train.compile:
        method.student.backbone.compile()
    bootstrap = None
    if cfg.bootstrap.name != "none":
        labels = torch.as_tensor(dataset.labels, dtype=torch.long)
        bootstrap = Bootstrapper(cfg.bootstrap, len(dataset), method.teacher_backbone.embed_dim, labels,
                                 cfg.train.epochs, cfg.train.seed, env.device, env.rank, env.world)
    optimizer = build_optimizer(method.student, cfg.optim, env.device, method.constant_lr_parameters())
    return dataset, loader, sampler, method, optimizer, bootstrap


def _train(cfg: Config, opts: RunOptions, env: DistEnv, reporter: Reporter) -> dict:
    started = time.time()
    dataset, loader, sampler, method, optimizer, bootstrap = _build(cfg, opts, env)
    spe, epochs = sampler.steps_per_epoch, cfg.train.epochs
    sched = Schedules.build(cfg.optim, epochs, spe)
    state = LoopState(steps_per_epoch=spe)
    if opts.resume:
        _restore(opts.out / "checkpoints" / "last.safetensors", method, optimizer, state, env, bootstrap)
    metrics = MetricsWriter(opts.out / "metrics.jsonl", state.step if opts.resume else None) if env.is_main else None
    monitor = KnnMonitor(cfg.monitor, cfg.data, cfg.data.path, env.device) if cfg.monitor.knn_every and env.is_main else None
    knn = _read_knn_history(opts.out) if opts.resume else {}
    if monitor is not None and 0 not in knn:
        knn[0] = monitor.evaluate(method.teacher_backbone)
        metrics.write({"epoch": 0, "step": 0, "knn_top1": knn[0]})
        log.info("k-NN top-1 of the initial teacher: %.2f", knn[0])
    barrier(env)
    guard = DivergenceGuard(env.device)
    stop = StopRequest()
    warned: set[str] = set()
    log.info("training %s: %d images, %d steps/epoch, %d epochs, world %d on %s", cfg.name, len(dataset), spe,
             epochs, env.world, env.device)
    reporter.start(epochs * spe, state.step, spe)
    with stop.installed():
        for epoch in range(state.step // spe, epochs):
            sampler.set_position(epoch, state.step % spe)
            if bootstrap is not None:  # j* of every image, from the windows of earlier epochs
                sampler.plan = bootstrap.plan(epoch)
            _run_epoch(cfg, env, loader, method, optimizer, sched, state, guard, stop, epoch, metrics, reporter,
                       warned, opts, bootstrap)
            guard.check(state.last_checkpoint)
            if bootstrap is not None:
                state.epoch_record = _end_bootstrap_epoch(bootstrap, env, state, epoch, metrics, reporter)
            _save(opts, cfg, method, optimizer, state, env, epoch + 1, bootstrap)
            if monitor is not None and ((epoch + 1) % cfg.monitor.knn_every == 0 or epoch + 1 == epochs):
                knn[epoch + 1] = monitor.evaluate(method.teacher_backbone)
                metrics.write({"epoch": epoch + 1, "step": state.step, "knn_top1": knn[epoch + 1]})
                log.info("epoch %d: k-NN top-1 %.2f", epoch + 1, knn[epoch + 1])
            barrier(env)
    summary = _summary(cfg, env, state, knn, time.time() - started, len(dataset))
    if env.is_main:
        metrics.close()
        (opts.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_epoch(cfg, env, loader, method, optimizer, sched, state, guard, stop, epoch, metrics, reporter, warned, opts,
               bootstrap):
    clock = [time.perf_counter()]
    for batch in loader:
        state.data_wait += timed(clock)
        i = state.step
        crops = [c.to(env.device, non_blocking=True) for c in batch["crops"]]
        log_now = (i + 1) % cfg.train.log_every == 0
        out = train_step(method, optimizer, crops, epoch, sched.lr[i], sched.wd[i], cfg.optim.clip_grad,
                         cfg.train.precision, with_stats=log_now)
        method.after_step(i)
        if bootstrap is not None:  # query-before-insert of this batch's anchors into the cache
            bootstrap.observe(batch["index"], out.anchor)
        guard.observe(i, out)
        loss = out.loss.detach().float()
        state.loss_sum = loss if state.loss_sum is None else state.loss_sum + loss
        state.count += 1
        state.step += 1
        state.images += crops[0].shape[0] * env.world
        state.bad_images += int(batch["bad"])
        if log_now:
            state.stats = out.stats
            _log(cfg, env, method, sched, state, guard, epoch, metrics, reporter, warned)
        state.compute += timed(clock)
        if (stop.requested if env.world == 1 else log_now and any_rank(stop.requested, env)):
            guard.check(state.last_checkpoint)
            _save(opts, cfg, method, optimizer, state, env, None, bootstrap)
            raise Interrupted(f"interrupted at step {state.step}; checkpoint written to {state.last_checkpoint} "
                              f"(continue with --resume --out {opts.out})")


def _log(cfg, env, method, sched, state, guard, epoch, metrics, reporter, warned) -> None:
    guard.check(state.last_checkpoint)
    record = log_record(cfg, state, epoch, sched, method)
    reset_interval(state)
    if not env.is_main:
        return
    metrics.write(record)
    state.last_record = record
    reporter.update(state.step, record)
    if epoch >= 1:
        embed_dim = method.teacher_backbone.embed_dim
        for kind, message in health_warnings(record, cfg.method.out_dim, embed_dim):
            if kind not in warned:
                warned.add(kind)
                log.warning(message)
                reporter.warn(message)


def _end_bootstrap_epoch(bootstrap: Bootstrapper, env: DistEnv, state: LoopState, epoch: int,
                         metrics: MetricsWriter | None, reporter: Reporter) -> dict[str, float]:
    record = bootstrap.end_epoch()  # collective
    if env.is_main:
        metrics.write({"epoch": epoch + 1, "step": state.step, **record})
        reporter.epoch_end(epoch + 1, record)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.2f}" for k, v in record.items()))
    return record


def _save(opts: RunOptions, cfg: Config, method: Method, optimizer, state: LoopState, env: DistEnv,
          epoch_done: int | None, bootstrap: Bootstrapper | None) -> None:
    """All ranks gather RNG states (and bootstrap shards); rank 0 writes last.safetensors
    (+ epoch-NNNN when due)."""
    extra = {}
    if bootstrap is not None:
        full = bootstrap.state_dict()  # collective; None on ranks other than 0
        extra = {f"bootstrap.{k}": v for k, v in (full or {}).items()}
    rng = {"torch": all_gather_rows(torch.get_rng_state(), env)}
    if env.device.type == "cuda":
        rng["cuda"] = all_gather_rows(torch.cuda.get_rng_state(env.device), env)
    path = opts.out / "checkpoints" / "last.safetensors"
    if env.is_main:
        optim_state, groups = ckpt.optimizer_to_tensors(optimizer)
        loss_sum = state.loss_sum if state.loss_sum is not None else torch.zeros(())
        engine = {"loss_sum": loss_sum.reshape(1), "count": torch.tensor([state.count]),
                  "bad_images": torch.tensor([state.bad_images])}
        meta = {"config": to_yaml(cfg), "arch": cfg.model.arch, "epoch": str(state.step // state.steps_per_epoch),
                "step": str(state.step), "world": str(env.world), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        training = ckpt.TrainingState(method.state_dict(), optim_state, groups, rng, engine, extra, meta)
        ckpt.save_training_state(path, training)
        if epoch_done is not None and (epoch_done % cfg.train.checkpoint_every == 0 or epoch_done == cfg.train.epochs):
            ckpt.save_training_state(opts.out / "checkpoints" / f"epoch-{epoch_done:04d}.safetensors", training)
    state.last_checkpoint = path
    barrier(env)


def _restore(path: Path, method: Method, optimizer, state: LoopState, env: DistEnv,
             bootstrap: Bootstrapper | None) -> None:
    saved = ckpt.load_training_state(path)
    if bootstrap is not None:
        boot = {k.removeprefix("bootstrap."): v for k, v in saved.extra.items() if k.startswith("bootstrap.")}
        if not boot:
            raise UsageError(f"checkpoint '{path}' has no bootstrap state but the config has "
                             f"bootstrap.name {bootstrap.cfg.name}")
        try:
            bootstrap.load_state_dict(boot)
        except ValueError as e:
            raise UsageError(f"checkpoint '{path}': {e}") from None
    missing, unexpected = method.load_state_dict(saved.model, strict=False)
    if missing or unexpected:
        raise UsageError(f"checkpoint '{path}' does not match this config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    ckpt.optimizer_from_tensors(optimizer, saved.optim_state, saved.optim_groups)
    if saved.rng["torch"].shape[0] == env.world:
        torch.set_rng_state(saved.rng["torch"][env.rank])
        if env.device.type == "cuda" and "cuda" in saved.rng:
            torch.cuda.set_rng_state(saved.rng["cuda"][env.rank], env.device)
    else:
        log.warning("resuming with %d processes instead of %d: random streams are re-seeded",
                    env.world, saved.rng["torch"].shape[0])
    state.step = saved.step
    state.loss_sum = saved.engine["loss_sum"].reshape(()).to(env.device)
    state.count = int(saved.engine["count"])
    state.bad_images = int(saved.engine["bad_images"])
    state.last_checkpoint = path
    log.info("resumed from %s at step %d", path, state.step)


def _read_knn_history(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["epoch"]: r["knn_top1"] for r in records if "knn_top1" in r}


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
