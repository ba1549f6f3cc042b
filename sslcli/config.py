"""Configuration: typed dataclasses, preset lookup, YAML + dotted overrides, validation.

A config is resolved once, in this order, each step deep-merging into the previous one:
  defaults of the dataclasses <- preset (and the chain of presets it `extends:`) <- `--config FILE`
  <- each `--set a.b=value` (value parsed as YAML, so `--set optim.lr=1e-3` is a float).
Then `from_dict` builds the dataclasses, rejecting unknown keys and values of the wrong type with
a `ConfigError` that names the dotted key and the closest valid names (exit code 2).

Code below the CLI receives its own sub-config (`ModelConfig`, `DataConfig`, ...), never the root.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from sslcli.errors import ConfigError, hint
from sslcli.method_configs import (AT_LEAST_1, METHOD_CONFIGS, NON_NEGATIVE, POSITIVE, UNIT,  # noqa: F401
                                   UNIT_OPEN_LOW, DINOConfig, DINOv2Config, MethodConfig, SimDINOConfig,
                                   SimDINOv2Config, SimSiamConfig, SOVEConfig, field_checks)
from sslcli.typed import MAX_YAML_DEPTH, from_dict, load_yaml, read_yaml_file, to_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Weighted k-NN defaults (DINO's protocol), shared by `ssl eval knn` and the online monitor.
KNN_KS = (10, 20, 100, 200)
KNN_HEADLINE_K = 20  # the k whose top-1 is reported as "top1"
KNN_TEMPERATURE = 0.07
MAX_EPOCHS = 10_000  # schedules are per-iteration lists: a typo such as 1e9 epochs would exhaust memory


@dataclass
class SourceConfig:
    """Where a preset comes from: paper, table, row and the numbers the paper reports."""

    paper: str = ""
    table: str = ""
    row: str = ""
    reported: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Backbone: any timm model name; `kwargs` go to timm.create_model (e.g. a tiny ViT)."""

    arch: str = "vit_small_patch16_224"
    drop_path_rate: float = 0.1
    kwargs: dict[str, Any] = field(default_factory=dict)
    # ViT position embeddings for crops of another size: `dino` resamples bicubic without
    # antialiasing with DINO's scale factor (w0 + 0.1) / sqrt(N); `antialias` the same with
    # antialiasing (the DINOv2 family).
    pos_embed_resample: Literal["dino", "antialias"] = "dino"
    # ViT cls_token / pos_embed init: `dino` trunc-normal std 0.02 (DINO); `timm` keeps timm's
    # (cls_token std 1e-6).
    vit_token_init: Literal["dino", "timm"] = "dino"
    # ViT attention kernel, the same function either way: `fused` timm's default (torch's
    # scaled_dot_product_attention; less memory on long sequences), `math` softmax(q k^T / sqrt(d)) v
    # as matrix products (timm's fused_attn=False; ~10 % faster per step on a 2-core CPU for the
    # demo's 17 tokens).
    attention: Literal["fused", "math"] = "fused"
    # Start both backbones from these weights (a run directory, a training checkpoint, an export or
    # a timm state dict in safetensors; sslcli.models.pretrained); heads start fresh. "" = random.
    init_from: str = ""


@dataclass
class BootstrapConfig:
    """Neighbour bootstrapping (docs/methods.md, "Neighbour bootstrapping"): which image the second view
    of anchor i is cropped from. none: i itself; nn: its nearest cached neighbour; adasim: sampled
    from the window distribution when the latent space around i is trusted; oracle: a same-class
    image (labels needed)."""

    name: Literal["none", "nn", "adasim", "oracle"] = "none"
    tau: float = 0.2  # adasim: softmax temperature of p_win; 0 = never bootstrap
    window: int = 1  # w: epochs of neighbour lists kept (adasim)
    top_k: int = 10  # K: neighbours recorded per anchor and epoch, and candidates kept
    p: float = 0.0  # oracle: final probability of a standard pair (p_std goes 1 -> p)


