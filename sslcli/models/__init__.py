"""Backbones (timm behind one features API) and heads."""

from sslcli.models.backbone import Backbone, create_backbone
from sslcli.models.heads import DINOHead, SimSiamPredictor, SimSiamProjector

__all__ = ["Backbone", "create_backbone", "DINOHead", "SimSiamPredictor", "SimSiamProjector"]
