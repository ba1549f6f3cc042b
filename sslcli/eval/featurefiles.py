"""Feature files and the feature cache (docs/evals.md "Inputs and outputs common to all evals").

A feature file is a safetensors file with
  `features` [N, D] float (any float dtype; read as float32),
  `labels`   [N] int64 (optional; any integer dtype is read as int64),
  `ids`      [N] int64 (optional; global image ids, e.g. the ImageFolder position),
and string metadata in the safetensors header (`FeatureSet.meta`). Other tensors in the file are
ignored. Files are written atomically (temp file in the same folder + os.replace).

The cache (`--cache DIR`) stores one feature file per key, `DIR/<key>.safetensors`, where the key is
the sha1 of a canonical JSON (sorted keys, no spaces) of
  {"version": CACHE_VERSION,
   "weights": {"path": absolute resolved path, "mtime_ns", "size", "which"},
   "data": the dataset spec (absolute resolved path for folders, as-is for `builtin:` names),
   "preprocessing": the protocol's dict (crop sizes, interpolation, mean/std, ... and, from the
                    pipelines, a fingerprint of the dataset index, see sslcli.eval.pipelines)}.
So rewriting or touching the weights file, or changing any preprocessing value, misses the cache.
Not detected: an image file modified in place under the same name (the pipelines fingerprint the
list of paths and labels, not the pixels). A corrupt cache entry is logged and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from sslcli.data.datasets import BUILTIN_PREFIX
from sslcli.errors import CheckpointError, DataError
from sslcli.runfiles import atomic_save
from sslcli.eval.weights import WeightsInfo

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when a pipeline changes what it computes, to invalidate old entries
SUFFIX = ".safetensors"


@dataclass
class FeatureSet:
    """Features of N images.

    features: float32 [N, D]; labels: int64 [N] or None; ids: int64 [N] or None;
    meta: free-form strings (protocol, data, crop, ...), stored in the file header.
    """

    features: Tensor
    labels: Tensor | None = None
    ids: Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """D, the feature size."""
        return int(self.features.shape[1])


def check_feature_set(fs: FeatureSet, where: str) -> None:
    """DataError naming `where` unless features is [N, D] float and labels / ids are [N] integers."""
    f = fs.features
    if not isinstance(f, Tensor) or f.ndim != 2 or not f.is_floating_point():
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise DataError(f"{where}: 'features' must be a float tensor [N, D], got {shape}")
    for name in ("labels", "ids"):
        t = getattr(fs, name)
        if t is None:
            continue
        if t.ndim != 1 or t.shape[0] != f.shape[0] or t.is_floating_point() or t.dtype == torch.bool:
            raise DataError(f"{where}: '{name}' must be integers [{f.shape[0]}] (one per feature row), "
                            f"got {t.dtype} {tuple(t.shape)}")
    bad = [k for k, v in fs.meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise DataError(f"{where}: metadata values must be strings ({bad[0]!r} is not)")


def save_features(path: Path | str, fs: FeatureSet) -> Path:
    """Write `fs` to `path` atomically (parent folders created); returns the path.

    Stored as float32 features and int64 labels / ids; `fs.meta` goes into the header.
    """
    path = Path(path)
    check_feature_set(fs, str(path))
    tensors = {"features": fs.features.detach().to("cpu", torch.float32).contiguous()}
    for name in ("labels", "ids"):
        t = getattr(fs, name)
        if t is not None:
            tensors[name] = t.detach().to("cpu", torch.int64).contiguous()
    atomic_save(tensors, dict(fs.meta), path, what="feature file")
    return path


def load_features(path: Path | str) -> FeatureSet:
    """Read a feature file -> FeatureSet (features float32, labels / ids int64 when present).

    DataError naming the file when it is missing, not safetensors, has no `features`, or has
    shapes that do not fit ([N, D] features, [N] labels / ids) or non-finite features.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = dict(f.metadata() or {})
            if "features" not in keys:
                raise DataError(f"feature file {path} has no 'features' tensor (keys: {sorted(keys) or 'none'})")
            tensors = {k: f.get_tensor(k) for k in ("features", "labels", "ids") if k in keys}
    except DataError:
        raise
    except Exception as e:  # safetensors raises several types for a file that is not safetensors
        raise DataError(f"{path} is not a safetensors feature file ({type(e).__name__})") from None
    fs = FeatureSet(tensors["features"], tensors.get("labels"), tensors.get("ids"), meta)
    check_feature_set(fs, f"feature file {path}")
    if not torch.isfinite(fs.features).all():
        raise DataError(f"feature file {path} has non-finite (NaN or inf) features")
    fs.features = fs.features.float()
    fs.labels = None if fs.labels is None else fs.labels.long()
    fs.ids = None if fs.ids is None else fs.ids.long()
    return fs


