"""Batched photometric augmentation (`apply_photometric`) vs the per-image PIL path; prints JSON.

    python benchmarks/photometric.py                          # CPU, and CUDA when available
    python benchmarks/photometric.py --device cpu --configs 64x32,128x96 --repeat 5 --threads 1

For each BxS config: B random uint8 S x S images and DINO-like per-image draws (jitter p 0.8 with
0.4/0.4/0.2/0.1, grayscale p 0.2, blur p 0.5 with sigma in [0.1, 2], solarize p 0.2).
- batched_ms: apply_photometric on the whole uint8 batch, on each device (CUDA: after warm-up,
  synchronised; params already on the device), best of --repeat;
- pil_ms: the worker path, one process, image by image on PIL images (ColorJitter ops with the
  same factors and order -> grayscale -> GaussianBlur -> solarize -> ToTensor -> Normalize),
  best of --repeat (one core; the batched CPU figure uses --threads); pil_ms / B is what one
  data-loader worker spends per view;
- mean_abs_diff_255 / max_abs_diff_255: batched vs PIL output, in 0..255 units (before Normalize).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torchvision.transforms.functional as TF
from PIL import ImageFilter, ImageOps

from sslcli.data.photometric import PhotometricParams, apply_photometric

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KEYS = ("brightness", "contrast", "saturation", "hue")
PIL_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def draw(rng: random.Random) -> dict:
    on = rng.random() < 0.8
    return {"order": rng.sample(range(4), 4),
            "brightness": rng.uniform(0.6, 1.4) if on else 1.0, "contrast": rng.uniform(0.6, 1.4) if on else 1.0,
            "saturation": rng.uniform(0.8, 1.2) if on else 1.0, "hue": rng.uniform(-0.1, 0.1) if on else 0.0,
            "grayscale": rng.random() < 0.2, "blur_sigma": rng.uniform(0.1, 2.0) if rng.random() < 0.5 else 0.0,
            "solarize": rng.random() < 0.2}


def pil_path(im, row: dict) -> torch.Tensor:
    if row["hue"] != 0.0 or row["brightness"] != 1.0:  # jitter applied (else RandomApply skipped it)
        for k in row["order"]:
            im = PIL_OPS[k](im, row[KEYS[k]])
    if row["grayscale"]:
        im = TF.rgb_to_grayscale(im, num_output_channels=3)
    if row["blur_sigma"] > 0:
        im = im.filter(ImageFilter.GaussianBlur(radius=row["blur_sigma"]))
    if row["solarize"]:
        im = ImageOps.solarize(im, threshold=128)
    return TF.normalize(TF.to_tensor(im), MEAN, STD)


def best_ms(fn, repeat: int, sync=lambda: None) -> float:
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="64x32,128x96,128x224", help="comma-separated BxS")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-pil", action="store_true", help="skip the PIL path")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "results": []}
    if torch.cuda.is_available():
        result["cuda_device"] = torch.cuda.get_device_name()
    for config in args.configs.split(","):
        b, s = (int(v) for v in config.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        base = torch.nn.functional.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(s, s), mode="bilinear")
        u = ((base + 0.1 * torch.rand(b, 3, s, s, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)
        rng = random.Random(0)
        rows = [draw(rng) for _ in range(b)]
        entry = {"batch": b, "size": s, "stack_ms": best_ms(lambda: PhotometricParams.stack(rows), args.repeat)}
        params = PhotometricParams.stack(rows)
        out = None
        for dev in devices:
            x, p = u.to(dev), params.to(dev)
            sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)
            apply_photometric(x, p, MEAN, STD)  # warm-up
            entry[f"batched_ms_{dev}"] = best_ms(lambda: apply_photometric(x, p, MEAN, STD), args.repeat, sync)
            out = apply_photometric(x, p, MEAN, STD).cpu() if out is None else out
        if not args.no_pil:
            pils = [TF.to_pil_image(img) for img in u]
            entry["pil_ms"] = best_ms(lambda: [pil_path(im, r) for im, r in zip(pils, rows)], args.repeat)
            entry["pil_ms_per_image"] = round(entry["pil_ms"] / b, 3)
            ref = torch.stack([pil_path(im, r) for im, r in zip(pils, rows)])
            diff = ((out - ref) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs()
            entry["mean_abs_diff_255"] = round(diff.mean().item(), 3)
            entry["max_abs_diff_255"] = round(diff.max().item(), 2)
        result["results"].append(entry)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
