"""The neighbour cache of bootstrapping: embeddings Z, this epoch's supports, the window.

See docs/methods.md "Neighbour bootstrapping" (cache and window); sharding below.

State, sharded by image id across ranks (rank r owns ids r, r + world, r + 2 world, ...; an owned
id's local row is id // world), rows = ceil((N - r) / world):
  z             [rows, d] float32, device   latest L2-normalised anchor representation (zeros = never seen)
  current_ids   [rows, K] int32,  device    this epoch's top-K support of each anchor (-1 = not yet)
  current_sims  [rows, K] float32, device   their cosine similarities
  window_ids    [w, rows, K] int32, host    the last w completed epochs' supports, a ring whose
  window_sims   [w, rows, K] float32, host   newest slot is `newest` (`slot_order()`: oldest first)
Per-rank memory: rows * (4 d + 8 K) bytes on the device, w * rows * 8 K bytes of host memory,
i.e. O(N (d + 2 w K) / world). Ids are int32 (N < 2^31).

`observe(ids, z)` after each optimizer step: every rank gathers the global batch, queries the top-K
cosine similarities of each anchor against its shard (self included: its row still holds the
previous epoch's vector), the per-shard lists are gathered and merged to the global top-K, then
each rank writes the supports and vectors of the anchors it owns. All queries of a batch happen
before its writes (query-before-insert). Rows never written are not candidates (their similarity
is -inf; the reference's zero rows would enter with similarity 0 and add nothing to m_win, but
their ids would depend on tie order). `end_epoch()` shifts the window.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


SIM_BLOCK = 2**26  # elements of one block of query x cache similarities (256 MB in fp32)


def _distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def _all_gather(t: Tensor, world: int) -> Tensor:
    """[b, ...] on every rank -> [world * b, ...] in rank order (equal b on all ranks)."""
    if not _distributed(world):
        return t
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def comm_device(device: torch.device) -> torch.device:
    """Where collectives run: the GPU under NCCL, the CPU under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_id_rows(shard: Tensor, n: int, rank: int, world: int, device: torch.device,
                   everywhere: bool) -> Tensor | None:
    """Rows of the ids a rank owns [rows, ...] -> id-ordered [N, ...] (CPU) on rank 0, or on every
    rank when `everywhere`; None on the ranks that do not receive it."""
    if not _distributed(world):
        return shard.cpu()
    per_rank = -(-n // world)  # ceil: rank 0 holds the most rows
    dev = comm_device(device)
    padded = torch.zeros((per_rank,) + tuple(shard.shape[1:]), dtype=shard.dtype, device=dev)
    padded[: shard.shape[0]] = shard.to(dev)
    receives = everywhere or rank == 0
    parts = [torch.empty_like(padded) for _ in range(world)] if receives else None
    if everywhere:
        dist.all_gather(parts, padded)
    else:
        dist.gather(padded, parts, dst=0)
    if not receives:
        return None
    full = torch.empty((n,) + tuple(shard.shape[1:]), dtype=shard.dtype)
    for r, part in enumerate(parts):
        full[r::world] = part[: len(range(r, n, world))].cpu()
    return full


class NeighbourCache:
    """Z, supports and window of one rank's shard; see the module docstring for shapes."""

    def __init__(self, n: int, dim: int, top_k: int, window: int, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1):
        self.n, self.dim, self.top_k, self.window = n, dim, top_k, window
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.owned = torch.arange(rank, n, world)  # (rows,) global ids of this shard, CPU
        rows = self.owned.numel()
        # Device buffers have one extra scratch row (index `rows`) that absorbs the writes of anchors
        # owned by other ranks: a scatter to a fixed place instead of a boolean selection, whose
        # nonzero() would be a host sync in every step. Its bias stays -inf (never a candidate).
        self._z = torch.zeros(rows + 1, dim, device=self.device)
        self._bias = torch.full((rows + 1,), float("-inf"), device=self.device)  # 0 once the row is written
        self._current_ids = torch.full((rows + 1, top_k), -1, dtype=torch.int32, device=self.device)
        self._current_sims = torch.zeros(rows + 1, top_k, device=self.device)
        self.window_ids = torch.full((window, rows, top_k), -1, dtype=torch.int32)
        self.window_sims = torch.zeros(window, rows, top_k)
        self.newest = window - 1  # ring index of the newest slot: end_epoch overwrites the oldest in place
        self.epochs_done = 0

    @property
    def rows(self) -> int:
        return self.owned.numel()

    # Views of the shard's rows (without the scratch row); writes through them land in the buffers.
    @property
    def z(self) -> Tensor:
        return self._z[: self.rows]

    @property
    def bias(self) -> Tensor:
        return self._bias[: self.rows]

    @property
    def current_ids(self) -> Tensor:
        return self._current_ids[: self.rows]

    @property
    def current_sims(self) -> Tensor:
        return self._current_sims[: self.rows]

    @torch.no_grad()
    def observe(self, ids: Tensor, z: Tensor) -> None:
        """ids [B] int64 and anchor representations z [B, d] of this rank's batch (any device)."""
        ids = ids.to(self.device, torch.long, non_blocking=True)  # the loader pins it on GPU runs
        z = F.normalize(z.detach().to(self.device, torch.float32), dim=1)
        ids, z = _all_gather(ids, self.world), _all_gather(z, self.world)  # (n,), (n, d)
        top_sims, top_ids = self._query(z)
        mine = ids % self.world == self.rank
        local = torch.where(mine, ids // self.world, self.rows)  # other ranks' anchors -> scratch row
        self._current_ids[local] = top_ids.to(torch.int32)
        self._current_sims[local] = top_sims
        self._z[local] = z
        self._bias[local] = torch.where(mine, 0.0, float("-inf"))

    def _query(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Global top-K (sims [n, K], ids [n, K] int64, -1 / 0 padding) of z [n, d] against Z."""
        k = min(self.top_k, self.rows + 1)
        # Queries in blocks so that the similarity matrix stays under SIM_BLOCK elements (ImageNet on
        # one GPU with batch 1024 would otherwise allocate 5 GB per step).
        block = max(1, SIM_BLOCK // (self.rows + 1))
        top = [torch.addmm(self._bias, q, self._z.T).topk(k, dim=1)  # (b, rows + 1): unwritten / scratch -> -inf
               for q in z.split(block)]
        vals, idx = torch.cat([t.values for t in top]), torch.cat([t.indices for t in top])  # (n, k)
        gids = idx * self.world + self.rank
        if _distributed(self.world):  # merge the shards' lists: (n, world * k) -> top-K
            vals = torch.cat(_all_gather(vals[None], self.world).unbind(0), dim=1)
            gids = torch.cat(_all_gather(gids[None], self.world).unbind(0), dim=1)
            vals, pos = vals.topk(min(self.top_k, vals.shape[1]), dim=1)
            gids = gids.gather(1, pos)
        if vals.shape[1] < self.top_k:  # tiny datasets: pad to K
            pad = self.top_k - vals.shape[1]
            vals = F.pad(vals, (0, pad), value=float("-inf"))
            gids = F.pad(gids, (0, pad), value=-1)
        missing = torch.isinf(vals)
        return vals.masked_fill(missing, 0.0), gids.masked_fill(missing, -1)

    def slot_order(self) -> list[int]:
        """Ring indices of the window slots, oldest first."""
        return [(self.newest + 1 + s) % self.window for s in range(self.window)]

    def end_epoch(self) -> None:
        """The current supports become the newest window slot (the oldest is dropped)."""
        self.newest = (self.newest + 1) % self.window
        self.window_ids[self.newest].copy_(self.current_ids)  # in place: no second copy of a window
        self.window_sims[self.newest].copy_(self.current_sims)  # that may hold gigabytes
        self._current_ids.fill_(-1)
        self._current_sims.zero_()
        self.epochs_done += 1

    # -- checkpoints: full (unsharded, id-ordered) tensors, so a run resumes on any world size --

    def state_dict(self) -> dict[str, Tensor] | None:
        """Full state on rank 0 (None on the other ranks); every rank must call it."""
        full = {name: self._gather_full(getattr(self, name)) for name in ("z", "current_ids", "current_sims")}
        for name in ("window_ids", "window_sims"):  # slot by slot: bounded device memory under NCCL
            slots = [self._gather_full(getattr(self, name)[s]) for s in self.slot_order()]
            full[name] = torch.stack(slots) if self.rank == 0 else None
        if self.rank != 0:
            return None
        full["epochs_done"] = torch.tensor([self.epochs_done])
        return full

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Take this rank's rows of a full state (from `state_dict`, any world size)."""
        expected = {"z": (self.n, self.dim), "current_ids": (self.n, self.top_k),
                    "window_ids": (self.window, self.n, self.top_k)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"bootstrap state '{key}' has shape {tuple(state[key].shape)}, "
                                 f"this run expects {shape} (images, dim, window or top_k changed?)")
        own = self.owned
        self.z.copy_(state["z"][own])
        self.bias.copy_(torch.where(state["z"][own].abs().sum(1) > 0, 0.0, float("-inf")))
        self.current_ids.copy_(state["current_ids"][own])
        self.current_sims.copy_(state["current_sims"][own])
        self.window_ids = state["window_ids"][:, own].to(torch.int32).clone()
        self.window_sims = state["window_sims"][:, own].float().clone()
        self.newest = self.window - 1  # the state is oldest first
        self.epochs_done = int(state["epochs_done"][0])

    def _gather_full(self, shard: Tensor) -> Tensor | None:
        return gather_id_rows(shard, self.n, self.rank, self.world, self.device, everywhere=False)
