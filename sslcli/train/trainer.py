"""The training loop, one for all methods: a `Trainer` per process.

Per batch: batch.decode(device) (`data.decode_on: device`: JPEG bytes -> uint8 crops on the device) ->
batch.to(device) (uint8 crops) -> batch.colour (the photometric augmentation, batched on
the device, `data.augment_on: device`; training on a CPU the loader's collate has already done it, in
its workers or, with train.workers 0, in this process) ->
method.loss(batch, ctx) -> backward -> method.cancel_gradients ->
clip (per parameter or global) -> optimizer step -> method.after_step(ctx, out) (EMA, centre) ->
bootstrap.observe(ids, anchor). Schedules are precomputed per iteration. The step has no host
syncs: loss sums, divergence flags and diagnostics stay on the device and are read only every
`train.log_every` steps (and at epoch ends), when a metrics.jsonl line is written.

Checkpoints: `last.safetensors` at every epoch end (and on Ctrl-C, at the last completed step),
`epoch-NNNN.safetensors` every `checkpoint_every` epochs. A checkpoint is written only after the
divergence guard has confirmed every step since the previous one was finite, so the last
checkpoint on disk is always good. Resume restores everything (weights, optimizer, method state,
RNG of every rank, sampler position, log-interval accumulators): the resumed loss sequence equals
the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sslcli import runfiles
from sslcli.bootstrap import Bootstrapper
from sslcli.config import Config, DataConfig, MonitorConfig, OptimConfig, to_yaml
from sslcli.data import Batch, EpochBatchSampler, ImageDataset, build_train_loader
from sslcli.data.masking import patch_grid
from sslcli.device import autocast
from sslcli.errors import Interrupted, TrainingError, UsageError
from sslcli.methods import Method, StepContext, StepOutput, build_method
from sslcli.models import Backbone
from sslcli.models.pretrained import InitWeights, load_init_weights, read_init_weights
from sslcli.train import checkpoint as ckpt
from sslcli.train.distributed import DistEnv, all_gather_rows, any_rank, barrier
from sslcli.train.engine import DivergenceGuard, LoopState, Schedules, StopRequest, reset_interval, timed
from sslcli.train.optim import build_optimizer, clip_gradients, set_lr_wd
from sslcli.train.reporting import MetricsWriter, Reporter

log = logging.getLogger("sslcli.train")


class Monitor(Protocol):
    """An evaluator of the evaluated backbone during training (e.g. sslcli.eval.monitor.KnnMonitor)."""

    def evaluate(self, backbone: Backbone) -> float: ...


MonitorFactory = Callable[[MonitorConfig, DataConfig, str, torch.device], Monitor]


def train_step(method: Method, optimizer: torch.optim.Optimizer, batch: Batch, ctx: StepContext, lr: float,
               wd: float, optim: OptimConfig, precision: str, freeze_backbone: bool = False) -> StepOutput:
    """loss -> backward -> cancel frozen gradients -> clip -> optimizer step -> after_step.

    freeze_backbone: drop the student backbone's timm-weight gradients (train.freeze_backbone_epochs):
    the optimizer skips parameters without a gradient, so they and their optimizer state stay as
    they are; the teacher's EMA of an unchanged student leaves the teacher's backbone unchanged too.
    """
    set_lr_wd(optimizer, lr, wd)
    with autocast(batch.ids.device, precision):
        out = method.loss(batch, ctx)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    method.cancel_gradients(ctx)
    if freeze_backbone:
        method.student_backbone.model.zero_grad(set_to_none=True)
    clip_gradients(method.student, optim.clip_grad, optim.clip_mode)
    optimizer.step()
    method.after_step(ctx, out)
    return out


def init_backbones(method: Method, init: InitWeights) -> list[str]:
    """The student's and the evaluated backbone (the teacher, or the one network of SimSiam) start
    from `init`'s weights; heads and method state stay as built. Returns the adaptations made."""
    notes: list[str] = []
    for backbone in {id(b): b for b in (method.student_backbone, method.evaluated_backbone)}.values():
        notes = load_init_weights(backbone, init)
    return notes


@contextlib.contextmanager
def worker_deaths_as_errors(state: LoopState) -> Iterator[None]:
    """A loader worker that died (killed, out of memory) becomes one TrainingError line (exit 1)
    instead of torch's RuntimeError traceback. torch raises it from `next(loader)` or, through its
    SIGCHLD handler, wherever the main thread is at that moment: hence around the whole loop."""
    try:
        yield
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        kept = f"the last checkpoint {state.last_checkpoint} is intact" if state.last_checkpoint else "no checkpoint yet"
        raise TrainingError(f"a data-loading worker died ({str(e).splitlines()[0].rstrip('. ')}); {kept}") from None