@dataclass
class DataConfig:
    """Training data and DINO's multi-crop augmentation (docs/methods.md, "Multi-crop augmentation")."""

    path: str | None = None  # ImageFolder root, unlabeled folder, or builtin:<name>; --data sets it
    global_crops: int = 2
    global_crop_size: int = 224
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 8
    local_crop_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # RandomResizedCrop: DINO bicubic, SimSiam bilinear
    # device: workers crop and flip (uint8 out) and draw the colour parameters, the colour chain runs
    # batched on the training device (a CPU: in the workers, after collating); worker: the whole chain in
    # PIL in the workers (the reference).
    augment_on: Literal["device", "worker"] = "device"
    # device: with augment_on device on CUDA, workers ship JPEG bytes + crop boxes and the batch is decoded
    # (nvJPEG), cropped and resized on the training device; worker: workers decode with PIL. CPU runs: worker.
    decode_on: Literal["worker", "device"] = "worker"
    # Masked image modelling (DINOv2 family, SOVE): block masks on the global crops' patch grid.
    # dinov2: int(mask_probability * G) of the G global crops of a global batch are masked, with
    # fractions stratified over [mask_ratio]; ibot: every global crop, fraction uniform in mask_ratio.
    masking: Literal["none", "dinov2", "ibot"] = "none"
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_min_block: int | None = 4  # patches; None: (min(h, w) // 3)^2 (iBOT / SOVE: 16 on 14 x 14)
    color_jitter_prob: float = 0.8
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    solarize_prob: float = 0.2  # global view 2 only
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class OptimConfig:
    """Optimizer and schedules. `batch_size` is the total over all processes."""

    name: Literal["adamw", "sgd", "lars"] = "adamw"
    batch_size: int = 1024
    lr: float = 0.0005  # per 256 images
    # linear: lr x batch/256 (DINO family); sqrt1024 (alias sqrt): lr x sqrt(batch/1024) (DINOv2); none
    lr_scaling: Literal["linear", "sqrt1024", "sqrt", "none"] = "linear"
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.9  # sgd / lars
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # gradient norm clip; 0 disables
    # per_param: each parameter tensor clipped on its own (DINO); global: one norm per top-level
    # student module (backbone, head), as DINOv2.
    clip_mode: Literal["per_param", "global"] = "per_param"
    layer_decay: float = 1.0  # layer-wise lr decay: lr x layer_decay^(L + 1 - layer id); 1 = off
    patch_embed_lr_mult: float = 1.0  # extra lr multiplier of the patch embedding (DINOv2: 0.2)
    backbone_lr_scale: float = 1.0  # lr multiplier of the student backbone's timm weights (heads: 1)
    schedule_unit: Literal["step", "epoch"] = "step"  # lr / wd cosine per iteration (DINO) or per epoch (SimSiam)
    decay_norm_and_bias: bool = False  # weight decay on biases and 1-D params too (SimSiam)


HEAD_WARMUP_EPOCHS = 1  # default train.freeze_backbone_epochs of model.init_from runs (README: measured)


@dataclass
class TrainConfig:
    """Loop, precision, reproducibility and checkpointing."""

    epochs: int = 100
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on capable GPUs, fp32 on CPU
    compile: bool = False
    seed: int = 0
    workers: int = 10  # data-loader workers per process
    checkpoint_every: int = 10  # epochs between kept checkpoints (last.safetensors every epoch)
    log_every: int = 10  # steps between metrics.jsonl lines (the only host syncs)
    # Head warm-up: the student backbone's timm weights get no update in the first N epochs (their
    # gradients are dropped, as DINO's freeze_last_layer does). None: frozen_backbone_epochs().
    freeze_backbone_epochs: int | None = None

    def frozen_backbone_epochs(self, init_from: str) -> int:
        """freeze_backbone_epochs, or by default HEAD_WARMUP_EPOCHS for a run started from weights
        (model.init_from: random heads must not train the backbone; measured in
        benchmarks/init_from.py) and 0 for a run from scratch; never the whole run."""
        if self.freeze_backbone_epochs is not None:
            return self.freeze_backbone_epochs
        return min(HEAD_WARMUP_EPOCHS, self.epochs - 1) if init_from else 0


