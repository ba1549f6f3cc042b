"""The `method:` section of a config: one typed dataclass per method, selected by `name`.

Each class documents its own keys; `sslcli.config` re-exports them. The literal dict
METHOD_CONFIGS is the whole wiring (no registration); every method file under sslcli/methods
receives its own class.

Each class's `checks()` returns its own range checks as (ok, message) pairs; `sslcli.config.validate`
(the single entry point) runs them with the cross-section checks. `field_checks` and the rules
below are shared with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Check = tuple[bool, str]
Rule = tuple[Callable[[Any], bool], str]  # (predicate on one value, what it expects)
POSITIVE: Rule = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
AT_LEAST_1: Rule = (lambda v: v >= 1, ">= 1")
UNIT: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
UNIT_OPEN_LOW: Rule = (lambda v: 0 < v <= 1, "in (0, 1]")


def field_checks(obj: Any, prefix: str, rules: dict[str, Rule]) -> list[Check]:
    """One check per field named in `rules` (keys: space-separated field names); a tuple passes when
    every element does, None (an optional value left to its default) always passes."""
    out = []
    for names, (ok, expect) in rules.items():
        for name in names.split():
            value = getattr(obj, name)
            values = () if value is None else value if isinstance(value, tuple) else (value,)
            shown = list(value) if isinstance(value, tuple) else value
            out.append((all(map(ok, values)), f"{prefix}{name} must be {expect}, got {shown}"))
    return out


def _teacher_checks(m: Any) -> list[Check]:
    return [(0 <= m.momentum_teacher <= m.momentum_teacher_end <= 1,
             "method.momentum_teacher and momentum_teacher_end must satisfy 0 <= momentum_teacher <= "
             f"momentum_teacher_end <= 1, got {m.momentum_teacher} and {m.momentum_teacher_end}")]


@dataclass
class DINOConfig:
    """DINO / DINO-2 (sslcli.methods.dino): head, temperatures, centre and teacher momentum."""

    name: Literal["dino"] = "dino"
    out_dim: int = 65536  # K, number of prototypes
    hidden_dim: int = 2048  # head hidden width
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # final teacher temperature
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # cosine from this to momentum_teacher_end, per iteration
    momentum_teacher_end: float = 1.0
    freeze_last_layer: int = 1  # epochs during which the head's last layer is not updated
    # false: the teacher is the student at every step (no EMA; SimDINO's Table 8: DINO collapses)
    self_distillation: bool = True

    def checks(self) -> list[Check]:
        return _teacher_checks(self) + field_checks(self, "method.", {
            "out_dim hidden_dim bottleneck_dim": POSITIVE, "head_layers": AT_LEAST_1,
            "student_temp teacher_temp warmup_teacher_temp": POSITIVE, "center_momentum": UNIT,
            "warmup_teacher_temp_epochs freeze_last_layer": NON_NEGATIVE})


@dataclass
class SimDINOConfig:
    """SimDINO (sslcli.methods.simdino): DINO without prototypes, with a coding-rate term."""

    name: Literal["simdino"] = "simdino"
    out_dim: int = 256  # d, width of the L2-normalised head output
    hidden_dim: int = 2048
    head_layers: int = 3
    eps2: float = 0.05  # epsilon^2 of the coding rate (the authors' --eps)
    gamma: float | None = None  # weight of the coding rate; None: 1/n + 1/d (n = global batch)
    # global: Z^T Z summed over processes (independent of the process count); local: each process's
    # own Z^T Z with the global n, as the authors' runs (reduce_cov=0)
    covariance: Literal["global", "local"] = "global"
    # mean: Z_a = (student_a + teacher_a) / 2 (the authors' code); student: student_a (the paper)
    expansion_input: Literal["mean", "student"] = "mean"
    momentum_teacher: float = 0.996  # cosine from this to momentum_teacher_end, per iteration
    momentum_teacher_end: float = 1.0
    self_distillation: bool = True  # false: the teacher is the student at every step (Table 8)

    def checks(self) -> list[Check]:
        return _teacher_checks(self) + field_checks(self, "method.", {
            "out_dim hidden_dim eps2": POSITIVE, "head_layers": AT_LEAST_1,
            "gamma": (NON_NEGATIVE[0], ">= 0 (or null: 1/n + 1/d)")})


@dataclass
class DINOv2Config:
    """DINOv2 as trained in the SimDINO paper (sslcli.methods.dinov2): DINO CLS loss + iBOT + KoLeo."""

    name: Literal["dinov2"] = "dinov2"
    out_dim: int = 65536  # K, prototypes of the CLS head (and of the shared patch head)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # final teacher temperature
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    # ema: DINO's centre (momentum center_momentum) then softmax; sinkhorn_knopp: 3 SK iterations
    centering: Literal["ema", "sinkhorn_knopp"] = "ema"
    center_momentum: float = 0.9
    ibot_separate_head: bool = False  # false: one head for CLS and patch tokens (both released configs)
    ibot_out_dim: int = 65536  # prototypes of the separate patch head (ibot_separate_head only)
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1  # on the student backbone CLS of each global view
    freeze_last_layer: int = 1  # epochs during which the heads' last layers are not updated
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    self_distillation: bool = True

    def checks(self) -> list[Check]:
        return _teacher_checks(self) + field_checks(self, "method.", {
            "out_dim hidden_dim bottleneck_dim ibot_out_dim": POSITIVE, "head_layers": AT_LEAST_1,
            "student_temp teacher_temp warmup_teacher_temp": POSITIVE, "center_momentum": UNIT,
            "warmup_teacher_temp_epochs freeze_last_layer dino_weight ibot_weight koleo_weight": NON_NEGATIVE})


@dataclass
class SimDINOv2Config(SimDINOConfig):
    """SimDINOv2 (sslcli.methods.simdinov2): SimDINO's CLS loss + a cosine loss on masked patches."""

    name: Literal["simdinov2"] = "simdinov2"  # type: ignore[assignment]
    patch_weight: float = 1.0
    momentum_teacher: float = 0.9

    def checks(self) -> list[Check]:
        return super().checks() + field_checks(self, "method.", {"patch_weight": NON_NEGATIVE})


