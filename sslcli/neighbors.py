"""`ssl neighbors`: the AdaSim window audit of a run, and the dispatch to the feature graph.

Two sources of neighbours: the window an AdaSim run kept during training (below), or the top-k
graph of any backbone's features on any folder (`sslcli.feature_audit`); `run_audit` picks one.

A training checkpoint of a run with bootstrapping holds the window of the last w epochs' top-K
neighbour lists (`extra/bootstrap.window_ids` int32 [w, N, K], -1 = absent, oldest slot first;
`extra/bootstrap.window_sims` float32 [w, N, K]; `extra/bootstrap.epochs_done` int64 [1]). For an
image i its AdaSim candidates and p_win(j | i) are computed exactly as training does
(`window_candidates` with the run's top_k, then `window_probabilities` with the run's tau; tau 0
gives a one-hot on the top candidate). Image ids are positions in the training dataset (ImageFolder
order), so they name files: the run's `data.path` (or `data`, when the dataset moved) is opened to
print class ids, class names and paths. A query also shows each candidate's m_win and AdaSim's
decision for the image (bootstrap from a sampled neighbour, or the standard pair).

The window is read lazily with `safetensors.safe_open`: one query reads only its [w, K] slice (an
ImageNet-sized window, w=50, N=1.28M, K=10, is 5 GB on disk), a scan reads blocks of rows.

Entry points: `query_neighbors` (one image), `scan_neighbors` (every image whose top candidate is
not itself, AdaSim Table A3, or is of another class, Table A4), `write_result` (--out csv|json),
`run_audit` (what the CLI calls).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from sslcli.bootstrap.adasim import window_candidates, window_probabilities
from sslcli.config import Config
from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.device import pick_device
from sslcli.errors import CheckpointError, DataError, UsageError, hint
from sslcli import runfiles
from sslcli.runfiles import last_checkpoint, read_checkpoint_header, resolve_weights_file, run_dir_of

logger = logging.getLogger(__name__)

Progress = Callable[[str, int | None], Callable[[int], None]]  # as in sslcli.eval.tasks

IDS, SIMS, EPOCHS = "extra/bootstrap.window_ids", "extra/bootstrap.window_sims", "extra/bootstrap.epochs_done"
SCANS = ("not-self", "other-class")  # on the AdaSim window
OUT_SUFFIXES = (".csv", ".json")
SCAN_FIELDS = ("query", "query_class", "query_class_name", "neighbor", "neighbor_class", "neighbor_class_name",
               "p_win", "query_path", "neighbor_path")
NEIGHBOR_FIELDS = ("rank", "id", "class_id", "class_name", "p_win", "path", "is_query", "other_class")
CHUNK_ELEMENTS = 1 << 22  # window entries (w * K per image) per scan block: ~50 MB of working memory


def latest_run(root: Path = Path("runs")) -> Path:
    """The run directory under `root` whose checkpoints/last.safetensors is the newest (by mtime)."""
    runs = [d for d in root.iterdir() if last_checkpoint(d).is_file()] if root.is_dir() else []
    if not runs:
        raise UsageError(f"no run with checkpoints/last.safetensors under '{root}/': pass --weights RUN_DIR")
    return max(runs, key=lambda d: last_checkpoint(d).stat().st_mtime_ns)


@dataclass
class BootstrapWindow:
    """The neighbour window of a training checkpoint (read lazily) and the run's config."""

    path: Path
    cfg: Config
    n: int  # images
    w: int  # window slots
    k: int  # neighbours recorded per image and slot
    epochs_done: int

    def query(self, q: int) -> tuple[Tensor, Tensor]:
        """ids [w, K] int64 and sims [w, K] float32 of image `q` (only that slice is read)."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(IDS)[:, q].long(), f.get_slice(SIMS)[:, q].float()

    def rows(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """ids [r, w, K] int64 and sims [r, w, K] float32 of images lo..hi-1."""
        with safe_open(str(self.path), framework="pt") as f:
            ids, sims = f.get_slice(IDS)[:, lo:hi], f.get_slice(SIMS)[:, lo:hi]
        return ids.permute(1, 0, 2).long(), sims.permute(1, 0, 2).float()

    def candidates(self, ids: Tensor, sims: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(cand int64 [R, k], p_win [R, k], m_win [R, k]) of windows [R, w, K], with the run's
        top_k and tau (on the GPU when there is one: an ImageNet scan is then I/O-bound)."""
        device = pick_device("auto")
        cand, m_win = window_candidates(ids.to(device), sims.to(device), self.cfg.bootstrap.top_k)
        return cand.cpu(), window_probabilities(m_win, self.cfg.bootstrap.tau).cpu(), m_win.cpu()


