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


class MaskedMultiCropNetwork(nn.Module):
    """Backbone + head over global and local crops with patch masks (DINOv2 family, iBOT).

    forward(global_views, local_views, masks, mask_input) -> (cls_out, cls_feats, patch_out):
      global_views: G tensors [B, 3, H, W]; local_views: L tensors [B, 3, h, w];
      masks: [G, B, N] bool patch masks of the global views (None: no patch output);
      mask_input: replace the masked patches by the mask token (the student) or not (the teacher,
        whose patch outputs are still taken at the masked positions, the iBOT targets).
      cls_out: G + L tensors [B, K], the head on each view's CLS (global first);
      cls_feats: [G*B, D] the backbone CLS of the global views (KoLeo);
      patch_out: [M, K'] the patch head on the masked patches, rows in the row-major order of
        masks.flatten(0, 1) [G*B, N]; `patch_head` None shares `head`.
    `global_token`: "cls" (the backbone's CLS / pooled feature) or "mean_patch" (the mean of the
    patch tokens, SOVE's Table B.2) is what the head sees as each view's global token.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, patch_head: nn.Module | None = None,
                 global_token: str = "cls"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head
        self.global_token = global_token

    def _global(self, x: Tensor) -> Tensor:
        """[n, 3, h, w] local views -> [n, D] global tokens."""
        return self.backbone(x) if self.global_token == "cls" else self.backbone.forward_tokens(x)[1].mean(1)

    def forward(self, global_views: list[Tensor], local_views: list[Tensor], masks: Tensor | None,
                mask_input: bool) -> tuple[list[Tensor], Tensor, Tensor | None]:
        flat = masks.flatten(0, 1) if masks is not None else None  # (G*B, N)
        cls, patch = self.backbone.forward_tokens(torch.cat(global_views), flat if mask_input else None)
        if self.global_token == "mean_patch":
            cls = patch.mean(1)
        feats = [cls] + [self._global(torch.cat(local_views[a:b])) for a, b in same_size_runs(local_views)]
        cls_out = list(self.head(torch.cat(feats)).chunk(len(global_views) + len(local_views)))
        patch_out = None
        if flat is not None:
            head = self.head if self.patch_head is None else self.patch_head
            patch_out = head(patch[flat])  # (M, K')
        return cls_out, cls, patch_out


def scatter_masked(rows: Tensor, masks: Tensor) -> Tensor:
    """[M, d] rows of the masked patches -> [G, N, d] with zeros at the unmasked positions."""
    out = rows.new_zeros(*masks.shape, rows.shape[-1])
    out[masks] = rows
    return out