@dataclass
class SimSiamConfig:
    """SimSiam (sslcli.methods.simsiam): projector and predictor widths, fixed predictor lr."""

    name: Literal["simsiam"] = "simsiam"
    out_dim: int = 2048  # projector output width
    hidden_dim: int = 2048  # projector hidden width
    pred_dim: int = 512  # predictor bottleneck width
    fix_pred_lr: bool = True  # the predictor keeps the base lr (no cosine decay)

    def checks(self) -> list[Check]:
        return field_checks(self, "method.", {"out_dim hidden_dim pred_dim": POSITIVE})


@dataclass
class SOVEConfig:
    """SOVE (sslcli.methods.sove): non-parametric [CLS] judges and non-parametric masked modelling."""

    name: Literal["sove"] = "sove"
    out_dim: int = 256  # d, the head's L2-normalised output (CLS and patch tokens)
    hidden_dim: int = 2048
    head_layers: int = 3
    cls_memory: int = 65536  # E_C: past teacher CLS embeddings
    patch_memory: int = 8192  # E_P: past teacher patch embeddings (one random patch per image)
    cls_anchors: int = 8192  # P: anchors per [CLS] task (the authors' code: 64)
    judges: int = 8  # k: nearest pool entries judging each anchor (0: the anchor alone)
    cls_tasks: int = 4  # independent [CLS] tasks per step (fresh permutations), losses averaged
    patch_anchors: int = 512  # K-dot: anchors of the MIM task (one judge each, the anchor itself)
    patch_tasks: int = 1  # independent MIM tasks per step
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    anchor_weight: float = 0.9  # a label's weight on its own anchor for the anchor itself (1 - smoothing)
    labels: Literal["soft", "onehot"] = "soft"  # soft: judges weigh their anchor by their cosine to it
    # all: every anchor of a task is used; low_energy: a random half is kept (the authors' code)
    anchor_selection: Literal["all", "low_energy"] = "all"
    representation: Literal["cls", "mean_patch"] = "cls"  # the global token the [CLS] task uses
    cls_weight: float = 1.0  # lambda_1
    mim_weight: float = 1.0  # lambda_2 (0: no masked modelling)
    # KoLeo on the student's head output of each global view (the authors' code's option, 0 there)
    koleo_weight: float = 0.0
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    self_distillation: bool = True

    def checks(self) -> list[Check]:
        return _teacher_checks(self) + field_checks(self, "method.", {
            "out_dim hidden_dim student_temp teacher_temp": POSITIVE, "head_layers cls_tasks patch_tasks": AT_LEAST_1,
            "cls_weight mim_weight koleo_weight": NON_NEGATIVE, "anchor_weight": UNIT_OPEN_LOW}) + [
            (0 < self.cls_anchors < self.cls_memory, "method.cls_anchors must be in 1..cls_memory - 1, got "
             f"{self.cls_anchors} (cls_memory {self.cls_memory})"),
            (0 <= self.judges < self.cls_memory - self.cls_anchors,
             f"method.judges must be >= 0 and smaller than the pool (cls_memory - cls_anchors), got {self.judges}"),
            (0 < self.patch_anchors <= self.patch_memory, "method.patch_anchors must be in 1..patch_memory, got "
             f"{self.patch_anchors} (patch_memory {self.patch_memory})")]


# The `method:` section is one of these, selected by its `name` (the whole wiring: a literal dict).
METHOD_CONFIGS: dict[str, type] = {"dino": DINOConfig, "simsiam": SimSiamConfig, "simdino": SimDINOConfig,
                                   "dinov2": DINOv2Config, "simdinov2": SimDINOv2Config, "sove": SOVEConfig}
MethodConfig = DINOConfig | SimSiamConfig | SimDINOConfig | DINOv2Config | SimDINOv2Config | SOVEConfig
