"""Image retrieval on revisited Oxford / Paris (docs/evals.md "Image retrieval").

- `load_gnd`: reads `gnd_<dataset>.pkl` with a restricted unpickler (plain containers, numbers,
  strings and numpy arrays only) and validates its structure.
- `compute_map`: revisitop's mAP (trapezoid AP with junk handling) and mP@k.
- `evaluate_retrieval`: cosine ranking + the Easy / Medium / Hard protocols, percent.
"""

from __future__ import annotations

import codecs
import importlib
import math
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslcli.errors import DataError, UsageError

PROTOCOLS = ("E", "M", "H")

# (module, name) pairs the gnd unpickler may resolve; numpy.core.* is read as numpy._core.*.
_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
}
_RENAMED_MODULES = {
    "__builtin__": "builtins",
    "numpy.core.multiarray": "numpy._core.multiarray",
    "numpy.core.numeric": "numpy._core.numeric",
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use for bytes (latin1 only)."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}")
    return text.encode("latin1")


class _GndUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction and plain builtin containers."""

    def __init__(self, file, source: Path):
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str):
        """The allowed global for (module, name); anything else raises UsageError."""
        canonical = _RENAMED_MODULES.get(module, module)
        if (canonical, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (canonical, name) not in _ALLOWED:
            raise UsageError(f"refusing to unpickle {module}.{name} from {self._source}")
        return _resolve(canonical, name)


def _resolve(module: str, name: str):
    """getattr(import(module), name), reading numpy._core as numpy.core on numpy < 2."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        legacy = module.replace("numpy._core", "numpy.core")
        return getattr(importlib.import_module(legacy), name)


def load_gnd(path: Path) -> dict:
    """Read and validate a revisitop ground-truth pickle.

    Returns {"imlist": list[str] (ndb), "qimlist": list[str] (nq), "gnd": list of nq dicts with
    "easy", "hard", "junk": int64 arrays [n] of indices into imlist and, when present, "bbx":
    [x1, y1, x2, y2] floats}. Raises UsageError for a forbidden global, DataError otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"retrieval ground truth not found: {path}")
    try:
        with path.open("rb") as f:
            raw = _GndUnpickler(f, path).load()
    except UsageError:
        raise
    except Exception as err:  # any decoding failure of an untrusted file is a data error
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    return _validate_gnd(raw, path)


def _validate_gnd(raw: object, path: Path) -> dict:
    """The normalised gnd dict (see load_gnd) or DataError naming what is wrong."""
    if not isinstance(raw, dict):
        raise DataError(
            f"{path}: expected a dict with imlist, qimlist, gnd; got {type(raw).__name__}"
        )
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in raw]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
    imlist = _names(raw["imlist"], "imlist", path)
    qimlist = _names(raw["qimlist"], "qimlist", path)
    entries = raw["gnd"]
    if not isinstance(entries, (list, tuple)) or len(entries) != len(qimlist):
        count = len(entries) if isinstance(entries, (list, tuple)) else type(entries).__name__
        raise DataError(
            f"{path}: gnd must be a list with one dict per query ({len(qimlist)}), got {count}"
        )
    gnd = [_query_gnd(entry, i, len(imlist), path) for i, entry in enumerate(entries)]
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _names(value: object, key: str, path: Path) -> list[str]:
    """A list of image names (str) or DataError."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}: {key} must be a list of image names")
    return list(value)


def _query_gnd(entry: object, i: int, ndb: int, path: Path) -> dict:
    """One query's {"easy", "hard", "junk"[, "bbx"]} with index arrays checked against ndb."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: gnd[{i}] must be a dict, got {type(entry).__name__}")
    out = {}
    for key in ("easy", "hard", "junk"):
        if key not in entry:
            raise DataError(f"{path}: gnd[{i}] has no {key!r}")
        out[key] = _index_array(entry[key], ndb, f"{path}: gnd[{i}][{key!r}]")
    if entry.get("bbx") is not None:
        out["bbx"] = _bbx(entry["bbx"], f"{path}: gnd[{i}]['bbx']")
    return out


def _index_array(value: object, ndb: int, where: str) -> np.ndarray:
    """int64 [n] of indices in [0, ndb) or DataError."""
    try:
        arr = np.asarray(value).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{where} must be a list of integers") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{where} must be a list of integers, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= ndb:
        raise DataError(f"{where} has an index outside 0..{ndb - 1}")
    return arr


def _bbx(value: object, where: str) -> list[float]:
    """[x1, y1, x2, y2] finite floats or DataError."""
    try:
        box = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{where} must be 4 numbers") from None
    if box.size != 4 or not np.isfinite(box).all():
        raise DataError(f"{where} must be 4 finite numbers [x1, y1, x2, y2]")
    return box.tolist()


def compute_ap(positions: np.ndarray, npositives: int) -> float:
    """Trapezoid AP from junk-adjusted 0-based ranks [n] (sorted) of the retrieved positives.

    For the j-th positive at rank r: precision before j/r (1 when r = 0), after (j+1)/(r+1);
    AP = sum of their means / npositives.
    """
    r = positions.astype(np.float64)
    j = np.arange(len(r), dtype=np.float64)
    before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    after = (j + 1) / (r + 1)
    return float(((before + after) / 2).sum() / npositives)


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict], ks: Sequence[int] = (1, 5, 10)
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's compute_map: (mAP, aps [nq], mP@k [len(ks)], P@k per query [nq, len(ks)]).

    ranks: int [ndb, nq], column q = database indices for query q, best first. gnd: per query
    {"ok": positive indices, "junk": optional indices to ignore}. Each positive's 0-based rank is
    reduced by the number of junk items ranked before it. P@k uses kq = min(last positive's
    1-based adjusted rank, k). Queries without positives get NaN and are left out of the means
    (which are NaN when no query has positives). Fractions in 0..1.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise DataError(f"retrieval: ranks must be [ndb, {len(gnd)}], got {tuple(ranks.shape)}")
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(ks)), np.nan)
    for q, entry in enumerate(gnd):
        ok = np.asarray(entry["ok"], dtype=np.int64).reshape(-1)
        if ok.size == 0:
            continue
        junk = np.asarray(entry.get("junk", []), dtype=np.int64).reshape(-1)
        positions = _adjusted_positions(ranks[:, q], ok, junk)
        aps[q] = compute_ap(positions, ok.size)
        prs[q] = _precisions(positions + 1, ks)
    valid = ~np.isnan(aps)
    if not valid.any():
        return math.nan, aps, np.full(len(ks), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def _adjusted_positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions [n] of the positives in ranking [ndb], minus the junk ranked before each."""
    positives = np.flatnonzero(np.isin(ranking, ok))
    junk_positions = np.flatnonzero(np.isin(ranking, junk))
    return positives - np.searchsorted(junk_positions, positives, side="left")


