"""`ssl neighbors --data FOLDER`: audit any image collection with any backbone.

The backbone (a run, a checkpoint or an export) embeds every image of FOLDER once, with the k-NN
protocol's preprocessing and the evals' feature cache (`--cache DIR`); `sslcli.eval.graph` then
builds the exact top-k cosine neighbour graph in memory-bounded blocks. On that graph:

Two features (`--feature`): `cls`, the global feature the k-NN eval uses (what the picture shows:
the default of a query and of other-class), and `grid`, the patch tokens average-pooled to a
G x G layout (`--grid`, 4) and flattened, G^2 x D numbers per image (where things are: the default
of duplicates and leakage, since the global feature is trained to ignore crops and colour changes
and cannot tell a copy from a look-alike; measured in benchmarks/audit.py). Memory of the graph
step: N x G^2 x D x 4 bytes of features (ImageNet, ViT-S, G 4: 31 GB; use --grid 2 for 8 GB).

- `query_graph`: one image's k nearest images with their cosine similarity.
- `scan_other_class` (label-error candidates): each labelled image's k neighbours vote for their
  classes with the k-NN classifier's weights exp(s / 0.07); `disagreement` = the share of the vote
  that is not the image's own label (0 = every neighbour agrees, 1 = none does), `suggested` = the
  class with the largest vote. Listed: disagreement >= min_disagreement and the nearest neighbour
  of another class at cosine >= threshold; most disagreeing first.
- `scan_duplicates`: pairs (i, j) with j among i's k neighbours (or i among j's) at cosine >=
  threshold, grouped into clusters (connected components: a cluster larger than k + 1 images is
  still found whole through its links); `cluster` = the smallest image id in it.
- `scan_leakage`: the images of a second folder (e.g. val) whose nearest image in FOLDER (e.g.
  train) is at cosine >= threshold.
Image ids are positions in ImageFolder order; rows carry ids, paths, class ids and names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.config import KNN_TEMPERATURE
from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.errors import UsageError
from sslcli.eval.featurefiles import FeatureCache
from sslcli.eval.graph import topk_neighbors
from sslcli.eval.pipelines import knn_features
from sslcli.eval.tasks import Source

logger = logging.getLogger(__name__)

Progress = Callable[[str, int | None], Callable[[int], None]]  # as in sslcli.eval.tasks
FEATURE_SCANS = ("other-class", "duplicates", "leakage")
DEFAULT_K = 10
DEFAULT_THRESHOLD = {"other-class": 0.0, "duplicates": 0.9, "leakage": 0.9}  # cosine (of the default feature)
DEFAULT_MIN_DISAGREEMENT = 0.5
FEATURES = ("cls", "grid")
DEFAULT_FEATURE = {"query": "cls", "other-class": "cls", "duplicates": "grid", "leakage": "grid"}
DEFAULT_GRID = 4  # patch grid side of the `grid` feature: 16 x D numbers per image


@dataclass
class Graph:
    """FOLDER's images, their features and their top-k neighbour graph (CPU tensors)."""

    ds: ImageDataset
    features: Tensor  # (N, D) float32, raw
    sims: Tensor  # (N, k) float32, most similar first
    ids: Tensor  # (N, k) int64
    weights: str
    data: str
    feature: str = "cls"  # what the features are: "cls" or "grid" (embed)
    grid: int = DEFAULT_GRID


class PatchGrid(nn.Module):
    """Backbone -> its patch tokens average-pooled to a grid x grid layout, flattened:
    (B, 3, H, W) -> (B, grid * grid * D). Keeps where things are in the picture, which the global
    feature is trained to forget (crops and flips): what tells a copy from a look-alike."""

    def __init__(self, backbone: nn.Module, grid: int):
        super().__init__()
        self.backbone, self.grid = backbone, grid

    def forward(self, x: Tensor) -> Tensor:
        _, patch = self.backbone.forward_tokens(x)  # (B, N, D), square crops: N = side^2
        side = math.isqrt(patch.shape[1])
        tokens = patch.reshape(patch.shape[0], side, side, -1).permute(0, 3, 1, 2)  # (B, D, side, side)
        return F.adaptive_avg_pool2d(tokens, min(self.grid, side)).flatten(1)


