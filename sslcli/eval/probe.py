"""What a linear probe reads from a frozen backbone (docs/evals.md "Linear probe", both protocols).

ViT -> the CLS tokens of the last n blocks, each after the final norm, concatenated, plus
(avgpool) the mean of the last block's patch tokens; CNN -> the pooled vector.
Defaults (`default_probe`), DINO's rule: ViT-S and smaller (embed_dim < 768) n = 4 without the
patch average, ViT-B and larger n = 1 with it; n is capped at the model's depth (a 3-block ViT
gets its 3 blocks: DINO's rule was written for 12-block models). CNN: the pooled vector.
Explicit values are checked against the model, and errors name the model the weights hold.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslcli.errors import UsageError
from sslcli.models.backbone import Backbone

VIT_BASE_DIM = 768  # DINO: ViT-S (384) uses 4 CLS tokens, ViT-B (768) 1 CLS + the patch average
SMALL_VIT_BLOCKS = 4


def vit_depth(backbone: Backbone) -> int:
    """Number of transformer blocks of a ViT backbone."""
    return len(backbone.model.blocks)


def default_probe(backbone: Backbone) -> tuple[int, bool]:
    """DINO's (n_last_blocks, avgpool): ViT with embed_dim < 768 (ViT-S, ViT-Ti) ->
    (min(4, depth), False); ViT-B and larger -> (1, True); CNN -> (1, False) (ignored for CNNs)."""
    if not backbone.is_vit:
        return 1, False
    if backbone.embed_dim < VIT_BASE_DIM:
        return min(SMALL_VIT_BLOCKS, vit_depth(backbone)), False
    return 1, True


def resolve_probe(backbone: Backbone, n_last_blocks: int | None, avgpool: bool | None,
                  model: str | None = None) -> tuple[int, bool]:
    """(n_last_blocks, avgpool) with None -> default_probe's.

    UsageError when n is not in 1..depth, or when either is given for a CNN (which only has its
    pooled vector). `model` names the model in messages (WeightsInfo.model_name(): arch plus its
    kwargs); default: the backbone's arch.
    """
    model = model or backbone.arch
    if not backbone.is_vit:
        if n_last_blocks not in (None, 1) or avgpool:
            raise UsageError(f"linear probe: n_last_blocks / avgpool apply to ViTs only; "
                             f"{model} gives its pooled vector")
        return 1, False
    default_n, default_avg = default_probe(backbone)
    n = default_n if n_last_blocks is None else n_last_blocks
    depth = vit_depth(backbone)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= depth:
        raise UsageError(f"linear probe: n_last_blocks must be in 1..{depth} for {model}, got {n!r}")
    return n, default_avg if avgpool is None else bool(avgpool)


def describe_probe(backbone: Backbone, n_last_blocks: int, avgpool: bool) -> str:
    """The probe feature in words, for reports: e.g. 'CLS of the last 3 of 3 blocks'."""
    if not backbone.is_vit:
        return "pooled vector"
    blocks = "the last block" if n_last_blocks == 1 else f"the last {n_last_blocks} blocks"
    text = f"CLS of {blocks} (of {vit_depth(backbone)})"
    return text + " + mean patch token" if avgpool else text


def probe_features(backbone: Backbone, x: Tensor, n_last_blocks: int, avgpool: bool) -> Tensor:
    """Images [B, 3, H, W] -> probe features [B, F].

    ViT: [cls_{L-n+1}, ..., cls_L] (+ mean of block L's patch tokens when avgpool), every block
    output through the final norm, so F = embed_dim x (n_last_blocks + avgpool).
    CNN: the pooled vector, F = embed_dim (n_last_blocks and avgpool are ignored).
    Gradients are not disabled here; callers run it under torch.no_grad().
    """
    if not backbone.is_vit:
        return backbone(x)
    blocks = backbone.last_blocks(x, n_last_blocks)  # n x (cls [B, D], patch [B, N, D])
    parts = [cls for cls, _ in blocks]
    if avgpool:
        parts.append(blocks[-1][1].mean(dim=1))
    return torch.cat(parts, dim=1)


class ProbeFeatures(nn.Module):
    """`probe_features` as a module: images [B, 3, H, W] -> [B, F] (for extract_features)."""

    def __init__(self, backbone: Backbone, n_last_blocks: int, avgpool: bool):
        super().__init__()
        self.backbone, self.n_last_blocks, self.avgpool = backbone, n_last_blocks, avgpool

    def forward(self, x: Tensor) -> Tensor:
        return probe_features(self.backbone, x, self.n_last_blocks, self.avgpool)
