"""Backbones (timm behind one features API), heads, the multi-crop network and the EMA update."""

from sslcli.models.backbone import Backbone, create_backbone
from sslcli.models.ema import ema_update
from sslcli.models.heads import DINOHead, ProjectionHead, SimSiamPredictor, SimSiamProjector
from sslcli.models.multicrop import MaskedMultiCropNetwork, MultiCropNetwork, scatter_masked

__all__ = ["Backbone", "create_backbone", "ema_update", "DINOHead", "MaskedMultiCropNetwork", "MultiCropNetwork", "ProjectionHead", "SimSiamPredictor",
           "SimSiamProjector", "scatter_masked"]
