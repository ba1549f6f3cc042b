"""Wall time of a demo preset end to end (`ssl pretrain`, startup included), with the machine's speed.

    python benchmarks/demo_wall.py                          # the demo, once
    python benchmarks/demo_wall.py --preset demo-adasim --repeats 2

Small cloud machines change speed from minute to minute (seen here: the same demo step from 0.165 s
to 0.26 s on one 2-core machine within an hour). So before each run this script measures a
reference: single-thread fp32 matrix products of the demo's shapes (1088 x 96 @ 96 x 384), in
GFLOP/s. A wall time read beside its reference can be compared with one taken at another moment.
Prints one JSON object: per run the wall seconds, the k-NN before/after and the reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def reference_gflops(seconds: float = 2.0) -> float:
    """Single-thread fp32 GEMM throughput on the demo's MLP shape (the bulk of its step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(1088, 96), torch.randn(96, 384)
        for _ in range(50):
            a @ b
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        return 2 * 1088 * 96 * 384 * n / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(threads)


def run(preset: str, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sslcli", "pretrain", "--preset", preset, "--out", str(out),
                           "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ssl pretrain failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(proc.stdout)
    return {"wall_s": round(wall, 1), "knn_top1_init": summary.get("knn_top1_init"),
            "knn_top1_final": summary.get("knn_top1_final"), "steps": summary.get("steps")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            reference = reference_gflops()
            row = run(args.preset, Path(tmp) / f"run{k}")
            rows.append({**row, "reference_gflops": round(reference, 1)})
    print(json.dumps({"preset": args.preset, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
