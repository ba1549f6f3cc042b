"""Backbone + head over a list of crops of possibly different sizes (DINO's MultiCropWrapper).

Consecutive crops of the same resolution are concatenated into one backbone pass (so 2 x 224 and
10 x 96 cost two passes), the head runs once on everything.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslcli.models.backbone import Backbone


def same_size_runs(views: list[Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive views with the same spatial size."""
    runs, start = [], 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        runs.append((start, end))
        start = end
    return runs


class MultiCropNetwork(nn.Module):
    """views [B, 3, H_v, W_v] -> (head outputs per view [B, K], backbone CLS of all views [V*B, D])."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        feats = torch.cat([self.backbone(torch.cat(views[a:b])) for a, b in same_size_runs(views)])  # (V*B, D)
        out = self.head(feats)  # (V*B, K)
        return list(out.chunk(len(views))), feats
