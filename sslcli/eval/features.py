"""Batched feature extraction from a frozen backbone (shared by every eval and the k-NN monitor)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sslcli.device import autocast
from sslcli.errors import DataError


class TransformedImages(Dataset):
    """(image tensor, label) pairs from an ImageDataset through an eval transform."""

    def __init__(self, images, transform: Callable):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            image = self.images.load(i)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # evals never skip images: name the file
            raise DataError(f"cannot read image {i} ({self.images.paths[i]}): {type(e).__name__}") from None
        return self.transform(image), int(self.images.labels[i])


@torch.no_grad()
def extract_features(backbone: nn.Module, images, transform: Callable, device: torch.device,
                     batch_size: int = 256, workers: int = 4,
                     on_batch: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """Global features of every image -> (features [N, D] float32 on CPU, labels [N] int64).

    The backbone runs in eval mode (restored afterwards) under `sslcli.device.autocast` (bf16 on CUDA).
    `on_batch(n)` is called after each batch with its size (for progress bars).
    """
    loader = DataLoader(TransformedImages(images, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    return embed_batches(backbone, loader, device, on_batch)


@torch.no_grad()
def embed_batches(backbone: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                  on_batch: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """(images [b, 3, S, S], labels [b]) batches -> (features [N, D] float32 on CPU, labels [N]);
    the backbone in eval mode (restored afterwards), under `sslcli.device.autocast`."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            with autocast(device):
                f = backbone(x.to(device, non_blocking=True))
            feats.append(f.float().cpu())
            labels.append(y)
            if on_batch is not None:
                on_batch(len(y))
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()