def open_window(weights: str | Path | None) -> BootstrapWindow:
    """The window of a run directory or training checkpoint (None: `latest_run()`).

    CheckpointError (exit 2): not a training checkpoint, no bootstrap state, unreadable config;
    UsageError (exit 2): no completed epoch yet.
    """
    path = resolve_weights_file(latest_run() if weights is None else weights)
    cfg = read_checkpoint_header(path).config
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if not {IDS, SIMS, EPOCHS} <= keys:
            raise CheckpointError(f"checkpoint '{path}' has no bootstrap state "
                                  f"(trained with bootstrap.name {cfg.bootstrap.name})")
        shape, sims_shape = f.get_slice(IDS).get_shape(), f.get_slice(SIMS).get_shape()
        epochs_done = int(f.get_tensor(EPOCHS).reshape(-1)[0])
    if len(shape) != 3 or list(shape) != list(sims_shape):
        raise CheckpointError(f"checkpoint '{path}': malformed bootstrap window (ids {shape}, sims {sims_shape})")
    if epochs_done == 0:
        raise UsageError(f"checkpoint '{path}' has no completed epoch yet: the neighbour window is filled at the "
                         "end of each epoch")
    return BootstrapWindow(path, cfg, shape[1], shape[0], shape[2], epochs_done)


def open_images(window: BootstrapWindow, data: str | Path | None = None) -> ImageDataset:
    """The run's training images (`data` overrides data.path), checked to match the window's N."""
    spec = str(data) if data is not None else window.cfg.data.path
    if spec is None:
        raise UsageError(f"the run of '{window.path}' names no data.path: pass --data PATH")
    run_dir = run_dir_of(window.path)
    try:
        ds = open_dataset(spec, cache_dir=run_dir)  # reuses the folder index that pretrain cached there
    except DataError as e:
        if data is None:
            raise DataError(f"{e} (the run's data.path; pass --data PATH if the dataset moved)") from None
        raise
    if len(ds) != window.n:
        raise DataError(f"dataset '{spec}' has {len(ds)} images but the run's bootstrap state has {window.n}: "
                        "pass --data with the training images of this run")
    return ds


def _class_name(ds: ImageDataset, label: int) -> str | None:
    return ds.classes[label] if 0 <= label < len(ds.classes) else None


def image_path(ds: ImageDataset, i: int) -> str:
    """The absolute file of image `i`, or its built-in name for in-memory data."""
    return str(ds.root / ds.paths[i]) if ds.root is not None else ds.paths[i]


def check_query(window: BootstrapWindow, query: int, top: int | None = None) -> None:
    if not 0 <= query < window.n:
        raise UsageError(f"query id {query} is out of range: image ids are 0..{window.n - 1}")
    if top is not None and top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")


def neighbors_of(window: BootstrapWindow, ds: ImageDataset, query: int, top: int | None = None) -> dict:
    """`query_neighbors` on an opened window and dataset."""
    check_query(window, query, top)
    cand, p_win, m_win = window.candidates(*(t[None] for t in window.query(query)))
    keep = cand[0] >= 0
    cand, p_win, m_win = cand[0][keep], p_win[0][keep], m_win[0][keep]
    order = torch.sort(-p_win, stable=True).indices[:top]  # already by m_win; stable keeps ties' order
    q_label = int(ds.labels[query])
    rows = []
    for j, p, m in zip(cand[order].tolist(), p_win[order].tolist(), m_win[order].tolist()):
        label = int(ds.labels[j])
        rows.append({"id": j, "class_id": label, "class_name": _class_name(ds, label), "p_win": p, "m_win": m,
                     "path": image_path(ds, j), "is_query": j == query,
                     "other_class": q_label >= 0 and label >= 0 and label != q_label})
    # AdaSim's rule (sslcli.bootstrap.rules.plan_adasim): once the window is full and tau > 0, the
    # second view comes from a neighbour sampled from p_win only when the window ranks the image
    # itself first (a trusted neighbourhood); otherwise the image keeps the standard pair.
    b = window.cfg.bootstrap
    bootstraps = (b.name == "adasim" and b.tau > 0 and window.epochs_done >= window.w and bool(len(cand))
                  and int(cand[0]) == query)
    return {"query": {"id": query, "class_id": q_label, "class_name": _class_name(ds, q_label),
                      "path": image_path(ds, query)},
            "neighbors": rows, "weights": str(window.path), "tau": float(window.cfg.bootstrap.tau),
            "window": window.w, "epochs_done": window.epochs_done,
            "decision": "bootstrap" if bootstraps else "standard pair" if b.name == "adasim" else None}