@dataclass
class MonitorConfig:
    """Online weighted k-NN monitor of the teacher (0 = off)."""

    knn_every: int = 0  # epochs
    knn_train: str | None = None  # labeled train split; default: the built-in data's train split
    knn_val: str | None = None  # labeled val split; default: the built-in data's val split
    knn_k: int = KNN_HEADLINE_K
    knn_temperature: float = KNN_TEMPERATURE


@dataclass
class Config:
    """The whole run: one YAML document (see presets/)."""

    name: str = "custom"
    notes: str = ""
    source: SourceConfig = field(default_factory=SourceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=DINOConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: a config dict (to_dict) keyed by dotted names, leaves only."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)


# ----------------------------------------------------------------------------- presets and files


def preset_dir() -> Path:
    """The folder of shipped presets (inside the installed wheel, or presets/ in a checkout)."""
    try:
        return Path(str(resources.files("sslcli.presets")))
    except ModuleNotFoundError:  # running from a source tree that is not installed
        return Path(__file__).resolve().parents[1] / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def _preset_path(name_or_file: str) -> Path:
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file '{name_or_file}' does not exist")
        return path
    candidate = preset_dir() / f"{name_or_file}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset '{name_or_file}'{hint(name_or_file, preset_names())}"
                          " (see: ssl presets list)")
    return candidate


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`; nested mappings merge, everything else replaces.

    A layer that names another method (`method.name`) replaces the whole `method:` section:
    one method's keys mean nothing to another (`--set method.name=simsiam` on a DINO preset).
    """
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key == "method" and _switches_method(out.get(key), value):
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _switches_method(base: Any, over: Any) -> bool:
    if not isinstance(over, dict) or "name" not in over:
        return False
    current = base.get("name", "dino") if isinstance(base, dict) else "dino"
    return over["name"] != current


def load_preset_dict(name_or_file: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw dict of a preset with its `extends:` chain merged in (base first)."""
    path = _preset_path(name_or_file)
    if str(path) in _seen:
        raise ConfigError(f"preset '{name_or_file}' extends itself (cycle: {' -> '.join(_seen)})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"'extends' in '{path}' must be a preset name or file")
    if not Path(parent).is_absolute() and (path.parent / parent).is_file():
        parent = str(path.parent / parent)
    merged = deep_merge(load_preset_dict(parent, _seen + (str(path),)), data)
    if "source" in data:  # a row's provenance is its own: never inherit reported numbers
        merged["source"] = copy.deepcopy(data["source"])
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """'a.b=value' -> {'a': {'b': <value parsed as YAML>}}."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key (e.g. optim.lr=0.001), got '{text}'")
    parts = key.split(".")
    if len(parts) > MAX_YAML_DEPTH:
        raise ConfigError(f"--set key '{key[:80]}...' nests deeper than {MAX_YAML_DEPTH} levels")
    try:
        value = load_yaml(raw, f"--set {key}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(preset: str | None = None, config_file: str | None = None,
                overrides: list[str] | tuple[str, ...] = (), base: dict[str, Any] | None = None) -> Config:
    """Resolve a config from a preset, a config file and `--set` overrides (see module doc);
    `base` (e.g. a run's saved config as a dict) stands in for the dataclass defaults."""
    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    if preset:
        data = deep_merge(data, load_preset_dict(preset))
        data.setdefault("name", Path(preset).stem if Path(preset).suffix else preset)
    if config_file:
        extra = _read_yaml(Path(config_file))
        parent = extra.pop("extends", None)
        if parent:
            data = deep_merge(data, load_preset_dict(parent))
        data = deep_merge(data, extra)
    for text in overrides:
        data = deep_merge(data, parse_override(text))
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range and cross-field checks that types alone cannot express (then each method's `checks()` and
    `_method_checks`); the first failing one is a ConfigError naming the key and its value."""
    d, o, t = cfg.data, cfg.optim, cfg.train
    checks = (
        field_checks(cfg.model, "model.", {"drop_path_rate": (lambda v: 0 <= v < 1, "in [0, 1)")})
        + field_checks(d, "data.", {
            "global_crop_size local_crop_size std": POSITIVE, "local_crops": NON_NEGATIVE,
            "global_crops_scale local_crops_scale": UNIT_OPEN_LOW, "mask_probability": UNIT_OPEN_LOW,
            "mask_min_block": AT_LEAST_1, "color_jitter": NON_NEGATIVE,
            "color_jitter_prob grayscale_prob blur_probs solarize_prob": UNIT})
        + field_checks(o, "optim.", {
            "batch_size layer_decay": POSITIVE, "momentum": UNIT, "betas": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "lr min_lr warmup_epochs weight_decay weight_decay_end clip_grad patch_embed_lr_mult backbone_lr_scale":
                NON_NEGATIVE})
        + field_checks(t, "train.", {"log_every checkpoint_every": POSITIVE, "workers freeze_backbone_epochs": NON_NEGATIVE,
                                     "epochs": (lambda v: 0 < v <= MAX_EPOCHS, f"in 1..{MAX_EPOCHS}"),
                                     "seed": (lambda v: 0 <= v < 2**63, "in 0..2**63 - 1")})
        + field_checks(cfg.monitor, "monitor.", {"knn_every": NON_NEGATIVE, "knn_k": AT_LEAST_1,
                                                 "knn_temperature": POSITIVE})
        + field_checks(cfg.bootstrap, "bootstrap.", {"tau": NON_NEGATIVE, "window": AT_LEAST_1, "p": UNIT})
        + [(d.global_crops == 2,
            f"data.global_crops must be 2 (the teacher sees two global views), got {d.global_crops}"),
           (d.global_crops_scale[0] <= d.global_crops_scale[1],
            f"data.global_crops_scale must be [low, high] with low <= high, got {list(d.global_crops_scale)}"),
           (d.local_crops_scale[0] <= d.local_crops_scale[1],
            f"data.local_crops_scale must be [low, high] with low <= high, got {list(d.local_crops_scale)}"),
           (d.color_jitter[3] <= 0.5,
            f"data.color_jitter hue (the 4th value) must be in [0, 0.5], got {d.color_jitter[3]}"),
           (0 <= d.mask_ratio[0] <= d.mask_ratio[1] < 1,
            f"data.mask_ratio must be [low, high] with 0 <= low <= high < 1, got {list(d.mask_ratio)}"),
           (cfg.bootstrap.top_k >= 2,
            f"bootstrap.top_k must be >= 2 (self and at least one neighbour), got {cfg.bootstrap.top_k}"),
           ((t.freeze_backbone_epochs or 0) <= t.epochs,
            f"train.freeze_backbone_epochs must not exceed train.epochs ({t.epochs}), got {t.freeze_backbone_epochs}"),
           (d.decode_on == "worker" or d.augment_on == "device",
            "data.decode_on: device needs data.augment_on: device (the device crops feed the device augmentation)")]
        + cfg.method.checks() + _method_checks(cfg))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _method_checks(cfg: Config) -> list[tuple[bool, str]]:
    """What the method needs of the other sections (its own ranges: `cfg.method.checks()`)."""
    m = cfg.method
    masked = isinstance(m, DINOv2Config | SimDINOv2Config) or (isinstance(m, SOVEConfig) and m.mim_weight > 0)
    policy = "ibot" if isinstance(m, SOVEConfig) else "dinov2"
    checks = [(masked == (cfg.data.masking != "none"),
               f"method {m.name} {'needs' if masked else 'takes no'} masks: set data.masking="
               f"{policy if masked else 'none'}")]
    if isinstance(m, SimSiamConfig):
        checks.append((cfg.data.local_crops == 0,
                       "method simsiam takes exactly 2 views per image: set data.local_crops=0"))
    if isinstance(m, DINOConfig | DINOv2Config):
        checks.append((m.warmup_teacher_temp_epochs <= cfg.train.epochs,
                       f"method.warmup_teacher_temp_epochs must not exceed train.epochs ({cfg.train.epochs}), "
                       f"got {m.warmup_teacher_temp_epochs}"))
    return checks
