"""Shipped presets: every one resolves, is labelled with its paper row, and carries the paper's values.

No model is built here (that is another test file's job); these tests only read YAML.
"""

from __future__ import annotations

import math

import pytest
import yaml

from sslcli.config import Config, load_config, load_preset_dict, preset_dir, preset_names, to_dict

PAPER_PRESETS = [
    "dino-vits16", "dino-vits8", "dino-vitb16", "dino-vitb8", "dino-rn50",
    "dino2-rn50", "dino2-vits16", "dino2-vitb16",
    "dino-vitb16-100ep",
    "dino-vits16-mc2x224", "dino-vits16-mc2x224-2x96", "dino-vits16-mc2x224-6x96",
    "dino-vits16-mc2x224-10x96",
    "simsiam-rn50", "nn-simsiam-rn50", "adasim-simsiam-rn50",
    "nn-dino2-rn50", "adasim-dino2-rn50", "nn-dino2-vits16", "adasim-dino2-vits16",
    "nn-dino2-vitb16", "adasim-dino2-vitb16",
    "oracle-dino2-vits16-p0", "oracle-dino2-vits16-p0.5",
    "simdino-vitb16", "simdino-vitl16", "dino-vitl16-100ep", "simdino-vits16", "simdino-vits16-nosd",
    "dino-vits16-nosd", "simdino-vitb16-200ep", "dino-vitb16-200ep",
    "dinov2-vitb16", "dinov2-vitl16", "simdinov2-vitb16", "simdinov2-vitl16",
    "sove-vits16", "sove-vitb16", "sove-vitl16", "sove-swint",
]


# Presets whose recipe has no published result: `source.reported` is `{}` and the notes say why.
NO_PUBLISHED_NUMBER = {"dino-rn50", "dino-vitl16-100ep", "dino-vits16-nosd"}


def raw(name: str) -> dict:
    """The preset file itself, without its `extends:` chain."""
    return yaml.safe_load((preset_dir() / f"{name}.yaml").read_text())


# ----------------------------------------------------------------------------- every preset


def test_listed_presets_exist():
    missing = sorted(set(PAPER_PRESETS) - set(preset_names()))
    assert not missing, f"presets missing from {preset_dir()}: {missing}"


def test_preset_files_have_lowercase_dash_names():
    for name in preset_names():
        assert name == name.lower() and "_" not in name and " " not in name, name


