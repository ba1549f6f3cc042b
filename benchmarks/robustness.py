"""Robustness of DINO vs SimDINO to the settings their papers call fragile, at demo scale.

    python benchmarks/robustness.py                          # the whole grid, 8 epochs per run
    python benchmarks/robustness.py --epochs 4 --methods simdino --axes eps2,lr
    python benchmarks/robustness.py --data my/folder --knn-train my/train --knn-val my/val

Each method starts from its demo preset (`demo-multicrop` for DINO, `demo-simdino` for SimDINO: the
same tiny ViT, crops, data and optimiser) and varies one setting at a time over three values around
the demo's, the others staying at the demo's:
  momentum   method.momentum_teacher           0.9 / 0.97 / 0.996    (both methods)
  temp       method.(warmup_)teacher_temp      0.015 / 0.03 / 0.06   (DINO)
  eps2       method.eps2                       0.01 / 0.05 / 0.25    (SimDINO)
  lr         optim.lr (per 256 images)         0.001 / 0.002 / 0.004 (both)
  batch      optim.batch_size (lr scaled)      32 / 64 / 128         (both)
Every run trains for --epochs epochs (the same budget for both methods) with `ssl pretrain --json`
in a subprocess and reports the weighted k-NN top-1 of the teacher on builtin:shapes:val (or
--knn-val) before and after, the gain, whether it improved, and whether it collapsed: the run
diverged or the method's health check warned (summary "health_warnings"). Prints one table
and writes every row to --out/robustness.json. A 2-core CPU takes about 2 minutes per run. Cells
whose run directory already holds a summary.json of the same --epochs are read instead of re-run,
so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {"dino": "demo-multicrop", "simdino": "demo-simdino"}
AXES = {  # name -> (methods it applies to, values, --set keys the value is written to)
    "momentum": (("dino", "simdino"), (0.9, 0.97, 0.996), ("method.momentum_teacher",)),
    "temp": (("dino",), (0.015, 0.03, 0.06), ("method.teacher_temp", "method.warmup_teacher_temp")),
    "eps2": (("simdino",), (0.01, 0.05, 0.25), ("method.eps2",)),
    "lr": (("dino", "simdino"), (0.001, 0.002, 0.004), ("optim.lr",)),
    "batch": (("dino", "simdino"), (32, 64, 128), ("optim.batch_size",)),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--methods", default=",".join(PRESETS))
    p.add_argument("--axes", default=",".join(AXES))
    p.add_argument("--out", type=Path, default=Path("runs/robustness"))
    p.add_argument("--data", default=None, help="training folder (default: the presets' builtin:shapes)")
    p.add_argument("--knn-train", default=None)
    p.add_argument("--knn-val", default=None)
    args = p.parse_args()
    for value, valid in ((args.methods, PRESETS), (args.axes, AXES)):
        if set(value.split(",")) - set(valid):
            p.error(f"unknown name in '{value}' (valid: {', '.join(valid)})")
    return args


def cells(methods: list[str], axes: list[str]) -> list[tuple[str, str, object, list[str]]]:
    """(method, axis, value, --set overrides); the demo's own setting once per method."""
    out = [(m, "demo", "-", []) for m in methods]
    for m in methods:
        for axis in axes:
            applies, values, keys = AXES[axis]
            if m in applies:
                out += [(m, axis, v, [f"{k}={v}" for k in keys]) for v in values if v not in (0.97, 0.03, 0.05, 0.002, 64)]
    return out


def run_cell(args: argparse.Namespace, method: str, axis: str, value, overrides: list[str]) -> dict:
    out = args.out / f"{method}-{axis}-{value}"
    sets = [f"train.epochs={args.epochs}", f"monitor.knn_every={args.epochs}", *overrides]
    for key, given in (("data.path", args.data), ("monitor.knn_train", args.knn_train), ("monitor.knn_val", args.knn_val)):
        if given:
            sets.append(f"{key}={given}")
    cmd = [sys.executable, "-m", "sslcli", "pretrain", "--preset", PRESETS[method], "--out", str(out), "--json"]
    cmd += [x for s in sets for x in ("--set", s)]
    done = out / "summary.json"  # a finished cell of an earlier invocation is read, not re-run
    if done.exists() and json.loads(done.read_text()).get("epochs") == args.epochs:
        summary = json.loads(done.read_text())
        row = {"method": method, "axis": axis, "value": value, "wall_s": summary.get("wall_seconds")}
    else:
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row = {"method": method, "axis": axis, "value": value, "wall_s": round(time.time() - started, 1)}
        if proc.returncode != 0:
            return row | {"status": "diverged" if "diverged" in proc.stderr else f"error {proc.returncode}",
                              "error": proc.stderr.strip().splitlines()[-1:] or [""], "collapsed": True, "improved": False}
        summary = json.loads(proc.stdout)
    init, final = summary.get("knn_top1_init"), summary.get("knn_top1_final")
    warnings = summary.get("health_warnings", [])
    return row | {"status": "ok", "knn_init": init, "knn_final": final, "gain": round(final - init, 1),
                  "health_warnings": warnings, "collapsed": bool(warnings), "improved": final > init}


def main() -> None:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, axis, value, overrides in cells(args.methods.split(","), args.axes.split(",")):
        rows.append(run_cell(args, method, axis, value, overrides))
        r = rows[-1]
        print(f"{r['method']:8s} {r['axis']:9s} {str(r['value']):>6s}  "
              f"{r.get('knn_init', '-')!s:>5s} -> {r.get('knn_final', '-')!s:>5s}  gain {r.get('gain', '-')!s:>5s}  "
              f"{'improved' if r['improved'] else 'no gain'}"
              f"{', collapse warned: ' + ','.join(r.get('health_warnings', [])) if r['collapsed'] else ''} "
              f"({r['status']}, {r['wall_s']} s)", flush=True)
    (args.out / "robustness.json").write_text(json.dumps({"epochs": args.epochs, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
