"""Methods: one file each. The literal dict below is the whole wiring (no registration magic)."""

from __future__ import annotations

from sslcli.config import MethodConfig, ModelConfig
from sslcli.errors import ConfigError, hint
from sslcli.methods.base import Method, StepContext, StepOutput
from sslcli.methods.dino import DINO
from sslcli.methods.dinov2 import DINOv2
from sslcli.methods.simdino import SimDINO
from sslcli.methods.simdinov2 import SimDINOv2
from sslcli.methods.simsiam import SimSiam
from sslcli.methods.sove import SOVE

METHODS = {"dino": DINO, "simsiam": SimSiam, "simdino": SimDINO, "dinov2": DINOv2, "simdinov2": SimDINOv2, "sove": SOVE}


def build_method(model_cfg: ModelConfig, method_cfg: MethodConfig, epochs: int, steps_per_epoch: int) -> Method:
    """The method named by method_cfg.name, with its schedules laid out for the run's length."""
    if method_cfg.name not in METHODS:
        raise ConfigError(f"unknown method.name '{method_cfg.name}'{hint(method_cfg.name, METHODS)}")
    return METHODS[method_cfg.name](model_cfg, method_cfg, epochs, steps_per_epoch)


__all__ = ["METHODS", "Method", "StepContext", "StepOutput", "build_method"]