def embed(src: Source, data: str, progress: Progress | None, feature: str = "cls",
          grid: int = DEFAULT_GRID) -> tuple[ImageDataset, Tensor]:
    """(the dataset, its features (N, D')) through the evals' cache: the global feature (`cls`,
    exactly the k-NN eval's) or the pooled patch grid (`grid`, same preprocessing)."""
    backbone, info = src.backbone()
    advance = progress(f"features {data}", None) if progress is not None else None
    if feature == "grid":
        backbone = PatchGrid(backbone, grid)
    fs = knn_features(backbone, info, data, src.torch_device(), FeatureCache(src.cache), src.image_size,
                      src.batch_size, src.workers, advance, feature=f"patch grid {grid}x{grid}" if feature == "grid" else "global")
    return open_dataset(data, cache_dir=src.cache), fs.features


def build_graph(src: Source, data: str, k: int = DEFAULT_K, progress: Progress | None = None,
                rows: list[int] | None = None, feature: str = "cls", grid: int = DEFAULT_GRID) -> Graph:
    """The graph of every image, or of `rows` only (a --query needs one row of it; the other rows
    are then left zero)."""
    ds, features = embed(src, data, progress, feature, grid)
    for q in rows or []:
        if not 0 <= q < len(ds):
            raise UsageError(f"query id {q} is out of range: image ids are 0..{len(ds) - 1}")
    device = src.torch_device()
    keys = features.to(device)
    if rows is None:
        advance = progress("neighbour graph", len(ds)) if progress is not None else None
        sims, ids = topk_neighbors(keys, keys, k, exclude_self=True, on_block=advance)
    else:
        wanted = torch.as_tensor(rows, dtype=torch.long)
        found = topk_neighbors(keys[wanted.to(device)], keys, k, self_ids=wanted)
        sims, ids = (torch.zeros(len(ds), found[0].shape[1], dtype=t.dtype, device=device).index_copy_(0, wanted.to(device), t)
                     for t in found)
    return Graph(ds, features, sims.cpu(), ids.cpu(), str(src.weights), data, feature, grid)


def describe(ds: ImageDataset, i: int, prefix: str = "") -> dict:
    """Image i as the window audit names it: {"id", "class_id", "class_name", "path"}, or with a
    prefix such as "query_": {"query", "query_class", "query_class_name", "query_path"} (class -1
    and name None when unlabelled)."""
    label = int(ds.labels[i])
    name = ds.classes[label] if 0 <= label < len(ds.classes) else None
    path = str(ds.root / ds.paths[i]) if ds.root is not None else ds.paths[i]
    if not prefix:
        return {"id": i, "class_id": label, "class_name": name, "path": path}
    return {prefix[:-1]: i, f"{prefix}class": label, f"{prefix}class_name": name, f"{prefix}path": path}


def query_graph(graph: Graph, query: int, top: int | None = None) -> dict:
    """{"query": describe(query), "neighbors": [describe(j) + similarity, other_class], "weights",
    "data", "k"}: the query's nearest images, most similar first (at most `top`)."""
    n = len(graph.ds)
    if not 0 <= query < n:
        raise UsageError(f"query id {query} is out of range: image ids are 0..{n - 1}")
    own = int(graph.ds.labels[query])
    rows = []
    for j, s in list(zip(graph.ids[query].tolist(), graph.sims[query].tolist()))[:top]:
        row = describe(graph.ds, j)
        rows.append({**row, "similarity": s, "is_query": False,
                     "other_class": own >= 0 and row["class_id"] >= 0 and row["class_id"] != own})
    return {"query": describe(graph.ds, query), "neighbors": rows, "weights": graph.weights, "data": graph.data,
            "k": graph.ids.shape[1]}


