"""Projection heads.

DINOHead (Caron et al. 2021, Sec. 3.1 / appendix): MLP in -> hidden -> hidden -> bottleneck
(GELU between, optional BN), trunc-normal(0.02) init, zero bias; L2-normalise the bottleneck;
then a weight-normalised linear layer bottleneck -> K without bias. With norm_last_layer the
gain is frozen at 1, so logits are cosines to K unit-norm prototypes. The last layer runs in fp32
under autocast (the MLP follows the autocast dtype).

ProjectionHead (SimDINO, Wu et al. 2025): DINOHead without the prototype layer, i.e. the MLP
in -> hidden -> hidden -> out then L2-normalise; same init.

SimSiamProjector / SimSiamPredictor (Chen & He 2021, Sec. 4.1 and the authors' simsiam/builder.py):
BN-MLPs with PyTorch's default Linear / BN initialisation (the authors' code keeps torchvision's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, use_bn: bool) -> nn.Sequential:
    """Linear(+BN)+GELU blocks, `layers` linears in all, ending in a plain Linear."""
    if layers == 1:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    blocks: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (layers - 1)
    for a, b in zip(dims[:-1], dims[1:]):
        blocks.append(nn.Linear(a, b))
        if use_bn:
            blocks.append(nn.BatchNorm1d(b))
        blocks.append(nn.GELU())
    blocks.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*blocks)


class WeightNormLinear(nn.Module):
    """y = x (g * v / ||v||_row)^T, the same function as torch's weight_norm(dim=0) on a Linear.

    Written out explicitly so that checkpoints have two plain tensors (`weight_g` [K, 1] and
    `weight_v` [K, d]) and EMA/state_dict need no parametrization machinery.
    """

    def __init__(self, in_dim: int, out_dim: int, fix_gain: bool):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_gain)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """[B, in_dim] -> [B, out_dim] logits (see module docstring)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, layers, use_bn)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck_dim), unit norm
        # fp32 even under bf16 autocast: bf16 logits are rounded before the loss's fp32 softmax,
        # which at teacher temperature 0.04 visibly moves the teacher distribution.
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x.float())  # (B, K) float32


class ProjectionHead(nn.Module):
    """[B, in_dim] -> [B, out_dim] unit-norm embeddings (an MLP as DINOHead's, no prototypes)."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int = 2048, layers: int = 3):
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, out_dim, layers, use_bn=False)
        self.mlp.apply(_init_linear)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1)  # (B, out_dim), unit norm, autocast dtype


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class SimSiamProjector(nn.Sequential):
    """[B, in_dim] -> z [B, out_dim]: Linear(no bias)-BN-ReLU-Linear(no bias)-BN-ReLU-Linear-BN(affine=False).

    The third Linear has a bias that is frozen (requires_grad False), as in the authors' code, where
    it is the ResNet's original `fc` and `encoder.fc[6].bias.requires_grad = False` ("not use bias as
    it is followed by BN"): the affine-free BN subtracts it again, so it never changes the output.
    Frozen parameters are left out of the optimizer (sslcli.train.optim.param_groups).
    Indices as in the authors' `encoder.fc`: [0] [3] [6] Linear, [1] [4] [7] BN, [2] [5] ReLU.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048):
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim, affine=False))
        self[6].bias.requires_grad_(False)


class SimSiamPredictor(nn.Sequential):
    """h: z [B, dim] -> p [B, dim]: Linear(dim, pred_dim, no bias)-BN-ReLU-Linear(pred_dim, dim) (bias)."""

    def __init__(self, dim: int = 2048, pred_dim: int = 512):
        super().__init__(
            nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim))