def check_same_dim(a: FeatureSet, b: FeatureSet, what_a: str, what_b: str) -> None:
    """DataError "features of mismatched sizes: A has D=384, B has D=768" unless a.dim == b.dim."""
    if a.dim != b.dim:
        raise DataError(f"features of mismatched sizes: {what_a} has D={a.dim}, {what_b} has D={b.dim}")


def data_id(data: str) -> str:
    """The dataset spec as the cache keys it: `builtin:` names as-is, folders as absolute paths."""
    data = str(data)
    if data.startswith(BUILTIN_PREFIX):
        return data
    return str(Path(data).expanduser().resolve())


def weights_id(info: WeightsInfo) -> dict:
    """{"path", "mtime_ns", "size", "which"} of the weights file (CheckpointError if it is gone)."""
    path = Path(info.path).expanduser().resolve()
    try:
        st = path.stat()
    except OSError:
        raise CheckpointError(f"weights not found: '{info.path}'") from None
    return {"path": str(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size, "which": info.which}


def canonical_key(info: WeightsInfo, data: str, preprocessing: dict) -> str:
    """The canonical JSON string that a cache key hashes (see the module docstring)."""
    doc = {"version": CACHE_VERSION, "weights": weights_id(info), "data": data_id(data),
           "preprocessing": preprocessing}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class FeatureCache:
    """Feature files in `dir`, one per key; with dir None, a no-op cache (always recomputes)."""

    def __init__(self, dir: Path | str | None):
        self.dir = None if dir is None else Path(dir).expanduser()

    def __repr__(self) -> str:
        return f"FeatureCache({self.dir})"

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def key(self, info: WeightsInfo, data: str, preprocessing: dict) -> str:
        """sha1 hex of canonical_key(info, data, preprocessing); preprocessing must be JSON data."""
        return hashlib.sha1(canonical_key(info, data, preprocessing).encode()).hexdigest()

    def path(self, key: str) -> Path | None:
        """DIR/<key>.safetensors, or None for the no-op cache."""
        return None if self.dir is None else self.dir / f"{key}{SUFFIX}"

    def get(self, key: str) -> FeatureSet | None:
        """The cached FeatureSet, or None (no cache, no entry, or an unreadable entry, logged)."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            return load_features(path)
        except DataError as e:
            logger.warning("ignoring unreadable feature cache entry (%s); recomputing", e)
            return None

    def put(self, key: str, fs: FeatureSet) -> None:
        """Store `fs` under `key` (atomic write; no-op without a cache dir)."""
        path = self.path(key)
        if path is not None:
            save_features(path, fs)

    def features(self, info: WeightsInfo, data: str, preprocessing: dict,
                 compute: Callable[[], FeatureSet]) -> FeatureSet:
        """The cached features for (weights, data, preprocessing), else compute() stored in the cache.

        Entries carry meta["cache_key"] = the canonical JSON of their key (for inspection).
        Without a cache dir, just compute() (the weights file is not even looked at).
        """
        if self.dir is None:
            return compute()
        canonical = canonical_key(info, data, preprocessing)
        key = hashlib.sha1(canonical.encode()).hexdigest()
        cached = self.get(key)
        if cached is not None:
            logger.info("features from cache %s", self.path(key))
            return cached
        fs = compute()
        fs.meta = {**fs.meta, "cache_key": canonical}
        self.put(key, fs)
        return fs


def as_cache(cache: FeatureCache | Path | str | None) -> FeatureCache:
    """A FeatureCache from a FeatureCache, a folder or None (no-op cache)."""
    return cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
