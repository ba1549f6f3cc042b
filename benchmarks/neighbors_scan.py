"""Time `ssl neighbors` on an ImageNet-sized bootstrap state; prints JSON.

    python benchmarks/neighbors_scan.py                                  # N = 1,281,000, w 50, K 10
    python benchmarks/neighbors_scan.py --classes 100 --window 10 --top-k 3

Builds, in a temporary folder, an ImageFolder tree of empty files (`--classes` x `--per-class`)
and a training checkpoint holding only what `ssl neighbors` reads: the header (format, config of
the adasim-dino2-vits16 preset with this window / top_k and the tree as data.path) and a random
window (ids [w, N, K] int32; 95 % of the images first in most of their slots, the others' top
candidate a random image, i.e. ~5 % of N rows to list; sims [w, N, K]).
Then times, through the library functions the command calls: opening the run (header, folder
index), one `--query`, and `--scan other-class` over all N images. Times in seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from sslcli.config import load_config, to_yaml
from sslcli.runfiles import CheckpointHeader, write_sections
from sslcli.neighbors import query_neighbors, scan_neighbors
from index_folder import make_tree  # benchmarks/ is on sys.path when this script runs


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1281)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--top-k", type=int, default=10)
    return p.parse_args()


def write_checkpoint(path: Path, data: Path, n: int, w: int, k: int) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, n, (w, n, k), generator=g, dtype=torch.int32)
    trusted = torch.arange(n)[torch.arange(n) % 20 != 0]  # 95 % of the images find themselves first
    ids[: w // 2 + 1, trusted, 0] = trusted.to(torch.int32)  # in most slots; the rest are listed
    sims = torch.rand(w, n, k, generator=g).sort(dim=2, descending=True).values
    cfg = load_config("adasim-dino2-vits16", overrides=[f"data.path={data}", f"bootstrap.window={w}",
                                                         f"bootstrap.top_k={k}"])
    header = CheckpointHeader(to_yaml(cfg), cfg.model.arch, w, 0, "", "teacher.backbone.model.",
                              "student.backbone.model.")
    extra = {"bootstrap.window_ids": ids, "bootstrap.window_sims": sims, "bootstrap.epochs_done": torch.tensor([w])}
    write_sections(path, {"extra": extra}, header, {})


def main() -> None:
    args = parse()
    n = args.classes * args.per_class
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tree(root / "train", args.classes, args.per_class)
        run = root / "run"
        (run / "checkpoints").mkdir(parents=True)
        t = time.perf_counter()
        write_checkpoint(run / "checkpoints" / "last.safetensors", root / "train", n, args.window, args.top_k)
        written = time.perf_counter() - t
        t = time.perf_counter()
        query_neighbors(run, query=n // 2)  # first call: folder scan + index cache written in the run dir
        first_query = time.perf_counter() - t
        t = time.perf_counter()
        result = query_neighbors(run, query=n // 3)
        query = time.perf_counter() - t
        t = time.perf_counter()
        rows = scan_neighbors(run, "other-class")
        scan = time.perf_counter() - t
    print(json.dumps({
        "images": n, "window": args.window, "top_k": args.top_k,
        "window_gb": round(8 * args.window * n * args.top_k / 2**30, 2), "write_checkpoint_s": round(written, 1),
        "first_query_s": round(first_query, 2), "query_s": round(query, 3),
        "query_candidates": len(result["neighbors"]), "scan_other_class_s": round(scan, 1), "scan_rows": len(rows),
        "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
    }, indent=2))


if __name__ == "__main__":
    main()
