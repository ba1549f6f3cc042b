"""Continue pretraining from existing weights on shifted data, with and without the head warm-up.

    python benchmarks/init_from.py                      # source run, export, 3 continuations
    python benchmarks/init_from.py --epochs 6 --source runs/demo-multicrop
    python benchmarks/init_from.py --source runs/init-from/source --warmup 0 --out runs/init-from-w0

1. A source model: `ssl pretrain --preset demo-multicrop` (or --source RUN_DIR, an existing run), exported
   with `ssl export --format timm`.
2. A shifted dataset the source never saw: builtin:shapes with inverted colours (dark shapes in
   complementary colours on a white background; the same 10 shape classes, train 2,000 and val
   500 images), written as ImageFolders. Its labels do not depend on colour, so the colour
   augmentation of the continuation does not fight the labels.
3. `ssl eval knn` of the export on the shifted data: the figure the continuation starts from.
4. Continuations `ssl pretrain --preset demo-multicrop --data SHIFTED --init-from EXPORT`, k-NN on the
   shifted data before training and after every epoch (monitor), for each setting of --settings:
     none       heads random, the backbone trained from step 0 at the demo's lr
     freeze     train.freeze_backbone_epochs=F (only the heads train for F epochs)
     freeze+lr  the same and optim.backbone_lr_scale=S
   Reported: the start (the monitor's epoch 0, which must equal step 3), the lowest k-NN after
   it, the largest drop below the start and the final k-NN. Prints a table and writes
   OUT/init_from.json. About 2 minutes per continuation on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import ImageOps

from sslcli.data.builtin import make_shapes

PRESET = "demo-multicrop"  # the source and the continuations (the README's table was measured with it)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/init-from"))
    p.add_argument("--source", type=Path, default=None, help="an existing run to export (default: train the demo)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of each continuation")
    p.add_argument("--freeze", type=int, default=2, help="F: head warm-up epochs")
    p.add_argument("--lr-scale", type=float, default=0.1, help="S: backbone lr scale")
    p.add_argument("--settings", default="none,freeze,freeze+lr")
    p.add_argument("--warmup", type=int, default=None, help="optim.warmup_epochs of the continuations "
                   "(default: the demo's 1; 0 shows what random heads do to the backbone at full lr)")
    return p.parse_args()


def ssl(*args: str) -> dict:
    """Run `ssl ARGS --json`; its JSON output."""
    started = time.time()
    done = subprocess.run(["ssl", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ssl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    print(f"  ssl {' '.join(args[:2])} ... {time.time() - started:.0f} s", file=sys.stderr)
    return json.loads(done.stdout)


def shifted_data(out: Path) -> tuple[Path, Path]:
    train, val = out / "shifted-train", out / "shifted-val"
    for folder, split in ((train, "train"), (val, "val")):
        if folder.is_dir():
            continue
        images, labels, classes = make_shapes(split)
        for i, (image, label) in enumerate(zip(images, labels)):
            (folder / classes[label]).mkdir(parents=True, exist_ok=True)
            ImageOps.invert(image).save(folder / classes[label] / f"{i:05d}.png")
    return train, val


def continuation(args: argparse.Namespace, setting: str, export: Path, train: Path, val: Path) -> dict:
    sets = {"none": [], "freeze": [f"train.freeze_backbone_epochs={args.freeze}"],
            "freeze+lr": [f"train.freeze_backbone_epochs={args.freeze}", f"optim.backbone_lr_scale={args.lr_scale}"]}[setting]
    run = args.out / f"continue-{setting}"
    warmup = [] if args.warmup is None else [f"optim.warmup_epochs={args.warmup}"]
    overrides = [f"train.epochs={args.epochs}", "monitor.knn_every=1", f"monitor.knn_train={train}",
                 f"monitor.knn_val={val}", *warmup, *sets]
    summary = ssl("pretrain", "--preset", PRESET, "--data", str(train), "--init-from", str(export), "--out", str(run),
                  *[x for o in overrides for x in ("--set", o)])
    curve = {int(k): v for k, v in summary["knn_top1"].items()}
    start, after = curve[0], [v for e, v in curve.items() if e > 0]
    return {"setting": setting, "overrides": sets, "knn_start": start, "knn_lowest": min(after),
            "largest_drop": round(start - min(after), 2), "knn_final": curve[max(curve)],
            "curve": curve, "wall_s": summary["wall_seconds"], "init_from": summary.get("init_from")}


def main() -> None:
    args = parse()
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.source
    if source is None:
        source = args.out / "source"
        if not (source / "summary.json").is_file():
            ssl("pretrain", "--preset", PRESET, "--out", str(source))
    export = args.out / "source.safetensors"
    ssl("export", "--weights", str(source), "--out", str(export))
    train, val = shifted_data(args.out)
    knn = ssl("eval", "knn", "--weights", str(export), "--train", str(train), "--val", str(val))
    print(f"export's k-NN on the shifted data: {knn['metrics']['top1']:.2f}", file=sys.stderr)
    rows = [continuation(args, s, export, train, val) for s in args.settings.split(",")]
    report = {"export_knn_top1": knn["metrics"]["top1"], "epochs": args.epochs, "rows": rows}
    (args.out / "init_from.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"| setting | k-NN start | lowest | largest drop | final | (export: {report['export_knn_top1']:.2f}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['knn_start']:.2f} | {r['knn_lowest']:.2f} | {r['largest_drop']:.2f} | "
              f"{r['knn_final']:.2f} | {' '.join(r['overrides']) or '-'} |")


if __name__ == "__main__":
    main()