class Trainer:
    """Owns the method, optimizer, loader, bootstrap and loop state of one process's run."""

    def __init__(self, cfg: Config, out: Path, env: DistEnv, dataset: ImageDataset, reporter: Reporter,
                 make_monitor: MonitorFactory | None = None):
        self.cfg, self.out, self.env, self.reporter = cfg, out, env, reporter
        self.dataset = dataset
        # The method comes before the loader (the mask grid needs its patch size); size errors first.
        spe = EpochBatchSampler.check_sizes(len(dataset), cfg.optim.batch_size, env.world)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.method: Method = build_method(cfg.model, cfg.method, cfg.train.epochs, spe).to(env.device)
        self.loader, self.sampler = build_train_loader(dataset, cfg.data, cfg.optim.batch_size, env.rank, env.world,
                                                       cfg.train.seed, cfg.train.workers, env.device.type == "cuda",
                                                       device=env.device, mask_grid=patch_grid(cfg.data, self.method.student_backbone.patch_size))
        torch.manual_seed(cfg.train.seed + 1 + env.rank)  # then one random stream per rank (drop-path)
        self._distribute()
        if cfg.train.compile:
            self.method.compile_backbones()
        self.bootstrap = self._bootstrapper()
        self.optimizer = build_optimizer(self.method.student, cfg.optim, env.device,
                                         self.method.constant_lr_parameters())
        self.sched = Schedules.build(cfg.optim, cfg.train.epochs, spe)
        self.state = LoopState(steps_per_epoch=spe)
        self.frozen_epochs = cfg.train.frozen_backbone_epochs(cfg.model.init_from)  # head warm-up
        self.guard = DivergenceGuard(env.device)
        self.stop = StopRequest()
        self.warned: set[str] = set()
        wants_monitor = cfg.monitor.knn_every and env.is_main
        if wants_monitor and make_monitor is None:
            raise UsageError("monitor.knn_every is set but no monitor was given to pretrain()")
        self.monitor = make_monitor(cfg.monitor, cfg.data, cfg.data.path, env.device) if wants_monitor else None
        self.metrics: MetricsWriter | None = None

    def _distribute(self) -> None:
        if self.env.world == 1:
            return
        if self.env.device.type == "cuda":  # SyncBN in every network the method owns (gloo has no SyncBN)
            for name, network in list(self.method.named_children()):
                setattr(self.method, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(network))
        ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.method.distribute(lambda m: DistributedDataParallel(m, device_ids=ids))

    def _bootstrapper(self) -> Bootstrapper | None:
        b = self.cfg.bootstrap
        if b.name == "none":
            return None
        labels = torch.as_tensor(self.dataset.labels, dtype=torch.long)
        return Bootstrapper(b, len(self.dataset), self.method.evaluated_backbone.embed_dim, labels,
                            self.cfg.train.epochs, self.cfg.train.seed, self.env.device, self.env.rank, self.env.world)

    # ------------------------------------------------------------------------- the loop

    def fit(self, resume: bool, knn: dict[int, float]) -> None:
        """Train from the current state to the last epoch; `knn` collects monitor figures by epoch."""
        cfg, state, spe = self.cfg, self.state, self.sampler.steps_per_epoch
        if self.env.is_main:
            self.metrics = MetricsWriter(self.out / runfiles.METRICS_FILE, state.step if resume else None)
        self._monitor(0, knn)
        barrier(self.env)
        log.info("training %s: %d images, %d steps/epoch, %d epochs, world %d on %s", cfg.name, len(self.dataset),
                 spe, cfg.train.epochs, self.env.world, self.env.device)
        self.reporter.start(cfg.train.epochs * spe, state.step, spe)
        try:
            with self.stop.installed(), worker_deaths_as_errors(state):
                for epoch in range(state.step // spe, cfg.train.epochs):
                    self._epoch(epoch)
                    self.guard.check(state.last_checkpoint, self.method.divergence_hint)
                    if self.bootstrap is not None:
                        self._end_bootstrap_epoch(epoch)
                    self.save(epoch + 1)
                    if (epoch + 1) % max(cfg.monitor.knn_every, 1) == 0 or epoch + 1 == cfg.train.epochs:
                        self._monitor(epoch + 1, knn)
                    barrier(self.env)
        finally:
            if self.metrics is not None:
                self.metrics.close()

    def _epoch(self, epoch: int) -> None:
        state, spe = self.state, self.sampler.steps_per_epoch
        self.sampler.set_position(epoch, state.step % spe)
        if self.bootstrap is not None:  # j* of every image, from the windows of earlier epochs
            self.sampler.plan = self.bootstrap.plan(epoch)
        clock = [time.perf_counter()]
        for batch in self.loader:
            state.data_wait += timed(clock)
            log_now = (state.step + 1) % self.cfg.train.log_every == 0
            batch = batch.decode(self.env.device)  # data.decode_on: device: JPEG bytes -> uint8 crops (else no-op)
            state.bad_images += int(batch.bad)  # read on the host (decode failures included), before the batch moves
            batch = batch.to(self.env.device).colour(self.cfg.data.mean, self.cfg.data.std)  # device augmentation
            out = self._step(batch, StepContext(epoch, state.step, log_now))
            if log_now:
                state.stats = out.stats
                self._log(epoch)
            state.compute += timed(clock)
            if self.stop.requested if self.env.world == 1 else log_now and any_rank(self.stop.requested, self.env):
                self.guard.check(state.last_checkpoint, self.method.divergence_hint)
                self.save(None)
                raise Interrupted(f"interrupted at step {state.step}; checkpoint written to {state.last_checkpoint} "
                                  f"(continue with --resume --out {self.out})")

    def _step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """One optimizer step on one batch, bootstrap and loop bookkeeping; no host syncs."""
        state = self.state
        out = train_step(self.method, self.optimizer, batch, ctx, self.sched.lr[ctx.step], self.sched.wd[ctx.step],
                         self.cfg.optim, self.cfg.train.precision, ctx.epoch < self.frozen_epochs)
        if self.bootstrap is not None:  # query-before-insert of this batch's anchors into the cache
            self.bootstrap.observe(batch.ids, out.anchor)
        self.guard.observe(ctx.step, out)
        loss = out.loss.detach().float()
        state.loss_sum = loss if state.loss_sum is None else state.loss_sum + loss
        state.count += 1
        state.step += 1
        state.images += batch.size * self.env.world
        state.scalars = out.scalars
        return out

    # ------------------------------------------------------------------------- reporting

    def _log(self, epoch: int) -> None:
        state = self.state
        self.guard.check(state.last_checkpoint, self.method.divergence_hint)
        record = self._record(epoch)
        reset_interval(state)
        if not self.env.is_main:
            return
        self.metrics.write(record)
        state.last_record = record
        self.reporter.update(state.step, record)
        if epoch >= 1:
            for kind, message in self.method.health(record):
                if kind not in self.warned:
                    self.warned.add(kind)
                    log.warning(message)
                    self.reporter.warn(message)

    def _record(self, epoch: int) -> dict:
        """The metrics.jsonl line of the interval that just closed (host sync happens here)."""
        state, i = self.state, self.state.step - 1
        seconds = max(state.data_wait + state.compute, 1e-9)
        loss_sum = state.loss_sum.detach().clone()
        if self.env.world > 1:  # the global batch's loss, not rank 0's share
            dist.all_reduce(loss_sum)
            loss_sum /= self.env.world
        record = {"epoch": epoch, "step": state.step, "loss": float(loss_sum.item()) / max(state.count, 1),
                  "lr": self.sched.lr[i], "wd": self.sched.wd[i], **state.scalars,
                  "img_per_s": state.images / seconds, "data_wait": state.data_wait / seconds,
                  "bad_images": state.bad_images}
        record.update({k: float(v.item()) for k, v in state.stats.items()})
        return record

    def _end_bootstrap_epoch(self, epoch: int) -> None:
        record = self.bootstrap.end_epoch()  # collective
        self.state.epoch_record = record
        if self.env.is_main:
            self.metrics.write({"epoch": epoch + 1, "step": self.state.step, **record})
            self.reporter.epoch_end(epoch + 1, record)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.2f}" for k, v in record.items()))

    def _monitor(self, epoch: int, knn: dict[int, float]) -> None:
        if self.monitor is None or epoch in knn:
            return
        knn[epoch] = self.monitor.evaluate(self.method.evaluated_backbone)
        self.metrics.write({"epoch": epoch, "step": self.state.step, "knn_top1": knn[epoch]})
        log.info("epoch %d: k-NN top-1 %.2f", epoch, knn[epoch])

    # ------------------------------------------------------------------------- checkpoints

    def save(self, epoch_done: int | None) -> None:
        """All ranks gather RNG states (and bootstrap shards); rank 0 writes last.safetensors
        (+ epoch-NNNN when due)."""
        env, state, cfg = self.env, self.state, self.cfg
        extra = {}
        if self.bootstrap is not None:
            full = self.bootstrap.state_dict()  # collective; None on ranks other than 0
            extra = {f"bootstrap.{k}": v for k, v in (full or {}).items()}
        rng = {"torch": all_gather_rows(torch.get_rng_state(), env)}
        if env.device.type == "cuda":
            rng["cuda"] = all_gather_rows(torch.cuda.get_rng_state(env.device), env)
        path = runfiles.last_checkpoint(self.out)
        if env.is_main:
            optim_state, groups = ckpt.optimizer_to_tensors(self.optimizer)
            loss_sum = state.loss_sum if state.loss_sum is not None else torch.zeros(())
            engine = {"loss_sum": loss_sum.reshape(1), "count": torch.tensor([state.count]),
                      "bad_images": torch.tensor([state.bad_images])}
            training = ckpt.TrainingState(self.method.state_dict(), optim_state, groups, rng, engine, extra)
            ckpt.save_training_state(path, training, self._header())
            if epoch_done is not None and (epoch_done % cfg.train.checkpoint_every == 0 or epoch_done == cfg.train.epochs):
                ckpt.save_training_state(runfiles.epoch_checkpoint(self.out, epoch_done), training, self._header())
        state.last_checkpoint = path
        barrier(env)

    def _header(self) -> runfiles.CheckpointHeader:
        m = self.method
        return runfiles.CheckpointHeader(
            to_yaml(self.cfg), self.cfg.model.arch, self.state.step // self.state.steps_per_epoch, self.state.step,
            time.strftime("%Y-%m-%dT%H:%M:%S"), m.backbone_prefix(m.evaluated_backbone),
            m.backbone_prefix(m.student_backbone), self.state.steps_per_epoch)

    def init_backbones(self, source: str) -> InitWeights:
        """model.init_from (every rank reads the file); returns what was read, for the record."""
        init = read_init_weights(source)
        notes = init_backbones(self.method, init)
        log.info("backbones initialised from %s (%s)%s", init.path, init.kind, "".join(f"; {n}" for n in notes))
        return init

    def restore(self, path: Path) -> None:
        saved, header = ckpt.load_training_state(path)
        if self.bootstrap is not None:
            self._restore_bootstrap(path, saved.extra)
        try:
            missing, unexpected = self.method.load_state_dict(saved.model, strict=False)
        except RuntimeError as e:  # mis-shaped tensors: torch lists every one, name the first
            shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
            raise UsageError(f"checkpoint '{path}' does not match this config ({(shapes or [str(e)])[0]})") from None
        if missing or unexpected:
            raise UsageError(f"checkpoint '{path}' does not match this config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        ckpt.optimizer_from_tensors(self.optimizer, saved.optim_state, saved.optim_groups)
        env, state = self.env, self.state
        if saved.rng["torch"].shape[0] == env.world:
            # clone: set_rng_state reads a row view from its storage's start (rank > 0 got rank 0's
            # bytes shifted: "Invalid mt19937 state" or a crash)
            torch.set_rng_state(saved.rng["torch"][env.rank].clone())
            if env.device.type == "cuda" and "cuda" in saved.rng:
                torch.cuda.set_rng_state(saved.rng["cuda"][env.rank].clone(), env.device)
        else:
            log.warning("resuming with %d processes instead of %d: random streams are re-seeded",
                        env.world, saved.rng["torch"].shape[0])
        state.step = header.step
        state.loss_sum = saved.engine["loss_sum"].reshape(()).to(env.device)
        state.count = int(saved.engine["count"])
        state.bad_images = int(saved.engine["bad_images"])
        state.last_checkpoint = path
        log.info("resumed from %s at step %d", path, state.step)

    def _restore_bootstrap(self, path: Path, extra: dict) -> None:
        boot = {k.removeprefix("bootstrap."): v for k, v in extra.items() if k.startswith("bootstrap.")}
        if not boot:
            raise UsageError(f"checkpoint '{path}' has no bootstrap state but the config has "
                             f"bootstrap.name {self.bootstrap.cfg.name}")
        try:
            self.bootstrap.load_state_dict(boot)
        except ValueError as e:
            raise UsageError(f"checkpoint '{path}': {e}") from None