@pytest.mark.parametrize("name", preset_names())
def test_preset_resolves_and_is_labelled(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.name == name
    src = cfg.source
    assert src.paper.strip() and src.table.strip() and src.row.strip(), name
    if name in NO_PUBLISHED_NUMBER:
        assert src.reported == {}, name
        assert "not claimed" in cfg.notes, f"{name}: notes must say why no number is claimed"
    else:
        assert src.reported, f"{name}: source.reported is empty"
    for key, value in src.reported.items():
        assert isinstance(value, float) and math.isfinite(value), (name, key, value)
    assert isinstance(cfg.notes, str) and cfg.notes.strip(), f"{name}: notes missing"


@pytest.mark.parametrize("name", preset_names())
def test_preset_does_not_inherit_its_label(name):
    """name, source and notes describe one paper row, so each file writes its own.

    Presets deep-merge along `extends:`, so a child that forgot a metric would silently carry
    its parent's number (e.g. the k-NN of another row). The merged `reported` must be exactly
    what the file itself writes.
    """
    data = raw(name)
    assert data.get("name") == name
    assert isinstance(data.get("notes"), str) and data["notes"].strip()
    own = data.get("source", {}).get("reported", {})
    assert set(load_preset_dict(name)["source"]["reported"]) == set(own), name


@pytest.mark.parametrize("name", preset_names())
def test_preset_round_trips_through_resolved_yaml(name, tmp_path):
    """The run directory's config.yaml must re-load to the same config."""
    cfg = load_config(name)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert load_config(config_file=str(path)) == cfg


# ----------------------------------------------------------------------------- paper values


def test_dino_vits16_main_recipe():
    c = load_config("dino-vits16")
    assert c.model.arch == "vit_small_patch16_224"
    assert c.train.epochs == 800
    assert (c.data.global_crops, c.data.local_crops) == (2, 10)
    assert (c.data.global_crop_size, c.data.local_crop_size) == (224, 96)
    assert c.optim.name == "adamw" and c.optim.batch_size == 1024 and c.optim.lr == 0.0005
    assert c.optim.lr_scaling == "linear" and c.optim.warmup_epochs == 10
    assert (c.optim.weight_decay, c.optim.weight_decay_end) == (0.04, 0.4)
    m = c.method
    assert (m.student_temp, m.warmup_teacher_temp, m.teacher_temp) == (0.1, 0.04, 0.07)
    assert m.warmup_teacher_temp_epochs == 30
    assert (m.momentum_teacher, m.momentum_teacher_end, m.center_momentum) == (0.996, 1.0, 0.9)
    assert m.out_dim == 65536 and m.bottleneck_dim == 256 and m.hidden_dim == 2048
    assert c.source.reported == {"knn": 74.5, "linear": 77.0}


@pytest.mark.parametrize("name, arch, epochs, knn, linear", [
    ("dino-vits8", "vit_small_patch8_224", 800, 78.3, 79.7),
    ("dino-vitb16", "vit_base_patch16_224", 400, 76.1, 78.2),
    ("dino-vitb8", "vit_base_patch8_224", 300, 77.4, 80.1),
])
def test_dino_table2_rows(name, arch, epochs, knn, linear):
    c = load_config(name)
    assert c.model.arch == arch and c.train.epochs == epochs
    assert c.data.local_crops == 10
    assert c.source.table == "2" and c.source.reported == {"knn": knn, "linear": linear}


def test_vit_base_keeps_last_layer_normalised():
    # DINO's README / SimDINO Table 5: norm_last_layer false diverges for ViT-B.
    for name in ("dino-vitb16", "dino-vitb8", "dino2-vitb16", "dino-vitb16-100ep"):
        assert load_config(name).method.norm_last_layer is True, name
    assert load_config("dino-vits16").method.norm_last_layer is False


def test_dino_rn50_sgd_recipe():
    """The authors' README RN50 command, with main_dino.py's defaults for what it does not pass."""
    c = load_config("dino-rn50")
    assert c.model.arch == "resnet50" and c.model.drop_path_rate == 0.0
    assert c.model.kwargs == {"zero_init_last": False}  # torchvision init, as the DINO code
    assert c.optim.name == "sgd" and c.optim.lr == 0.03 and c.optim.momentum == 0.9
    assert c.optim.lr_scaling == "linear" and c.optim.batch_size == 512  # 8 GPUs x 64
    assert c.optim.weight_decay == c.optim.weight_decay_end == 1e-4
    assert (c.optim.min_lr, c.optim.warmup_epochs, c.optim.clip_grad) == (1e-6, 10, 3.0)
    assert c.data.global_crops_scale == (0.14, 1.0)
    assert c.data.local_crops_scale == (0.05, 0.14)
    assert (c.data.global_crops, c.data.local_crops) == (2, 8)
    assert (c.data.global_crop_size, c.data.local_crop_size) == (224, 96)
    m = c.method
    assert (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (0.04, 0.04, 0)
    assert m.norm_last_layer is True and m.use_bn_in_head is False and m.freeze_last_layer == 1
    assert (m.momentum_teacher, m.out_dim, m.student_temp) == (0.996, 65536, 0.1)
    assert c.train.epochs == 100 and c.train.seed == 0
    assert c.source.table == "2" and c.source.reported == {}


@pytest.mark.parametrize("name, arch, epochs, knn, linear", [
    ("dino2-rn50", "resnet50", 100, 50.2, 60.0),
    ("dino2-vits16", "vit_small_patch16_224", 800, 68.4, 71.9),
    ("dino2-vitb16", "vit_base_patch16_224", 800, 69.2, 73.5),
])
def test_adasim_dino2_baselines(name, arch, epochs, knn, linear):
    c = load_config(name)
    assert c.data.local_crops == 0 and c.data.global_crops == 2
    assert c.model.arch == arch and c.train.epochs == epochs
    assert c.source.paper.startswith("AdaSim") and c.source.table == "2"
    assert c.source.reported == {"knn": knn, "linear": linear}
    assert c.optim.batch_size == 1024
    assert c.bootstrap.name == "none"


def test_adasim_b2_values():
    rn = load_config("dino2-rn50")
    assert rn.optim.name == "sgd" and rn.optim.lr == 0.03
    assert rn.optim.weight_decay == rn.optim.weight_decay_end == 1e-4
    assert rn.optim.min_lr == 1e-5 and rn.optim.clip_grad == 0.0
    assert rn.method.norm_last_layer is False and rn.method.teacher_temp == 0.07
    assert rn.data.global_crops_scale == (0.14, 1.0)
    s = load_config("dino2-vits16")
    assert s.optim.name == "adamw" and s.optim.lr == 0.0005 and s.optim.min_lr == 1e-5
    assert s.optim.clip_grad == 0.0 and s.method.norm_last_layer is False
    assert s.data.global_crops_scale == (0.4, 1.0)
    assert (s.method.warmup_teacher_temp, s.method.teacher_temp) == (0.04, 0.07)


def test_simdino_dino_baseline():
    c = load_config("dino-vitb16-100ep")
    assert c.source.paper.startswith("SimDINO") and c.source.table == "1"
    assert c.source.reported == {"knn": 72.9, "linear": 76.3}
    assert c.model.arch == "vit_base_patch16_224" and c.train.epochs == 100
    assert c.optim.batch_size == 512 and c.optim.lr == 0.002 and c.optim.clip_grad == 0.3
    assert c.method.freeze_last_layer == 1 and c.method.warmup_teacher_temp_epochs == 30
    assert c.data.local_crops == 10
    assert c.data.global_crops_scale == (0.4, 1.0) and c.data.local_crops_scale == (0.05, 0.4)


def test_simdino_vitb16_recipe():
    c = load_config("simdino-vitb16")
    assert c.method.name == "simdino" and c.source.table == "1"
    assert c.source.reported == {"knn": 74.9, "linear": 77.3}
    assert (c.method.out_dim, c.method.hidden_dim, c.method.eps2, c.method.gamma) == (256, 2048, 0.05, None)
    assert (c.method.covariance, c.method.expansion_input, c.method.momentum_teacher) == ("global", "mean", 0.996)
    assert c.optim.batch_size == 512 and c.optim.lr == 0.0005 and c.optim.lr_scaling == "linear"
    assert c.optim.clip_grad == 3.0 and c.optim.clip_mode == "per_param"
    assert (c.optim.weight_decay, c.optim.weight_decay_end, c.optim.warmup_epochs) == (0.04, 0.4, 10)
    assert c.model.drop_path_rate == 0.1 and c.train.epochs == 100 and c.data.local_crops == 10
    assert c.data.global_crops_scale == (0.4, 1.0) and c.data.local_crops_scale == (0.05, 0.4)


@pytest.mark.parametrize("name, arch, epochs, self_distillation, reported", [
    ("simdino-vitl16", "vit_large_patch16_224", 100, True, {"knn": 75.6, "linear": 77.4}),
    ("simdino-vits16", "vit_small_patch16_224", 100, True, {"knn": 69.7, "linear": 73.6}),
    ("simdino-vits16-nosd", "vit_small_patch16_224", 100, False, {"knn": 58.6, "linear": 68.0}),
    ("simdino-vitb16-200ep", "vit_base_patch16_224", 200, True, {"knn": 76.0, "linear": 77.7}),
    ("dino-vitb16-200ep", "vit_base_patch16_224", 200, True, {"knn": 73.6, "linear": 77.1}),
    ("dino-vitl16-100ep", "vit_large_patch16_224", 100, True, {}),
    ("dino-vits16-nosd", "vit_small_patch16_224", 100, False, {}),
])
def test_simdino_paper_rows_change_only_their_axis(name, arch, epochs, self_distillation, reported):
    c = load_config(name)
    base = load_config("simdino-vitb16" if c.method.name == "simdino" else "dino-vitb16-100ep")
    assert (c.model.arch, c.train.epochs, c.method.self_distillation) == (arch, epochs, self_distillation)
    assert c.source.reported == reported and c.source.paper.startswith("SimDINO")
    assert c.optim == base.optim and c.data == base.data
    changed = {k for k in vars(c.method) if getattr(c.method, k) != getattr(base.method, k)}
    assert changed <= {"self_distillation"}


def test_dinov2_vitb16_recipe():
    c = load_config("dinov2-vitb16")
    assert c.source.reported == {"knn": 76.0, "linear": 77.2} and c.source.table == "1"
    assert c.model.kwargs == {"reg_tokens": 4, "init_values": 1e-5} and c.model.drop_path_rate == 0.3
    assert c.model.pos_embed_resample == "antialias"
    m = c.method
    assert (m.name, m.out_dim, m.centering, m.ibot_separate_head, m.koleo_weight) == ("dinov2", 65536, "ema", False, 0.1)
    assert (m.momentum_teacher, m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (0.992, 0.04, 0.07, 30)
    o = c.optim
    assert (o.lr, o.lr_scaling, o.batch_size, o.layer_decay, o.patch_embed_lr_mult) == (0.004, "sqrt1024", 1024, 0.9, 0.2)
    assert (o.clip_grad, o.clip_mode, o.weight_decay, o.weight_decay_end) == (3.0, "global", 0.04, 0.4)
    assert (c.data.masking, c.data.mask_probability, c.data.mask_ratio, c.data.mask_min_block) == ("dinov2", 0.5, (0.1, 0.5), 4)


@pytest.mark.parametrize("name, arch, method, init_values, reported", [
    ("dinov2-vitl16", "vit_large_patch16_224", "dinov2", 1e-5, {"knn": 80.8, "linear": 82.0}),
    ("simdinov2-vitb16", "vit_base_patch16_224", "simdinov2", 0.1, {"knn": 78.1, "linear": 79.7}),
    ("simdinov2-vitl16", "vit_large_patch16_224", "simdinov2", 0.1, {"knn": 81.1, "linear": 82.4}),
])
def test_dinov2_family_rows_share_the_pipeline(name, arch, method, init_values, reported):
    c, base = load_config(name), load_config("dinov2-vitb16")
    assert (c.model.arch, c.method.name, c.model.kwargs["init_values"]) == (arch, method, init_values)
    assert c.source.reported == reported
    assert c.optim == base.optim and c.data == base.data and c.model.drop_path_rate == 0.3
    if method == "simdinov2":
        assert (c.method.out_dim, c.method.eps2, c.method.momentum_teacher, c.method.patch_weight) == (256, 0.05, 0.9, 1.0)


@pytest.mark.parametrize("name, arch, epochs, reported", [
    ("sove-vits16", "vit_small_patch16_224", 800, {"knn": 75.2, "linear": 77.8}),
    ("sove-vitb16", "vit_base_patch16_224", 400, {"knn": 78.4, "linear": 79.9}),
    ("sove-vitl16", "vit_large_patch16_224", 250, {"knn": 79.2, "linear": 81.2}),
    ("sove-swint", "swin_tiny_patch4_window7_224", 300, {"knn": 77.0, "linear": 79.3}),
])
def test_sove_table1_rows(name, arch, epochs, reported):
    """SOVE Table 1: the paper's A.1 values (8192 anchors, 9 judges, 512 patch anchors, 12 views), the
    authors' code where the paper is silent; the rows differ only in backbone and epochs (Swin: no MIM)."""
    c = load_config(name)
    assert c.source.paper.startswith("SOVE") and c.source.table == "1" and c.source.reported == reported
    assert (c.model.arch, c.train.epochs, c.model.drop_path_rate) == (arch, epochs, 0.1)
    m = c.method
    assert (m.name, m.out_dim, m.hidden_dim, m.head_layers) == ("sove", 256, 2048, 3)
    assert (m.cls_memory, m.patch_memory, m.cls_anchors, m.judges, m.patch_anchors) == (65536, 8192, 8192, 8, 512)
    assert (m.cls_tasks, m.patch_tasks, m.labels, m.anchor_selection) == (4, 1, "soft", "all")
    assert (m.student_temp, m.teacher_temp, m.anchor_weight, m.representation) == (0.1, 0.04, 0.9, "cls")
    assert (m.momentum_teacher, m.momentum_teacher_end, m.cls_weight, m.self_distillation) == (0.996, 1.0, 1.0, True)
    d = c.data
    assert (d.global_crops, d.global_crop_size, d.local_crops, d.local_crop_size) == (2, 224, 10, 96)
    assert d.global_crops_scale == (0.4, 1.0) and d.local_crops_scale == (0.05, 0.4)
    o = c.optim
    assert (o.name, o.batch_size, o.lr, o.lr_scaling, o.min_lr, o.warmup_epochs) == ("adamw", 1024, 0.0005, "linear", 1e-6, 10)
    assert (o.weight_decay, o.weight_decay_end, o.clip_grad, o.clip_mode) == (0.04, 0.4, 3.0, "per_param")
    assert c.train.precision == "auto"
    if name == "sove-swint":  # the masked forward needs a ViT: no MIM term on Swin
        assert (d.masking, m.mim_weight) == ("none", 0.0)
    else:
        assert (d.masking, d.mask_ratio, d.mask_min_block, m.mim_weight) == ("ibot", (0.3, 0.3), None, 1.0)
    mine, base = to_dict(c), to_dict(load_config("sove-vits16"))
    assert {k for k in mine if mine[k] != base[k]} <= {"name", "notes", "source", "model", "method", "data", "train"}
    assert {k for k in mine["model"] if mine["model"][k] != base["model"][k]} <= {"arch"}
    assert {k for k in mine["train"] if mine["train"][k] != base["train"][k]} <= {"epochs", "checkpoint_every"}


COMPUTE_ROWS = {  # Table 8, 300-epoch column (+ k-NN from Table 7 / appendix where printed)
    "dino-vits16-mc2x224": (0, {"linear": 72.5, "knn": 67.9, "time_h": 45.9, "mem_gb": 9.3,
                                "linear_100ep": 67.8, "time_h_100ep": 15.3}),
    "dino-vits16-mc2x224-2x96": (2, {"linear": 74.5, "time_h": 51.0, "mem_gb": 10.5,
                                     "linear_100ep": 71.5, "time_h_100ep": 17.0}),
    "dino-vits16-mc2x224-6x96": (6, {"linear": 75.9, "knn": 72.7, "time_h": 60.9, "mem_gb": 12.9,
                                     "linear_100ep": 73.8, "time_h_100ep": 20.3}),
    "dino-vits16-mc2x224-10x96": (10, {"linear": 76.1, "knn": 72.8, "time_h": 72.6,
                                       "mem_gb": 15.4, "linear_100ep": 74.6,
                                       "time_h_100ep": 24.2}),
}


@pytest.mark.parametrize("name", sorted(COMPUTE_ROWS))
def test_compute_table_rows(name):
    local, reported = COMPUTE_ROWS[name]
    c = load_config(name)
    assert c.model.arch == "vit_small_patch16_224" and c.train.epochs == 300
    assert c.data.global_crops == 2 and c.data.local_crops == local
    assert c.source.table == "8" and c.source.reported == reported


def test_compute_table_rows_differ_only_in_local_crops():
    """The four rows are one recipe; only the number of 96-px crops changes."""
    base = to_dict(load_config("dino-vits16-mc2x224-10x96"))
    for name in COMPUTE_ROWS:
        other = to_dict(load_config(name))
        diff = {k for k in base if base[k] != other[k]} - {"name", "notes", "source", "data"}
        assert not diff, (name, diff)
        data_diff = {k for k in base["data"] if base["data"][k] != other["data"][k]}
        assert data_diff <= {"local_crops"}, (name, data_diff)
    # and the recipe is dino-vits16's apart from the epochs
    vits16 = to_dict(load_config("dino-vits16"))
    for section in ("model", "method", "data", "optim"):
        assert base[section] == vits16[section], section


# ----------------------------------------------------------------------------- AdaSim Tables 1 and 2


ADASIM_TABLE2 = {  # name: (baseline preset, bootstrap (name, tau, window, top_k), reported)
    "nn-simsiam-rn50": ("simsiam-rn50", ("nn", None, 1, 10), {"knn": 56.2, "linear": 65.9}),
    "adasim-simsiam-rn50": ("simsiam-rn50", ("adasim", 0.2, 1, 10), {"knn": 57.9, "linear": 68.1}),
    "nn-dino2-rn50": ("dino2-rn50", ("nn", None, 1, 10), {"converged": 0.0}),
    "adasim-dino2-rn50": ("dino2-rn50", ("adasim", 0.2, 1, 10), {"knn": 50.7, "linear": 60.1}),
    "nn-dino2-vits16": ("dino2-vits16", ("nn", None, 1, 10), {"converged": 0.0}),
    "adasim-dino2-vits16": ("dino2-vits16", ("adasim", 0.2, 10, 3), {"knn": 70.1, "linear": 73.3}),
    "nn-dino2-vitb16": ("dino2-vitb16", ("nn", None, 1, 10), {"converged": 0.0}),
    "adasim-dino2-vitb16": ("dino2-vitb16", ("adasim", 0.2, 10, 3), {"knn": 72.7, "linear": 75.0}),
}


@pytest.mark.parametrize("name", sorted(ADASIM_TABLE2))
def test_adasim_table2_rows_differ_from_their_baseline_only_in_bootstrap(name):
    base_name, (kind, tau, window, top_k), reported = ADASIM_TABLE2[name]
    c, base = load_config(name), load_config(base_name)
    assert c.source.paper.startswith("AdaSim") and c.source.table == "2"
    assert c.source.reported == reported
    b = c.bootstrap
    assert (b.name, b.window, b.top_k) == (kind, window, top_k)
    if tau is not None:
        assert b.tau == tau
    mine, theirs = to_dict(c), to_dict(base)
    diff = {k for k in mine if mine[k] != theirs[k]} - {"name", "notes", "source", "bootstrap"}
    assert not diff, (name, diff)
    assert base.bootstrap.name == "none"


def test_simsiam_b1_recipe():
    c = load_config("simsiam-rn50")
    assert c.source.paper.startswith("AdaSim") and c.source.table == "2"
    assert c.source.reported == {"knn": 57.1, "linear": 68.0}
    assert c.method.name == "simsiam" and c.model.arch == "resnet50" and c.model.drop_path_rate == 0.0
    assert (c.method.out_dim, c.method.hidden_dim, c.method.pred_dim) == (2048, 2048, 512)
    assert c.method.fix_pred_lr is True and c.bootstrap.name == "none"
    o = c.optim
    assert (o.name, o.batch_size, o.lr, o.lr_scaling, o.momentum) == ("sgd", 512, 0.05, "linear", 0.9)
    assert o.weight_decay == o.weight_decay_end == 1e-4 and o.decay_norm_and_bias is True
    assert (o.warmup_epochs, o.min_lr, o.clip_grad, o.schedule_unit) == (0, 0.0, 0.0, "epoch")
    d = c.data
    assert (d.global_crops, d.local_crops, d.global_crop_size) == (2, 0, 224)
    assert d.global_crops_scale == (0.2, 1.0) and d.color_jitter == (0.4, 0.4, 0.4, 0.1)
    assert (d.color_jitter_prob, d.grayscale_prob, d.solarize_prob) == (0.8, 0.2, 0.0)
    assert d.blur_probs == (0.5, 0.5, 0.5) and d.path is None
    assert c.train.epochs == 100


@pytest.mark.parametrize("name, p, reported", [
    ("oracle-dino2-vits16-p0", 0.0, {"knn": 74.3, "knn_top5": 90.5, "linear": 75.8, "linear_top5": 92.7}),
    ("oracle-dino2-vits16-p0.5", 0.5, {"knn": 74.9, "knn_top5": 90.9, "linear": 76.3, "linear_top5": 93.0}),
])
def test_adasim_table1_oracle(name, p, reported):
    c = load_config(name)
    assert c.source.table == "1" and c.source.reported == reported
    assert c.bootstrap.name == "oracle" and c.bootstrap.p == p
    assert c.model.arch == "vit_small_patch16_224" and c.train.epochs == 800 and c.data.local_crops == 0
