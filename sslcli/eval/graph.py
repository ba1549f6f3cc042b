"""The exact top-k cosine neighbour graph of a feature set, in row blocks (`ssl neighbors --data`).

`topk_neighbors(queries, keys, k)`: for every query row its k most similar key rows by cosine
similarity, exactly (no approximate index). Similarities are computed for a block of query rows
against all keys at a time, so working memory is block x N floats whatever the dataset size: the
block is sized from `budget` (elements of the similarity block; default 2^26 = 256 MiB of float32
on a GPU, 2^24 on a CPU). Everything runs on the keys' device in float32.

Cost: 2 N M D multiply-adds plus a top-k over M x N similarities. `benchmarks/audit.py` measures
it; ImageNet (N = M = 1.28 M, D = 384) is about 1.3 PFLOP, minutes on one GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sslcli.errors import UsageError

GPU_BUDGET, CPU_BUDGET = 1 << 26, 1 << 24  # similarity elements per block


@torch.no_grad()
def topk_neighbors(queries: Tensor, keys: Tensor, k: int, exclude_self: bool = False,
                   budget: int | None = None, on_block: Callable[[int], None] | None = None,
                   self_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sims float32 [M, k'], ids int64 [M, k']) of queries [M, D] among keys [N, D], most similar
    first; k' = min(k, N - 1) when images are excluded from their own lists, else min(k, N).
    exclude_self: queries are the keys (row i is key i); self_ids [M]: query row r is key
    self_ids[r] (a few rows of the keys, e.g. one --query). `on_block(rows)` is called after each
    block (progress). Results are on the keys' device."""
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise UsageError(f"feature shapes do not match: queries {list(queries.shape)}, keys {list(keys.shape)}")
    if exclude_self and queries.shape[0] != keys.shape[0]:
        raise UsageError("exclude_self needs the queries to be the keys")
    n, device = keys.shape[0], keys.device
    if exclude_self:
        self_ids = torch.arange(queries.shape[0])
    k = min(k, n - int(self_ids is not None))
    if k < 1:
        raise UsageError(f"{n} image(s): no neighbour to find")
    keys = F.normalize(keys.float(), dim=1)
    budget = budget or (GPU_BUDGET if device.type == "cuda" else CPU_BUDGET)
    rows = max(1, budget // n)
    sims, ids = [], []
    for lo in range(0, queries.shape[0], rows):
        block = F.normalize(queries[lo:lo + rows].to(device).float(), dim=1)  # (B, D)
        similarity = block @ keys.T  # (B, N)
        if self_ids is not None:
            own = self_ids[lo:lo + block.shape[0]].to(device)
            similarity[torch.arange(block.shape[0], device=device), own] = float("-inf")
        s, i = similarity.topk(k, dim=1)  # (B, k), sorted
        sims.append(s)
        ids.append(i)
        if on_block is not None:
            on_block(block.shape[0])
    return torch.cat(sims), torch.cat(ids)
