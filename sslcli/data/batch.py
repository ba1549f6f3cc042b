"""The typed batch the training engine receives (built by the loader's collate)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from sslcli.data.decode import EncodedViews, decode_views
from sslcli.data.photometric import PhotometricParams, apply_photometric


@dataclass
class Batch:
    """One process's share of a global batch, B images.

    global_views: the G global views, each [B, 3, Hg, Wg]; view 1 is always a crop of image `ids`,
      view 2 of image `second_ids` (neighbour bootstrapping; = ids without it).
    local_views: the L local views, each [B, 3, Hl, Wl] (crops of `ids`).
    ids, second_ids, labels: int64 [B] (labels -1 when unlabeled).
    seeds: int64 [B], the per-(seed, epoch, image) seed every random draw of the sample came from.
    masks: bool [G, B, N] patch masks of the global views (True = masked, patch p = row * w + col),
      or None (data.masking: none); drawn in the workers (sslcli.data.masking.MaskPlan), moved,
      pinned and kept through decode / colour like the other tensors.
    bad: int64 scalar, unreadable images skipped while building this batch.
    photometric: `data.augment_on: device`: one PhotometricParams per view (global then local),
      the views then being uint8 crops to colour and normalise with `colour()`; None when the
      views are already augmented float tensors.
    encoded: `data.decode_on: device`: the views still as JPEG bytes + crop boxes (CPU, untouched by
      `to` and `pin_memory`); global_views and local_views are empty until `decode()`. None otherwise.
    """

    global_views: list[Tensor]
    local_views: list[Tensor]
    ids: Tensor
    second_ids: Tensor
    labels: Tensor
    seeds: Tensor
    bad: Tensor
    masks: Tensor | None = None
    photometric: list[PhotometricParams] | None = None
    encoded: EncodedViews | None = None

    @classmethod
    def from_views(cls, views: list[Tensor], global_views: int = 2) -> "Batch":
        """A batch of ready views of images 0..B-1 (tests and benchmarks; no data loader)."""
        b = views[0].shape[0]
        ids = torch.arange(b)
        return cls(list(views[:global_views]), list(views[global_views:]), ids, ids.clone(),
                   torch.full((b,), -1), ids.clone(), torch.zeros((), dtype=torch.long))

    @property
    def views(self) -> list[Tensor]:
        """Global views first, then local views (the order every loss uses)."""
        return self.global_views + self.local_views

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """Every tensor on `device` (uint8 views cross as uint8: 4x fewer bytes than float32); encoded
        views stay on the CPU."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) in its pinning thread."""
        return self._map(lambda t: t.pin_memory())

    def decode(self, device: torch.device | str) -> "Batch":
        """`data.decode_on: device`: decode, crop, resize and flip the views on `device` -> uint8 views
        [B, 3, S, S] there (sslcli.data.decode.decode_views; images that fail count in `bad`, which
        stays where it was). Unchanged without encoded views. Call it before `to` to read `bad` on the
        host without a device sync."""
        if self.encoded is None:
            return self
        views, failed = decode_views(self.encoded, device)
        g = self.encoded.global_views
        return replace(self, global_views=views[:g], local_views=views[g:], encoded=None, bad=self.bad + failed)

    def colour(self, mean: Sequence[float], std: Sequence[float]) -> "Batch":
        """The device half of the augmentation: uint8 views -> coloured, normalised float32 views
        (apply_photometric per view, batched, on the views' device). Unchanged without params."""
        if self.photometric is None:
            return self
        views = [apply_photometric(v, p, mean, std) for v, p in zip(self.views, self.photometric)]
        g = len(self.global_views)
        return replace(self, global_views=views[:g], local_views=views[g:], photometric=None)

    def __reduce__(self):
        """Pickled (a loader worker -> the training process) as a handful of packed tensors instead
        of ~40: every tensor crosses as its own shared-memory segment, and the receiving side pays
        per tensor (the multi-crop demo's batch: 41 tensors -> 4; `next(loader)` on a ready batch fell
        from 16.2 ms to 4.0 ms on a 2-core CPU). `_rebuild_batch` restores an equal Batch."""
        b = self.size
        ints = torch.cat([self.ids, self.second_ids, self.labels, self.seeds, self.bad.reshape(1)])  # (4B + 1,)
        photometric = None if self.photometric is None else torch.stack([p.pack() for p in self.photometric])
        return _rebuild_batch, (_stacked(self.global_views), _stacked(self.local_views), ints, b, self.masks,
                                photometric, self.encoded)

    def _map(self, fn) -> "Batch":
        changes = {}
        for f in fields(self):
            if f.name == "encoded":  # CPU bytes for decode_jpeg: neither pinned nor moved
                continue
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, list):  # views (tensors) or photometric parameters (their own .to)
                changes[f.name] = [fn(t) for t in value]
        return replace(self, **changes)


def _stacked(views: list[Tensor]) -> Tensor | list[Tensor]:
    """Views of one shape -> one (V, B, C, H, W) tensor; a list of other shapes (or none) unchanged."""
    if len(views) > 1 and all(v.shape == views[0].shape for v in views):
        return torch.stack(views)
    return views


def _rebuild_batch(global_views, local_views, ints: Tensor, b: int, masks, photometric, encoded) -> Batch:
    """The inverse of Batch.__reduce__ (views and parameters come back as slices of the packed tensors)."""
    ids, second_ids, labels, seeds = ints[:4 * b].view(4, b).unbind(0)
    params = None if photometric is None else [PhotometricParams.unpack(p) for p in photometric.unbind(0)]
    return Batch(list(global_views), list(local_views), ids, second_ids, labels, seeds, ints[4 * b],
                 masks, params, encoded)
