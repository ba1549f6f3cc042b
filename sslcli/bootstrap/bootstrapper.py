"""Neighbour bootstrapping as the training engine sees it (docs/methods.md "Neighbour bootstrapping").

It never knows the method: the engine gives it, after each optimizer step, the image ids of the
batch and the method's anchor representation z_i (StepOutput.anchor, (B, d)); before each epoch it
returns the plan j* [N] (which image each anchor's second view is cropped from) that the data
sampler hands to the loader workers; after each epoch it shifts the window and reports
bootstrap_ratio, nn_acc and nn2_acc.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sslcli.bootstrap.cache import NeighbourCache, comm_device, gather_id_rows
from sslcli.bootstrap.rules import RULES, PlanInput
from sslcli.config import BootstrapConfig
from sslcli.errors import ConfigError


class Bootstrapper:
    """Cache + decision rule for one run; `labels` [N] int64 (-1 unlabeled) of all images."""

    def __init__(self, cfg: BootstrapConfig, n: int, dim: int, labels: Tensor, epochs: int, seed: int,
                 device: torch.device | str = "cpu", rank: int = 0, world: int = 1):
        if cfg.name not in RULES:
            raise ConfigError(f"unknown bootstrap.name '{cfg.name}' (available: {', '.join(RULES)})")
        self.labeled = bool((labels >= 0).all()) and labels.numel() == n
        if cfg.name == "oracle" and not self.labeled:
            raise ConfigError("bootstrap.name oracle needs a labeled dataset (ImageFolder classes)")
        self.cfg, self.n, self.epochs, self.seed = cfg, n, epochs, seed
        self.labels = labels.long().cpu()
        self.rule = RULES[cfg.name]
        self.cache = NeighbourCache(n, dim, cfg.top_k, cfg.window, device, rank, world)
        self.ratio = 0.0  # bootstrap_ratio of the last plan

    def observe(self, ids: Tensor, z: Tensor) -> None:
        """After an optimizer step: ids [B] and anchor representations z [B, d] of this rank."""
        self.cache.observe(ids, z)

    def uniforms(self, epoch: int) -> Tensor:
        """(2, N) uniforms of `epoch` for all images, the same on every rank."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return torch.rand(2, self.n, generator=g)

    def plan(self, epoch: int) -> Tensor:
        """j* for every image (int64 [N], CPU) in `epoch`, from the windows of earlier epochs."""
        cache = self.cache
        inp = PlanInput(self.cfg, cache.owned, cache.window_ids, cache.window_sims, cache.epochs_done,
                        epoch, self.epochs, self.uniforms(epoch)[:, cache.owned],
                        self.labels if self.labeled else None, cache.device, cache.newest)
        try:
            mine = self.rule(inp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        full = self._all_gather_rows(mine)
        self.ratio = float((full != torch.arange(self.n)).float().mean())
        return full

    def end_epoch(self) -> dict[str, float]:
        """Shift the window; metrics of the epoch that ended (nn_acc / nn2_acc need labels)."""
        record = {"bootstrap_ratio": 100.0 * self.ratio}
        ids = self.cache.current_ids.long().cpu()  # (rows, K)
        seen = ids[:, 0] >= 0
        if self.labeled:
            own = self.labels[self.cache.owned]
            first = seen & (self.labels[ids[:, 0].clamp_min(0)] == own)
            second = (ids[:, 1] >= 0) & (self.labels[ids[:, 1].clamp_min(0)] == own)
            counts = torch.tensor([float(first.sum()), float(second.sum()), float(seen.sum())])
            counts = self._all_reduce(counts)
            record["nn_acc"] = 100.0 * float(counts[0] / counts[2].clamp_min(1))
            record["nn2_acc"] = 100.0 * float(counts[1] / counts[2].clamp_min(1))
        self.cache.end_epoch()
        return record

    def state_dict(self) -> dict[str, Tensor] | None:
        """Full cache state on rank 0, None elsewhere (collective: every rank calls it)."""
        return self.cache.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.cache.load_state_dict(state)

    def _all_gather_rows(self, mine: Tensor) -> Tensor:
        """Per-rank values of owned ids (R,) -> id-ordered (N,) on every rank."""
        c = self.cache
        return gather_id_rows(mine, self.n, c.rank, c.world, c.device, everywhere=True)

    def _all_reduce(self, t: Tensor) -> Tensor:
        if self.cache.world == 1 or not dist.is_initialized():
            return t
        t = t.to(comm_device(self.cache.device))
        dist.all_reduce(t)
        return t.cpu()
