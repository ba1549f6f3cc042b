import pytest

from sslcli.config import Config, from_dict, load_config, parse_override, preset_names, to_yaml
from sslcli.errors import ConfigError


def test_defaults_and_overrides_are_typed():
    cfg = load_config("demo", overrides=["optim.lr=1e-3", "train.epochs=3", "data.global_crops_scale=[0.3, 1]",
                                         "model.kwargs={depth: 2}", "monitor.knn_train=/data/x"])
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3
    assert cfg.data.global_crops_scale == (0.3, 1.0)
    assert cfg.model.kwargs["depth"] == 2 and cfg.model.kwargs["embed_dim"] == 96  # mappings merge
    assert cfg.monitor.knn_train == "/data/x"


def test_int_accepted_for_float_but_not_the_reverse():
    assert load_config("demo", overrides=["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"'train.epochs' must be int"):
        load_config("demo", overrides=["train.epochs=1.5"])


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", r"unknown config key 'optim.lrr' \(did you mean: optim.lr"),
    ("optimm.lr=0.1", r"unknown config key 'optimm' \(did you mean: optim"),
    ("train.epochs=many", r"'train.epochs' must be int, got 'many'"),
    ("optim.name=adam", r"'optim.name' must be one of adamw, sgd, lars, got 'adam' \(did you mean: adamw"),
    ("train.compile=maybe", r"'train.compile' must be bool"),
    ("data.global_crops_scale=[0.4]", r"list of 2 values"),
    ("train.epochs", r"--set expects KEY=VALUE"),
    ("data.global_crops=3", r"global_crops must be 2"),
])
def test_config_errors_name_the_culprit(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides=[override])


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown preset 'dino-vits61'.*dino-vits16"):
        load_config("dino-vits61")


def test_config_file_and_extends(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("extends: demo\noptim: {lr: 0.5}\nsource: {paper: mine}\n")
    cfg = load_config(str(base))
    assert cfg.optim.lr == 0.5 and cfg.optim.batch_size == 64  # the rest comes from demo
    assert cfg.source.paper == "mine" and cfg.source.row == ""  # source is never inherited
    extra = tmp_path / "extra.yaml"
    extra.write_text("train: {epochs: 7}\n")
    assert load_config("demo", config_file=str(extra)).train.epochs == 7
    cyclic = tmp_path / "a.yaml"
    cyclic.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(cyclic))


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("demo", overrides=["optim.lr=0.002"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(config_file=str(path)) == cfg


def test_parse_override_nests():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("name=x=y") == {"name": "x=y"}


def test_from_dict_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="section 'optim' must be a mapping"):
        from_dict(Config, {"optim": 3})


def test_demo_is_shipped():
    assert "demo" in preset_names()


def test_method_section_is_the_chosen_methods_own():
    from sslcli.config import DINOConfig, SimSiamConfig

    dino = load_config("demo")
    assert isinstance(dino.method, DINOConfig) and dino.method.teacher_temp == 0.03
    # a layer naming another method replaces the section: DINO's keys do not leak into SimSiam
    switched = load_config("demo", overrides=["method.name=simsiam", "method.pred_dim=64", "data.local_crops=0"])
    assert isinstance(switched.method, SimSiamConfig) and switched.method.pred_dim == 64
    assert "teacher_temp" not in to_yaml(switched)
    assert switched.method.out_dim == SimSiamConfig().out_dim  # SimSiam's default, not the demo's 256
    with pytest.raises(ConfigError, match=r"'method.name' must be one of dino, simsiam, simdino, dinov2, simdinov2, sove, got 'simsam' "
                                          r"\(did you mean: simsiam\?\)"):
        load_config("demo", overrides=["method.name=simsam"])
    with pytest.raises(ConfigError, match="'method.pred_dim' with method.name dino"):
        load_config("demo", overrides=["method.pred_dim=8"])
    # the resolved YAML of either method loads back to the same config
    assert from_dict(Config, __import__("yaml").safe_load(to_yaml(switched))) == switched
