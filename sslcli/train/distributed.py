"""Process groups: joining torchrun's, or starting N local processes ourselves.

- `ssl pretrain --gpus N` / `--procs N`: `launch` spawns N processes on this machine with the
  torchrun environment variables set (MASTER_ADDR=127.0.0.1, a free port, RANK, LOCAL_RANK,
  WORLD_SIZE), so each process runs exactly what a torchrun worker runs.
- Under torchrun (multi-node): the variables are already set; `init_distributed` joins the group.
Backend: NCCL on GPUs, gloo on CPU (which makes DDP testable without GPUs).
Typed errors raised in a child process are re-raised in the parent with the same class, so the
exit code is the same as in a single-process run.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslcli import errors
from sslcli.device import pick_device


@dataclass
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def in_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device_kind: str) -> DistEnv:
    """Join the process group described by the environment, or run as a single process."""
    if not in_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistEnv(0, 1, 0, pick_device(device_kind, 0))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_kind, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return DistEnv(rank, world, local_rank, device)


def set_cpu_threads(env: DistEnv, workers: int) -> int:
    """On CPU, give torch's intra-op pool the cores that this process's data workers do not use.

    torch defaults to one thread per core, and the loader workers want cores too: on a 2-core
    machine with one worker that oversubscription made the demo's step 1.9x slower (0.26 s -> 0.14 s
    per step, benchmarks/throughput.py). Cores are split evenly between the local processes. An
    explicit OMP_NUM_THREADS wins. Returns the thread count in use (GPU runs: unchanged).
    """
    if env.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world))
    threads = max(1, cores // max(local_world, 1) - workers)
    torch.set_num_threads(threads)
    return threads


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def all_gather_rows(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """[L] on every rank -> [world, L] on every rank (through the device for NCCL)."""
    if env.world == 1:
        return t.unsqueeze(0)
    x = t.to(env.device)
    out = [torch.empty_like(x) for _ in range(env.world)]
    dist.all_gather(out, x)
    return torch.stack(out).cpu()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is true on some rank (one small all-reduce)."""
    if env.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local_rank: int, fn: Callable, args: tuple, world: int, port: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        value = fn(*args)
        results.put((local_rank, "ok", value))
    except errors.SSLError as e:
        results.put((local_rank, type(e).__name__, str(e)))
    finally:
        cleanup()


def _wait(context: mp.ProcessContext) -> None:
    done = False
    while not done:
        done = context.join()


def launch(fn: Callable, args: tuple, nprocs: int) -> Any:
    """Run fn(*args) in `nprocs` local processes; return rank 0's result or re-raise its error.

    When one process fails or dies, the others are stopped (SIGTERM, then SIGKILL after 30 s) and
    one TrainingError line says which; a typed error a process raised (e.g. a bad checkpoint) wins
    over the collective errors it caused in the others.
    """
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # our line says it
    context = mp.start_processes(_child, args=(fn, args, nprocs, port, results), nprocs=nprocs,
                                 join=False, start_method="spawn")
    failure: Exception | None = None
    try:
        _wait(context)
    except KeyboardInterrupt:  # children got SIGINT too: let them write their checkpoint
        _wait(context)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        failure = e
    outcomes = {}
    while not results.empty():
        rank, kind, value = results.get()
        outcomes[rank] = (kind, value)
    typed = [(k, v) for _, (k, v) in sorted(outcomes.items()) if k != "ok"]
    if typed:
        kind, message = typed[0]
        raise getattr(errors, kind, errors.SSLError)(message)
    if failure is not None:
        raise _process_failure(failure, nprocs)
    return outcomes.get(0, ("ok", None))[1]


def _process_failure(e: Exception, nprocs: int) -> errors.TrainingError:
    if isinstance(e, mp.ProcessExitedException):
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
    else:
        how = f"failed ({str(e).strip().splitlines()[-1]})"
    return errors.TrainingError(f"training process {e.error_index} of {nprocs} {how}; the others were stopped "
                                "(the last checkpoint is intact: continue with --resume)")
