"""Precision and recall of `ssl neighbors --scan duplicates|other-class|leakage` on planted faults,
and the cost of the neighbour graph.

    python benchmarks/audit.py --weights runs/demo                 # a trained demo run (or an export)
    python benchmarks/audit.py --weights runs/demo --graph-sizes 2000,20000,100000

1. `ssl data make audit` (builtin:shapes with 40 near-duplicates, 40 flipped labels and 20 val
   images copied from train, the truth in faults.json), written once under --out.
2. Each scan through the real command (`ssl neighbors ... --json`), at its default threshold and
   at --threshold values given; the rows are matched with the truth by path:
     duplicates   a planted pair is found when a row links its two images;
     other-class  a flipped image is found when it is a row's query;
     leakage      a planted val copy is found when it is a row's query (linked to its source).
   precision = planted rows / rows, recall = planted faults found / planted faults; also the
   precision of the first R rows (R = the number planted; duplicates ranked by similarity, the
   others in the command's order): how well the ranking puts them first.
3. --graph-sizes: seconds of `sslcli.eval.graph.topk_neighbors` (k 10) on random features of
   N x 384 on this machine's device, and the projection to N = 1.28 M (cost ~ N^2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sslcli.data.planted import make_audit_folder
from sslcli.device import pick_device
from sslcli.eval.graph import topk_neighbors

IMAGENET = 1_281_167


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--out", type=Path, default=Path("runs/audit-bench"))
    p.add_argument("--thresholds", default="", help="extra cosine thresholds for duplicates / leakage, e.g. 0.9,0.99")
    p.add_argument("--graph-sizes", default="2000,20000")
    return p.parse_args()


def neighbors(*args: str) -> list[dict]:
    done = subprocess.run(["ssl", "neighbors", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ssl neighbors {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def score(found: list, planted: set, name: str, threshold: str) -> dict:
    hits = [f in planted for f in found]
    r = len(planted)
    return {"scan": name, "threshold": threshold, "rows": len(found), "planted": r,
            "precision": round(sum(hits) / max(len(found), 1), 3), "recall": round(len(set(found) & planted) / r, 3),
            "precision_at_R": round(sum(hits[:r]) / r, 3)}


def scans(args: argparse.Namespace, root: Path) -> list[dict]:
    truth = json.loads((root / "faults.json").read_text())
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    base = ["--weights", args.weights, "--data", str(root / "train"), "--cache", str(args.out / "cache")]
    out = []
    for t in ["default", *filter(None, args.thresholds.split(","))]:
        extra = [] if t == "default" else ["--threshold", t]
        rows = sorted(neighbors(*base, "--scan", "duplicates", *extra), key=lambda r: -r["similarity"])
        found = [tuple(sorted((rel(r["a_path"]), rel(r["b_path"])))) for r in rows]
        out.append(score(found, {tuple(sorted(p)) for p in truth["duplicates"]}, "duplicates", t))
        rows = neighbors(*base, "--scan", "leakage", "--against", str(root / "val"), *extra)
        out.append(score([rel(r["query_path"]) for r in rows], {a for a, _ in truth["leaked"]}, "leakage", t))
    rows = neighbors(*base, "--scan", "other-class")
    out.append(score([rel(r["query_path"]) for r in rows], {f["path"] for f in truth["label_flips"]}, "other-class",
                     "default"))
    return out


def graph_cost(sizes: list[int]) -> list[dict]:
    device = pick_device("auto")
    rows = []
    for n in sizes:
        feats = torch.randn(n, 384, device=device)
        started = time.perf_counter()
        topk_neighbors(feats, feats, 10, exclude_self=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows.append({"n": n, "device": str(device), "seconds": round(seconds, 2),
                     "projected_imagenet_s": round(seconds * (IMAGENET / n) ** 2)})
    return rows


def main() -> None:
    args = parse()
    root = args.out / "data"
    if not (root / "faults.json").is_file():
        make_audit_folder(root)
    report = {"weights": args.weights, "scans": scans(args, root),
              "graph": graph_cost([int(n) for n in args.graph_sizes.split(",") if n])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| scan | threshold | rows | precision | recall | precision of the first R |")
    print("|---|---|---|---|---|---|")
    for r in report["scans"]:
        print(f"| {r['scan']} | {r['threshold']} | {r['rows']} | {r['precision']} | {r['recall']} | {r['precision_at_R']} |")
    for g in report["graph"]:
        print(f"graph N={g['n']} on {g['device']}: {g['seconds']} s (ImageNet projection {g['projected_imagenet_s']} s)")


if __name__ == "__main__":
    main()
