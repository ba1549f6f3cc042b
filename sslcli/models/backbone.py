"""timm backbones behind one features API (docs/methods.md, "Fidelity details of the DINO family").

`Backbone(x)` -> the global feature [B, D]: the CLS token after the final norm for ViTs, the
pooled vector for CNNs / Swin. `forward_tokens(x, masks)` -> (cls [B, D], patch [B, N, D]):
patch tokens after the final norm, registers excluded; `masks` [B, N] bool replaces the masked
patch embeddings by a learned mask token before the position embedding is added (iBOT / DINOv2
masked modelling). The mask token belongs to this wrapper, not to the timm model, so an exported
backbone stays a plain timm state dict. `forward_features(x)` -> {"cls", "patch"} (the evals).
`last_blocks(x, n)` -> the last n blocks' outputs through the final norm (the linear probe).

ViT fidelity choices (ModelConfig keys):
- `pos_embed_resample`: crops of another size than the model's (96-px local crops, eval frames)
  get position embeddings resampled as DINO does: bicubic, scale factor (g + 0.1) / g0 per grid
  axis (g the new grid side, g0 the trained one), no antialiasing (`dino`) or with it
  (`antialias`, the DINOv2 family). timm's own dynamic resampling antialiases to the exact size,
  which gives different values. DINO's code applies the width factor to the height axis; the two
  agree for square crops (all training crops) and this module maps each axis to its own factor.
- `vit_token_init: dino`: cls_token trunc-normal std 0.02 like pos_embed (timm: std 1e-6).
- `attention`: timm's own choice (`fused`: torch's scaled_dot_product_attention wherever timm
  uses it) or its matrix products in every attention layer (`math`): the same attention,
  rounded differently; `math` is faster for the short sequences of small crops on a CPU (the
  demo), `fused` for long ones and on GPUs.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslcli.config import ModelConfig
from sslcli.errors import ConfigError, hint
from sslcli.typed import show

VIT_PREFIXES = ("vit_", "deit", "eva", "beit")


def is_vit_arch(arch: str) -> bool:
    return arch.startswith(VIT_PREFIXES)


def resample_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], prefix: int,
                       antialias: bool) -> Tensor:
    """[1, prefix + gh*gw, D] -> [1, prefix + h*w, D], DINO's bicubic resampling with offset 0.1."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    (gh, gw), (h, w) = old_grid, new_grid
    head, grid = pos_embed[:, :prefix], pos_embed[:, prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, gh, gw, dim).permute(0, 3, 1, 2).float()  # (1, D, gh, gw)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                         align_corners=False, antialias=antialias)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, dim)  # (1, h*w, D)
    return torch.cat([head, grid], dim=1)


class Backbone(nn.Module):
    """A timm model without classifier, exposing cls / patch / last-blocks features."""

    def __init__(self, model: nn.Module, arch: str, pos_embed_resample: str = "dino", mask_token: bool = False):
        super().__init__()
        self.model = model
        self.arch = arch
        self.embed_dim: int = model.num_features
        self.is_vit = hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")
        self.antialias = pos_embed_resample == "antialias"
        # Our own token path (masks, DINO's resampling) for timm's plain VisionTransformer.
        self.own_tokens = isinstance(model, VisionTransformer) and model.pos_embed is not None
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim)) if mask_token else None

    @property
    def patch_size(self) -> int:
        """Pixels per token side: the ViT patch size, or the CNN's total stride (feature reduction)."""
        if self.is_vit:
            return int(self.model.patch_embed.patch_size[0])
        return int(self.model.feature_info[-1]["reduction"])

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, D]."""
        return self.model.forward_head(self._tokens(x), pre_logits=True)

    def forward_tokens(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """[B, 3, H, W] (and masks [B, N] bool) -> (cls [B, D], patch tokens [B, N, D])."""
        feats = self._tokens(x, masks)
        cls = self.model.forward_head(feats, pre_logits=True)
        if self.is_vit:
            return cls, feats[:, self.model.num_prefix_tokens:]  # registers excluded
        if feats.ndim == 4 and feats.shape[-1] == self.embed_dim and feats.shape[1] != self.embed_dim:
            return cls, feats.flatten(1, 2)  # NHWC (Swin) -> (B, H*W, D)
        return cls, feats.flatten(2).transpose(1, 2)  # NCHW -> (B, H*W, D)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        cls, patch = self.forward_tokens(x)
        return {"cls": cls, "patch": patch}

    def last_blocks(self, x: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
        if not self.is_vit:
            raise ConfigError(f"last_blocks needs a ViT backbone, got '{self.arch}'")
        out = self.model.forward_intermediates(
            x, indices=n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
        return [(prefix[:, 0], patch) for patch, prefix in out]

    def _tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """timm's forward_features, with masking and DINO's position-embedding resampling for ViTs."""
        if masks is not None and (self.mask_token is None or not self.own_tokens):
            raise ConfigError(f"masked forward needs a ViT backbone created with a mask token, got '{self.arch}'")
        if not self.own_tokens:
            return self.model.forward_features(x)
        m = self.model
        x = m.patch_embed(x)  # (B, h, w, D) with dynamic_img_size, else (B, N, D)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(m.patch_embed.grid_size)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, D)
        if masks is not None:
            x = torch.where(masks.reshape(x.shape[0], -1, 1), self.mask_token.to(x.dtype), x)
        x = self._add_pos_embed(x, grid)
        x = m.norm_pre(m.patch_drop(x))
        return m.norm(m.blocks(x))  # (B, prefix + N, D)

    def _add_pos_embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Prefix tokens and position embeddings, in timm's order for the model's no_embed_class."""
        m = self.model
        prefix = [t.expand(x.shape[0], -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        pos = resample_pos_embed(m.pos_embed, tuple(m.patch_embed.grid_size), grid,
                                 0 if m.no_embed_class else m.num_prefix_tokens, self.antialias)
        if m.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return m.pos_drop(x)


def create_backbone(cfg: ModelConfig, drop_path_rate: float | None = None, mask_token: bool = False) -> Backbone:
    """timm.create_model(cfg.arch, **cfg.kwargs) without classifier; no weights are downloaded.

    drop_path_rate overrides cfg.drop_path_rate (the DINO teacher uses 0). mask_token: give the
    backbone a learned mask token for masked forwards (methods with masked image modelling).
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
    except (TypeError, ValueError, AssertionError, RuntimeError, ArithmeticError, KeyError, IndexError) as e:
        # timm checks its arguments with asserts and fails on others deep inside (a negative depth, an
        # embed_dim not divisible by num_heads, an unknown act_layer, patch_size 0): all bad input.
        detail = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"model.kwargs {show(cfg.kwargs)} not accepted by model.arch '{cfg.arch}' "
                          f"({type(e).__name__}{': ' + detail if detail else ''})") from None
    if cfg.vit_token_init == "dino" and getattr(model, "cls_token", None) is not None:
        nn.init.trunc_normal_(model.cls_token, std=0.02)  # DINO's init (timm: normal std 1e-6)
    if cfg.attention == "math":  # timm's attention layers read this flag at every forward
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    return Backbone(model, cfg.arch, cfg.pos_embed_resample, mask_token)


@torch.no_grad()
def count_flops_per_image(backbone: Backbone, size: int) -> float:
    """Forward FLOPs of one image of size x size (2 * multiply-adds of linear/conv layers)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(backbone.parameters()).device
    with FlopCounterMode(display=False) as counter:
        backbone(torch.zeros(1, 3, size, size, device=device))
    return float(counter.get_total_flops())