def label_votes(graph: Graph) -> tuple[Tensor, Tensor]:
    """(disagreement [N] in [0, 1], suggested class [N]) from the k neighbours' weighted votes."""
    labels = torch.as_tensor(graph.ds.labels, dtype=torch.long)
    classes = max(len(graph.ds.classes), 1)
    neighbour_labels = labels[graph.ids]  # (N, k)
    weights = (graph.sims / KNN_TEMPERATURE).exp() * (neighbour_labels >= 0)  # unlabelled neighbours: no vote
    votes = torch.zeros(len(labels), classes).scatter_add_(1, neighbour_labels.clamp_min(0), weights)  # (N, C)
    own = votes.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    disagreement = 1 - own / votes.sum(1).clamp_min(1e-12)
    return disagreement, votes.argmax(1)


def scan_other_class(graph: Graph, threshold: float = DEFAULT_THRESHOLD["other-class"],
                     min_disagreement: float = DEFAULT_MIN_DISAGREEMENT) -> list[dict]:
    """Label-error candidates (module doc), most disagreeing first (then most similar, smaller id)."""
    labels = torch.as_tensor(graph.ds.labels, dtype=torch.long)
    if not bool((labels >= 0).any()):
        raise UsageError(f"--scan other-class needs class labels, but '{graph.data}' is unlabelled")
    disagreement, suggested = label_votes(graph)
    other = (labels[graph.ids] != labels[:, None]) & (labels[graph.ids] >= 0)  # (N, k)
    first = other.float().argmax(1)  # nearest other-class neighbour (column)
    nearest = graph.ids.gather(1, first[:, None]).squeeze(1)
    sim = graph.sims.gather(1, first[:, None]).squeeze(1)
    hit = (labels >= 0) & other.any(1) & (disagreement >= min_disagreement) & (sim >= threshold)
    ids = torch.nonzero(hit).flatten().numpy()
    order = ids[np.lexsort((ids, -sim.numpy()[ids], -disagreement.numpy()[ids]))]  # last key sorts first
    rows = []
    for i, j, s, d, c in zip(order.tolist(), nearest[order].tolist(), sim[order].tolist(),
                             disagreement[order].tolist(), suggested[order].tolist()):
        rows.append({**describe(graph.ds, i, "query_"), **describe(graph.ds, j, "neighbor_"), "similarity": s,
                     "disagreement": d, "suggested_class": c,
                     "suggested_class_name": graph.ds.classes[c] if c < len(graph.ds.classes) else None})
    return rows


def scan_duplicates(graph: Graph, threshold: float = DEFAULT_THRESHOLD["duplicates"]) -> list[dict]:
    """Near-duplicate pairs (module doc), by cluster then similarity (most similar first)."""
    a = torch.arange(len(graph.ds))[:, None].expand_as(graph.ids)
    keep = graph.sims >= threshold
    pairs = {}
    for i, j, s in zip(a[keep].tolist(), graph.ids[keep].tolist(), graph.sims[keep].tolist()):
        pairs[(min(i, j), max(i, j))] = s
    cluster = _components(len(graph.ds), list(pairs))
    rows = [{"cluster": cluster[i], **describe(graph.ds, i, "a_"), **describe(graph.ds, j, "b_"), "similarity": s}
            for (i, j), s in pairs.items()]
    return sorted(rows, key=lambda r: (r["cluster"], -r["similarity"], r["a"], r["b"]))


def _components(n: int, edges: list[tuple[int, int]]) -> dict[int, int]:
    """Union-find: image id -> the smallest id of its connected component (only ids in edges)."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return {x: root(x) for x in list(parent)}


def scan_leakage(graph: Graph, src: Source, against: str, threshold: float = DEFAULT_THRESHOLD["leakage"],
                 progress: Progress | None = None) -> list[dict]:
    """Images of `against` whose nearest image of the graph's folder is at cosine >= threshold,
    most similar first. Row: query_* (in `against`), neighbor_* (in the folder), similarity."""
    other, features = embed(src, against, progress, graph.feature, graph.grid)
    device = src.torch_device()
    sims, ids = topk_neighbors(features.to(device), graph.features.to(device), 1)
    sims, ids = sims[:, 0].cpu(), ids[:, 0].cpu()
    hit = torch.nonzero(sims >= threshold).flatten().tolist()
    rows = [{**describe(other, q, "query_"), **describe(graph.ds, int(ids[q]), "neighbor_"), "similarity": float(sims[q])}
            for q in hit]
    return sorted(rows, key=lambda r: (-r["similarity"], r["query"]))
