"""Cost of neighbour bootstrapping (AdaSim) on top of a training step: time and memory per rank.

    python benchmarks/bootstrap.py --n 1281167 --dim 384 --window 50 --top-k 10 --batch 256   # GPU
    python benchmarks/bootstrap.py --n 100000 --steps 20                                      # CPU

Drives the real `Bootstrapper` of `ssl pretrain` on one process with random unit vectors:
- observe_ms: per optimizer step, the query of the batch against the whole cache (top-K) plus the
  insert (what the engine adds after each step);
- plan_s / end_epoch_s: once per epoch, the vectorised AdaSim decision for all N images (on a
  window filled with random supports, so every anchor goes through the full m_win computation)
  and the window shift;
- overhead_per_step_ms = observe_ms + (plan_s + end_epoch_s) / steps_per_epoch, and, with
  --step-ms (a measured training step, e.g. from benchmarks/throughput.py), the overhead in %;
- memory: the cache's device bytes (Z + current supports) and host bytes (window) per rank for
  --world ranks (sharded by id), i.e. N (4 d + 8 K) / world and 8 w N K / world.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from sslcli.bootstrap import Bootstrapper
from sslcli.config import BootstrapConfig


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="images in the dataset (ImageNet: 1281167)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=256, help="global batch (all ranks)")
    p.add_argument("--world", type=int, default=1, help="ranks the state is sharded over (memory figures)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-ms", type=float, default=None, help="a training step's time, for the overhead %%")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill_window(boot: Bootstrapper, seed: int = 0) -> None:
    """Random supports in every slot, self first in about half of the rows (so both branches run)."""
    cache = boot.cache
    g = torch.Generator().manual_seed(seed)
    w, rows, k = cache.window_ids.shape
    ids = torch.randint(0, boot.n, (w, rows, k), generator=g, dtype=torch.int32)
    ids[:, ::2, 0] = cache.owned[::2].to(torch.int32)
    cache.window_ids = ids
    cache.window_sims = torch.rand(w, rows, k, generator=g).sort(dim=2, descending=True).values
    cache.epochs_done = w


def main() -> None:
    args = parse()
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg = BootstrapConfig(name="adasim", tau=args.tau, window=args.window, top_k=args.top_k)
    labels = torch.randint(0, 1000, (args.n,))
    boot = Bootstrapper(cfg, args.n, args.dim, labels, epochs=100, seed=0, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randperm(args.n, device=device)
    for start in range(0, args.n, 65536):  # a full cache (as after the first epoch)
        chunk = ids[start: start + 65536]
        boot.cache.z[chunk] = torch.nn.functional.normalize(
            torch.randn(chunk.numel(), args.dim, device=device, generator=g), dim=1)
        boot.cache.bias[chunk] = 0.0
    times = []
    for step in range(args.steps + 3):
        batch = ids[(step * args.batch) % (args.n - args.batch):][: args.batch]
        z = torch.randn(args.batch, args.dim, device=device, generator=g)
        sync(device)
        t = time.perf_counter()
        boot.observe(batch, z)
        sync(device)
        if step >= 3:  # warm-up
            times.append(time.perf_counter() - t)
    fill_window(boot)
    t = time.perf_counter()
    plan = boot.plan(epoch=1)
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    boot.cache.end_epoch()
    sync(device)
    end_s = time.perf_counter() - t
    observe_ms = 1e3 * sum(times) / len(times)
    steps_per_epoch = max(args.n // args.batch, 1)
    per_step = observe_ms + 1e3 * (plan_s + end_s) / steps_per_epoch
    per_rank_rows = -(-args.n // args.world)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "n": args.n, "dim": args.dim, "window": args.window, "top_k": args.top_k, "batch": args.batch,
        "observe_ms": round(observe_ms, 3), "plan_s": round(plan_s, 3), "end_epoch_s": round(end_s, 3),
        "bootstrap_ratio": round(100 * float((plan != torch.arange(args.n)).float().mean()), 2),
        "overhead_per_step_ms": round(per_step, 3),
        "overhead_pct": round(100 * per_step / args.step_ms, 2) if args.step_ms else None,
        "world": args.world,
        "device_mb_per_rank": round(per_rank_rows * (4 * args.dim + 8 * args.top_k + 4) / 2**20, 1),
        "host_mb_per_rank": round(per_rank_rows * 8 * args.window * args.top_k / 2**20, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