def _precisions(positions: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """P@k [len(ks)] from 1-based adjusted positive ranks [n] with kq = min(max rank, k)."""
    if positions.size == 0:
        return np.zeros(len(ks))
    last = positions.max()
    return np.array([(positions <= min(last, k)).sum() / min(last, k) for k in ks], dtype=np.float64)


def rank_database(query_features: Tensor, db_features: Tensor) -> np.ndarray:
    """Database indices by decreasing cosine similarity, int64 [ndb, nq] (ties: lower index first).

    query_features [nq, D], db_features [ndb, D]; both are L2-normalised here.
    """
    q = F.normalize(query_features.float(), dim=1)
    db = F.normalize(db_features.to(q.device).float(), dim=1)
    similarity = db @ q.T  # [ndb, nq]
    return torch.argsort(similarity, dim=0, descending=True, stable=True).cpu().numpy()


def protocol_gnd(gnd: Sequence[dict], protocol: str) -> list[dict]:
    """revisitop's per-protocol ground truth [{"ok", "junk"}] for protocol "E", "M" or "H".

    Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
    Hard: ok = hard, junk = junk + easy.
    """
    ok_keys, junk_keys = {
        "E": (("easy",), ("junk", "hard")),
        "M": (("easy", "hard"), ("junk",)),
        "H": (("hard",), ("junk", "easy")),
    }[protocol]
    return [{"ok": _concat(g, ok_keys), "junk": _concat(g, junk_keys)} for g in gnd]


def _concat(entry: dict, keys: Sequence[str]) -> np.ndarray:
    """int64 [n]: the concatenation of entry[key] for each key."""
    return np.concatenate([np.asarray(entry[k], dtype=np.int64).reshape(-1) for k in keys])


def evaluate_retrieval(
    query_features: Tensor, db_features: Tensor, gnd: Sequence[dict], ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """mAP and mP@k (percent) under the Easy, Medium and Hard protocols.

    query_features [nq, D], db_features [ndb, D], gnd: nq dicts with "easy", "hard", "junk".
    Keys: "mAP-E", "mAP-M", "mAP-H", then "mP@<k>-<E|M|H>" for every k per protocol. A protocol
    in which no query has positives reports None for its metrics.
    """
    _check_inputs(query_features, db_features, gnd, ks)
    ranks = rank_database(query_features, db_features)
    results = {p: compute_map(ranks, protocol_gnd(gnd, p), ks) for p in PROTOCOLS}
    metrics = {f"mAP-{p}": _percent(results[p][0]) for p in PROTOCOLS}
    for p in PROTOCOLS:
        for k, value in zip(ks, results[p][2]):
            metrics[f"mP@{k}-{p}"] = _percent(value)
    return metrics


def _percent(fraction: float) -> float | None:
    """100 x fraction, or None for NaN (no query with positives)."""
    return None if math.isnan(fraction) else float(fraction) * 100.0


def _check_inputs(query: Tensor, db: Tensor, gnd: Sequence[dict], ks: Sequence[int]) -> None:
    """Matching shapes, one gnd entry per query, indices inside the database, positive ks."""
    if query.ndim != 2 or db.ndim != 2 or query.shape[1] != db.shape[1]:
        raise DataError(
            "retrieval: features must be [nq, D] and [ndb, D], "
            f"got {tuple(query.shape)} and {tuple(db.shape)}"
        )
    if db.shape[0] == 0 or query.shape[0] == 0:
        raise DataError("retrieval: the query set and the database must not be empty")
    if len(gnd) != query.shape[0]:
        raise DataError(f"retrieval: {query.shape[0]} query features but {len(gnd)} gnd entries")
    for i, entry in enumerate(gnd):
        if not isinstance(entry, dict) or not all(key in entry for key in ("easy", "hard", "junk")):
            raise DataError(f"retrieval: gnd[{i}] must be a dict with 'easy', 'hard' and 'junk'")
        for key in ("easy", "hard", "junk"):
            _index_array(entry[key], db.shape[0], f"retrieval: gnd[{i}][{key!r}]")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UsageError(f"retrieval: every k must be a positive integer, got {k!r}")
