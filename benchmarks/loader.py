"""Data-path throughput (no model): images/s of the data-path stages worker, device, device-decode; JSON.

    python benchmarks/loader.py                                   # 400 JPEGs, default workers
    python benchmarks/loader.py --images 200 --batches 6 --warmup 2 --workers 1   # 2-core CPU
    python benchmarks/loader.py --data /data/imagenet/train --workers 10 --device cuda
    python benchmarks/loader.py --settings demo,demo-multicrop --batches 20   # the demo presets alone

Settings: dino2 = preset dino2-vits16 (2x224), multicrop = preset dino-vits16 (2x224 + 10x96),
both on a temporary ImageFolder of generated 500x375 JPEGs (10 classes, smooth random content,
quality 90) or on `--data`; demo = the demo preset's crops (2x32) and demo-multicrop its
multi-crop variant's (2x32 + 2x16), on builtin:shapes.
Modes: worker = the whole PIL chain in the loader workers (float32 crops); device = workers crop
and flip (uint8 crops + colour parameters), then `batch.to(device).colour(mean, std)` in the
main process (on `--device cpu` the workers run the batched colour chain too, as `ssl pretrain` does); device-decode = `data.decode_on: device`: workers read JPEG bytes and draw boxes,
flips and colour parameters from the header size, then `batch.decode(device)` (one batched
decode_jpeg, resized_crop per view) `.to(device).colour(mean, std)`. On `--device cpu` the
device-decode mode still decodes in the main process on the CPU (training would fall back to worker
decoding there), so the code path is measurable anywhere; only a CUDA run (nvJPEG) shows what it is
for. Every mode ends with normalised float views on the device, which is what is timed:
`--batches` batches after `--warmup` batches, CUDA synchronised before the clock is read
(loader_wait_s: the part spent blocked on the loader; the rest is decode() + to() + colour()). The
image list is repeated so that one epoch holds all batches (no epoch-boundary stall). CPU threads
are set as `ssl pretrain` does (set_cpu_threads: cores - workers). speedup = device / worker, and
decode_speedup = device-decode / device (each when both modes ran).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslcli.config import load_config
from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.data.loader import build_train_loader
from sslcli.device import pick_device
from sslcli.train.distributed import DistEnv, set_cpu_threads

SETTINGS = {"dino2": ("dino2-vits16", ["data.local_crops=0"]),
            "multicrop": ("dino-vits16", ["data.local_crops=10"]),
            "demo": ("demo", []), "demo-multicrop": ("demo-multicrop", [])}
ON_BUILTIN = {"demo", "demo-multicrop"}  # settings that read their preset's builtin:shapes, not JPEGs
MODES = ("worker", "device", "device-decode")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="image folder for dino2/multicrop (default: generated JPEGs)")
    p.add_argument("--images", type=int, default=400, help="generated JPEGs in all (10 classes)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ",".join(SETTINGS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the preset's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    for value, valid in ((args.settings, SETTINGS), (args.modes, MODES)):
        if set(value.split(",")) - set(valid):
            p.error(f"unknown name in '{value}' (valid: {', '.join(valid)})")
    return args


def write_jpegs(root: Path, total: int, classes: int = 10, seed: int = 0) -> None:
    """root/c{k}/{i}.jpg, 500x375: bicubic-upsampled 8x6 random colours plus mild noise."""
    rng = np.random.default_rng(seed)
    for i in range(total):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (375, 500, 3), dtype=np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def repeated(ds: ImageDataset, n: int) -> ImageDataset:
    """`ds` with its image list repeated to >= n entries (same files / same in-memory images)."""
    k = -(-n // len(ds))
    if k == 1:
        return ds
    images = None if ds.root is not None else [ds.load(i) for i in range(len(ds))] * k
    return ImageDataset(ds.name, ds.paths * k, np.tile(ds.labels, k), ds.classes, root=ds.root, images=images)


def measure(dataset: ImageDataset, cfg, args, workers: int, device: torch.device) -> tuple[float, float]:
    """(seconds for `args.batches` batches after `args.warmup`, delivered as float views on `device`;
    of which seconds spent waiting for the loader: the rest is the main process's decode() + to() +
    colour(), where they have work left: on a CPU the workers colour). decode_on: device is applied on any device here (decode_on_cpu)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loader, _ = build_train_loader(dataset, cfg.data, args.batch_size, 0, 1, cfg.train.seed, workers,
                                   device.type == "cuda", device=device, decode_on_cpu=True)
    it = iter(loader)
    start, wait = time.perf_counter(), 0.0
    for k in range(args.warmup + args.batches):
        if k == args.warmup:
            sync()
            start, wait = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        batch = batch.decode(device).to(device).colour(cfg.data.mean, cfg.data.std)  # no-ops where not needed
        assert batch.views[0].dtype == torch.float32
    sync()
    seconds = time.perf_counter() - start
    del it, loader  # stops the persistent workers
    return seconds, wait


def main() -> None:
    args = parse()
    device = pick_device(args.device)
    need = args.batch_size * (args.warmup + args.batches)
    result = {"machine": {"cpus": len(os.sched_getaffinity(0)), "torch_threads_default": torch.get_num_threads(),
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "torch": torch.__version__},
              "data": None, "batches": args.batches, "warmup": args.warmup, "rows": [], "speedup": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data
        if args.data:
            result["data"] = {"folder": args.data}
        elif set(args.settings.split(",")) - ON_BUILTIN:
            folder, t0 = str(Path(tmp) / "train"), time.perf_counter()
            write_jpegs(Path(folder), args.images)
            result["data"] = {"generated_jpegs": args.images, "size": "500x375",
                              "write_s": round(time.perf_counter() - t0, 2)}
        for setting in args.settings.split(","):
            preset, overrides = SETTINGS[setting]
            cfg = load_config(preset, overrides=overrides)
            dataset = open_dataset(cfg.data.path if setting in ON_BUILTIN else folder)
            dataset = repeated(dataset, need)
            workers = cfg.train.workers if args.workers is None else args.workers
            threads = set_cpu_threads(DistEnv(0, 1, 0, device), workers)  # as `ssl pretrain` does
            crops = f"2x{cfg.data.global_crop_size}" + (
                f"+{cfg.data.local_crops}x{cfg.data.local_crop_size}" if cfg.data.local_crops else "")
            ips = {}
            for mode in args.modes.split(","):
                cfg.data.augment_on = "worker" if mode == "worker" else "device"
                cfg.data.decode_on = "device" if mode == "device-decode" else "worker"
                seconds, wait = measure(dataset, cfg, args, workers, device)
                ips[mode] = args.batch_size * args.batches / seconds
                result["rows"].append({"setting": setting, "crops": crops, "mode": mode, "workers": workers,
                                       "threads": threads, "batch_size": args.batch_size,
                                       "images_per_s": round(ips[mode], 1), "seconds": round(seconds, 3),
                                       "loader_wait_s": round(wait, 3)})
            if "device" in ips and "worker" in ips:
                result["speedup"][setting] = round(ips["device"] / ips["worker"], 2)
            if "device-decode" in ips and "device" in ips:
                result.setdefault("decode_speedup", {})[setting] = round(ips["device-decode"] / ips["device"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
