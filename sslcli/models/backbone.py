"""timm backbones behind one features API (spec: methods.md "Backbone features API").

`Backbone(x)` -> the global feature [B, D]: the CLS token after the final norm for ViTs, the
pooled vector for CNNs / Swin. `forward_features(x)` -> {"cls": [B, D], "patch": [B, N, D]}
(patch tokens after the final norm; CNN feature maps flattened to tokens).
`last_blocks(x, n)` -> the last n blocks' outputs each through the final norm, as a list of
(cls [B, D], patch [B, N, D]) pairs (ViTs only), used by the linear probe.

ViTs are created with timm's `dynamic_img_size=True`, so positional embeddings are interpolated
and 96-px local crops run through the same network as 224-px global crops (Swin: with
`strict_img_size=False`, its windows are padded).
"""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn

from sslcli.config import ModelConfig
from sslcli.errors import ConfigError, hint

VIT_PREFIXES = ("vit_", "deit", "eva", "beit")


def is_vit_arch(arch: str) -> bool:
    return arch.startswith(VIT_PREFIXES)


class Backbone(nn.Module):
    """A timm model without classifier, exposing cls / patch / last-blocks features."""

    def __init__(self, model: nn.Module, arch: str):
        super().__init__()
        self.model = model
        self.arch = arch
        self.embed_dim: int = model.num_features
        self.is_vit = hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")

    @property
    def patch_size(self) -> int:
        """Pixels per token side: the ViT patch size, or the CNN's total stride (feature reduction)."""
        if self.is_vit:
            return int(self.model.patch_embed.patch_size[0])
        return int(self.model.feature_info[-1]["reduction"])

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, D]."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.model.forward_features(x)
        cls = self.model.forward_head(feats, pre_logits=True)
        if self.is_vit:
            patch = feats[:, self.model.num_prefix_tokens:]  # (B, N, D)
        elif feats.ndim == 4 and feats.shape[-1] == self.embed_dim and feats.shape[1] != self.embed_dim:
            patch = feats.flatten(1, 2)  # NHWC (Swin) -> (B, H*W, D)
        else:
            patch = feats.flatten(2).transpose(1, 2)  # NCHW -> (B, H*W, D)
        return {"cls": cls, "patch": patch}

    def last_blocks(self, x: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
        if not self.is_vit:
            raise ConfigError(f"last_blocks needs a ViT backbone, got '{self.arch}'")
        out = self.model.forward_intermediates(
            x, indices=n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
        return [(prefix[:, 0], patch) for patch, prefix in out]


def create_backbone(cfg: ModelConfig, drop_path_rate: float | None = None) -> Backbone:
    """timm.create_model(cfg.arch, **cfg.kwargs) without classifier; no weights are downloaded.

    drop_path_rate overrides cfg.drop_path_rate (the DINO teacher uses 0).
    """
    if not timm.is_model(cfg.arch):
        raise ConfigError(f"unknown model.arch '{cfg.arch}'{hint(cfg.arch, timm.list_models())}")
    kwargs = dict(cfg.kwargs)
    kwargs["drop_path_rate"] = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
    if is_vit_arch(cfg.arch):
        kwargs.setdefault("dynamic_img_size", True)
    elif cfg.arch.startswith("swin"):  # windows are padded, so 96-px local crops run too
        kwargs.setdefault("strict_img_size", False)
    try:
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs not accepted by '{cfg.arch}': {e}") from None
    return Backbone(model, cfg.arch)


@torch.no_grad()
def count_flops_per_image(backbone: Backbone, size: int) -> float:
    """Forward FLOPs of one image of size x size (2 * multiply-adds of linear/conv layers)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(backbone.parameters()).device
    with FlopCounterMode(display=False) as counter:
        backbone(torch.zeros(1, 3, size, size, device=device))
    return float(counter.get_total_flops())
