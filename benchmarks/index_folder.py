"""Time `scan_image_folder` on a synthetic ImageFolder tree of empty files; prints JSON.

    python benchmarks/index_folder.py                      # ImageNet-sized: 1000 x 1300 files
    python benchmarks/index_folder.py --classes 200 --per-class 1300 --torchvision

"scan" = no index cache (the directory entries are in the OS page cache, since the tree was just
written: a true cold-disk scan is slower); "scan_and_write_cache" = first run with a cache_dir;
"cached" = reuse of that cache (stat of every directory + JSON read). Times in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from sslcli.data.folder import scan_image_folder


def make_tree(root: Path, classes: int, per_class: int) -> None:
    """root/n{class:08d}/n{class:08d}_{i}.JPEG, empty files; directories aged 1 h so that the
    index cache does not consider them recently modified."""
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            os.close(os.open(d / f"n{c:08d}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    past = time.time() - 3600
    for path in [root, *root.iterdir()]:
        os.utime(path, (past, past))


def timed(fn, repeat: int) -> tuple[float, object]:
    """Best wall time over `repeat` calls (s), and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torchvision", action="store_true",
                        help="also time torchvision's make_dataset (ImageFolder indexing)")
    parser.add_argument("--dir", default=None, help="parent directory of the temporary tree")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root, cache = Path(tmp) / "train", Path(tmp) / "cache"
        t0 = time.perf_counter()
        make_tree(root, args.classes, args.per_class)
        result = {"classes": args.classes, "per_class": args.per_class,
                  "images": args.classes * args.per_class,
                  "make_tree_s": round(time.perf_counter() - t0, 3)}
        scan_s, index = timed(lambda: scan_image_folder(root), args.repeat)
        t0 = time.perf_counter()
        scan_image_folder(root, cache_dir=cache)
        result["scan_s"] = round(scan_s, 3)
        result["scan_and_write_cache_s"] = round(time.perf_counter() - t0, 3)
        cached_s, cached = timed(lambda: scan_image_folder(root, cache_dir=cache), args.repeat)
        assert cached.paths == index.paths and (cached.labels == index.labels).all()
        result["cached_s"] = round(cached_s, 3)
        result["cache_bytes"] = sum(f.stat().st_size for f in cache.iterdir())
        if args.torchvision:
            from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
            tv_s, samples = timed(lambda: make_dataset(str(root), extensions=IMG_EXTENSIONS), 1)
            assert [os.path.relpath(p, root) for p, _ in samples] == index.paths
            result["torchvision_make_dataset_s"] = round(tv_s, 3)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
