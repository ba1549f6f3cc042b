"""Training throughput of a preset: img/s, step time split into data wait and compute, peak memory, MFU.

    python benchmarks/throughput.py --preset dino2-vits16 --set optim.batch_size=128 --steps 30
    python benchmarks/throughput.py --preset demo --steps 10            # CPU, small sizes

Runs the real pieces of `ssl pretrain` (data loader with workers and pinned memory, method,
optimizer, `train_step` with bf16 autocast on GPU) on one process, for `--warmup` + `--steps`
steps, synchronising the GPU around each step only to time it (the training loop itself never
does). Data: `--data` (default: the preset's, or builtin:shapes when the preset has none);
built-in images are 64 px and are up-sampled by the random-resized crops, which costs the same
CPU work per crop as real JPEG-decoded images minus the decode.
MFU = achieved model FLOP/s / peak; model FLOPs per image = 3 x student forward over all crops
(forward + backward) + teacher forward over the 2 global crops (none for SimSiam), counted with
torch.utils.flop_counter on the backbone (heads excluded, < 1 % for ViTs). Peak: --peak-tflops,
or 989 for H100/H200 (dense bf16); null when unknown (CPU).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from sslcli.config import load_config
from sslcli.data.datasets import open_dataset
from sslcli.data.loader import EpochBatchSampler, build_train_loader
from sslcli.data.masking import patch_grid
from sslcli.device import pick_device
from sslcli.methods import StepContext, build_method
from sslcli.models.backbone import count_flops_per_image
from sslcli.train.distributed import DistEnv, set_cpu_threads
from sslcli.train.optim import build_optimizer
from sslcli.train.trainer import train_step

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--data", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--profile", action="store_true",
                   help="also report the share of the step in the regions the losses name (e.g. SOVE's "
                        "sove.judge_search, sove.soft_labels), from torch.profiler over the timed steps")
    return p.parse_args()


def model_flops_per_image(method, cfg) -> float:
    backbone = method.student.backbone
    g = count_flops_per_image(backbone, cfg.data.global_crop_size)
    local = count_flops_per_image(backbone, cfg.data.local_crop_size) if cfg.data.local_crops else 0.0
    student = 2 * g + cfg.data.local_crops * local
    teacher = 2 * g if hasattr(method, "teacher") else 0.0  # SimSiam has no teacher forward
    return 3 * student + teacher


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _activities(device: torch.device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else acts


def _regions(profiler, device: torch.device, steps: int) -> dict[str, float]:
    """Seconds per step inside each named region (record_function names with a dot); device time
    on CUDA, CPU time otherwise. Called after the timed steps."""
    profiler.stop()
    out = {}
    for event in profiler.key_averages():
        if "." in event.key and not event.key.startswith(("aten::", "cuda", "Optimizer", "autograd")):
            us = event.device_time_total if device.type == "cuda" else event.cpu_time_total
            out[event.key] = us / 1e6 / steps
    return out


def main() -> None:
    args = parse()
    device = pick_device(args.device)
    cfg = load_config(args.preset, overrides=args.overrides)
    threads = set_cpu_threads(DistEnv(0, 1, 0, device), cfg.train.workers)  # as `ssl pretrain` does
    data = args.data or cfg.data.path or "builtin:shapes"
    dataset = open_dataset(data)
    epochs = max(cfg.train.epochs, 1)
    spe = EpochBatchSampler.check_sizes(len(dataset), cfg.optim.batch_size, 1)
    method = build_method(cfg.model, cfg.method, epochs, spe).to(device)
    loader, sampler = build_train_loader(dataset, cfg.data, cfg.optim.batch_size, 0, 1, cfg.train.seed,
                                         cfg.train.workers, device.type == "cuda", device=device,
                                         mask_grid=patch_grid(cfg.data, method.student_backbone.patch_size))
    if cfg.train.compile:
        method.compile_backbones()
    optimizer = build_optimizer(method.student, cfg.optim, device, method.constant_lr_parameters())
    flops = model_flops_per_image(method, cfg)
    waits, computes = [], []
    step, total = 0, args.warmup + args.steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    profiler = torch.profiler.profile(activities=_activities(device)) if args.profile else None
    while step < total:
        sampler.set_position(step // sampler.steps_per_epoch % epochs, step % sampler.steps_per_epoch)
        clock = time.perf_counter()
        for batch in loader:
            batch = batch.decode(device).to(device)  # decode: data.decode_on: device on CUDA, else a no-op
            fetched = time.perf_counter()
            batch = batch.colour(cfg.data.mean, cfg.data.std)  # on a GPU: compute; on a CPU the workers colour
            train_step(method, optimizer, batch, StepContext(0, step), 1e-4, 0.04, cfg.optim, cfg.train.precision)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            done = time.perf_counter()
            if profiler is not None and step == args.warmup:
                profiler.start()
            if step >= args.warmup:
                waits.append(fetched - clock)
                computes.append(done - fetched)
            clock, step = done, step + 1
            if step >= total:
                break
    regions = _regions(profiler, device, args.steps) if profiler is not None else None
    step_s = (sum(waits) + sum(computes)) / len(waits)
    img_s = cfg.optim.batch_size / step_s
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "preset": cfg.name, "overrides": args.overrides, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "arch": cfg.model.arch, "batch_size": cfg.optim.batch_size,
        "crops": f"2x{cfg.data.global_crop_size}" + (f"+{cfg.data.local_crops}x{cfg.data.local_crop_size}"
                                                      if cfg.data.local_crops else ""),
        "precision": cfg.train.precision, "compile": cfg.train.compile, "workers": cfg.train.workers, "threads": threads,
        "steps": args.steps, "img_per_s": round(img_s, 1), "step_s": round(step_s, 4),
        "data_wait_s": round(sum(waits) / len(waits), 4), "compute_s": round(sum(computes) / len(computes), 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "gflops_per_image": round(flops / 1e9, 2),
        "mfu": round(flops * img_s / (peak * 1e12), 4) if peak else None,
    }
    if regions is not None:  # seconds per step and share of the step
        result["regions"] = {k: {"s_per_step": round(v, 4), "share": round(v / step_s, 3)} for k, v in regions.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