def query_neighbors(weights: str | Path | None, query: int, top: int | None = None,
                    data: str | Path | None = None) -> dict:
    """The AdaSim candidates of image `query` with their p_win, most probable first (at most `top`).

    Returns {"query": {"id", "class_id", "class_name", "path"}, "neighbors": [{"id", "class_id",
    "class_name", "p_win", "path", "is_query", "other_class"}], "weights", "tau", "window",
    "epochs_done"}. class_id is -1 and class_name None for unlabeled data (other_class is then False);
    path is the absolute file (folders) or the built-in name. With top None, p_win sums to 1.
    """
    window = open_window(weights)
    check_query(window, query, top)
    return neighbors_of(window, open_images(window, data), query, top)


def check_scan(kind: str, limit: int | None) -> None:
    if kind not in SCANS:
        raise UsageError(f"--scan must be not-self or other-class, got '{kind}'{hint(kind, SCANS)}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")


def scan_window(window: BootstrapWindow, ds: ImageDataset, kind: str, limit: int | None = None,
                progress: Progress | None = None) -> tuple[list[dict], int]:
    """`scan_neighbors` on an opened window and dataset; also returns how many images matched."""
    check_scan(kind, limit)
    labels = torch.from_numpy(ds.labels)
    if kind == "other-class" and not bool((labels >= 0).any()):
        raise UsageError(f"--scan other-class needs class labels, but dataset '{ds.name}' is unlabeled")
    step = max(1, CHUNK_ELEMENTS // max(1, window.w * window.k))
    advance = progress(f"scan {kind}", window.n) if progress is not None else None
    found_q, found_j, found_p = [], [], []
    for lo in range(0, window.n, step):
        hi = min(lo + step, window.n)
        cand, p_win, _ = window.candidates(*window.rows(lo, hi))
        anchors, top, p_top = torch.arange(lo, hi), cand[:, 0], p_win[:, 0]  # column 0 = argmax p_win
        hit = top >= 0  # images without any candidate are never listed
        if kind == "not-self":
            hit &= top != anchors
        else:
            q_lab, j_lab = labels[anchors], labels[top.clamp_min(0)]
            hit &= (q_lab >= 0) & (j_lab >= 0) & (q_lab != j_lab)
        found_q.append(anchors[hit])
        found_j.append(top[hit])
        found_p.append(p_top[hit])
        if advance is not None:
            advance(hi - lo)
    q, j, p = (torch.cat(t).numpy() for t in (found_q, found_j, found_p))
    order = np.lexsort((q, -p))[:limit]  # most confident first; ties: smaller query id
    rows = []
    for qi, ji, pi in zip(q[order].tolist(), j[order].tolist(), p[order].tolist()):
        ql, jl = int(ds.labels[qi]), int(ds.labels[ji])
        rows.append({"query": qi, "query_class": ql, "query_class_name": _class_name(ds, ql), "neighbor": ji,
                     "neighbor_class": jl, "neighbor_class_name": _class_name(ds, jl), "p_win": pi,
                     "query_path": image_path(ds, qi), "neighbor_path": image_path(ds, ji)})
    logger.info("scan %s: %d of %d images match", kind, len(q), window.n)
    return rows, len(q)


def scan_neighbors(weights: str | Path | None, kind: str, limit: int | None = None,
                   data: str | Path | None = None, progress: Progress | None = None) -> list[dict]:
    """Every image whose top AdaSim candidate (argmax p_win) is not itself (kind "not-self", AdaSim
    Table A3) or has another class (kind "other-class", Table A4; needs labels), most confident
    first (top candidate's p_win descending, ties by smaller query id), at most `limit` rows.

    Row: {"query", "query_class", "query_class_name", "neighbor", "neighbor_class",
    "neighbor_class_name", "p_win", "query_path", "neighbor_path"}. Vectorised over blocks of
    images; Python builds only the returned rows.
    """
    check_scan(kind, limit)
    window = open_window(weights)
    return scan_window(window, open_images(window, data), kind, limit, progress)[0]


def check_out(out: Path) -> None:
    if Path(out).suffix.lower() not in OUT_SUFFIXES:
        raise UsageError(f"--out must end in .csv or .json, got '{out}'")


def write_result(result: dict | list[dict], out: Path) -> Path:
    """A query result (dict) or scan rows (list) to FILE.csv (header row; a query's neighbours, with
    their rank) or FILE.json (the object or the list as returned)."""
    out = Path(out)
    check_out(out)
    if out.suffix.lower() == ".json":
        runfiles.atomic_write_text(out, json.dumps(result, indent=2) + "\n", what="result")
        return out
    if isinstance(result, dict):
        fields = NEIGHBOR_FIELDS
        rows: list[dict] = [{"rank": r, **n} for r, n in enumerate(result["neighbors"], 1)]
    else:
        fields, rows = SCAN_FIELDS, result
    fields = list(rows[0]) if rows else fields  # the rows' own keys (m_win; the feature graph's fields)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    runfiles.atomic_write_text(out, text.getvalue(), what="result")
    return out
