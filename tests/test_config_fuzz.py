"""Fault injection on the config path: seeded `--set` fuzzing of `ssl pretrain --dry-run`, hostile YAML.

Every fuzz case is generated from the config dataclasses themselves (Config and each class of
METHOD_CONFIGS), so a new key is fuzzed without touching this file: a value of the wrong type for
every key, NaN / inf for every float, a typo of a real key, random unknown keys, out-of-range values,
each method's keys under `method.name=<method>`, and `model.*` values timm rejects. Every case is
invalid: it must exit 2 with exactly one `error: ...` line on stderr naming the culprit, nothing on
stdout and no traceback. A handful of valid overrides must exit 0, so the harness tells them apart.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import string
import time
import tracemalloc
import traceback
import types
import typing
from typing import Any, Literal

import pytest
import typer.testing
from typer.testing import CliRunner

import sslcli.train.pretrain
from sslcli.cli.app import app
from sslcli.config import METHOD_CONFIGS, Config

SEED = 1234
runner = CliRunner()

# Overrides that make `method.name=<name>` valid on the demo preset (the layer naming another method
# replaces the whole method section; some methods need masks or exactly two views).
METHOD_BASES = {
    "dino": [],
    "simdino": ["method.name=simdino"],
    # DINOv2's default teacher-temperature warm-up (30 epochs) is longer than the demo's 20 epochs
    "dinov2": ["method.name=dinov2", "data.masking=dinov2", "method.warmup_teacher_temp_epochs=0"],
    "simdinov2": ["method.name=simdinov2", "data.masking=dinov2"],
    "simsiam": ["method.name=simsiam", "data.local_crops=0"],
    "sove": ["method.name=sove", "data.masking=ibot"],
}

# Out-of-range values (YAML) of the demo preset's keys: each must be refused by `validate`.
RANGES = {
    "optim.batch_size": ["0", "-64"], "optim.lr": ["-0.001"], "optim.min_lr": ["-1.0e-6"],
    "optim.warmup_epochs": ["-1"], "optim.weight_decay": ["-0.04"], "optim.weight_decay_end": ["-0.4"],
    "optim.momentum": ["-0.1", "1.5"], "optim.betas": ["[1.0, 0.999]", "[0.9, -0.1]"],
    "optim.clip_grad": ["-3.0"], "optim.layer_decay": ["0", "-0.5"], "optim.patch_embed_lr_mult": ["-1"],
    "train.epochs": ["0", "-5", "100000"], "train.log_every": ["0"], "train.checkpoint_every": ["0", "-1"],
    "train.workers": ["-1"], "train.seed": ["-1", str(2**64)],
    "bootstrap.tau": ["-0.1", "-1.0e-9"], "bootstrap.window": ["0", "-2"], "bootstrap.top_k": ["1", "0"],
    "bootstrap.p": ["-0.5", "1.5"],
    "data.global_crops": ["1", "3"], "data.local_crops": ["-1"],
    "data.global_crop_size": ["0", "-224"], "data.local_crop_size": ["0", "-96"],
    "data.global_crops_scale": ["[0.0, 1.0]", "[0.4, 1.5]", "[1.0, 0.4]", "[-0.1, 0.5]"],
    "data.local_crops_scale": ["[0.4, 0.05]", "[0.05, 2]", "[0, 0.4]"],
    "data.mask_probability": ["0", "1.5"], "data.mask_ratio": ["[0.5, 0.1]", "[0.1, 1.0]", "[-0.1, 0.5]"],
    "data.mask_min_block": ["0", "-4"],
    "data.color_jitter_prob": ["1.1", "-0.2"], "data.grayscale_prob": ["2"], "data.solarize_prob": ["-0.01"],
    "data.blur_probs": ["[1.0, 0.1, 1.5]", "[-1, 0.1, 0.5]"],
    "data.color_jitter": ["[0.4, 0.4, 0.2, 0.7]", "[-0.4, 0.4, 0.2, 0.1]"], "data.std": ["[0.2, 0, 0.2]"],
    "model.drop_path_rate": ["-0.1", "1.0"],
    "monitor.knn_every": ["-1"], "monitor.knn_k": ["0"], "monitor.knn_temperature": ["0", "-0.07"],
}
# Out-of-range values of method keys, tried under every method that has the key (its defaults otherwise).
METHOD_RANGES = {
    "student_temp": ["0", "-0.1"], "teacher_temp": ["0", "-0.04"], "warmup_teacher_temp": ["0"],
    "center_momentum": ["-0.1", "1.1"], "momentum_teacher": ["-0.5", "1.5"], "momentum_teacher_end": ["1.01", "-0.1"],
    "out_dim": ["0", "-1"], "hidden_dim": ["0"], "bottleneck_dim": ["-1"], "head_layers": ["0"], "pred_dim": ["0"],
    "ibot_out_dim": ["0"], "warmup_teacher_temp_epochs": ["-1", "33"], "freeze_last_layer": ["-1"],
    "eps2": ["0", "-0.05"], "gamma": ["-1"], "dino_weight": ["-1"], "ibot_weight": ["-1"], "koleo_weight": ["-0.1"],
    "patch_weight": ["-1"], "cls_weight": ["-1"], "mim_weight": ["-1"], "anchor_weight": ["0", "1.5"],
    "cls_anchors": ["0", "65536"], "judges": ["-1", "60000"], "patch_anchors": ["0", "9000"],
    "cls_tasks": ["0"], "patch_tasks": ["0"], "cls_memory": ["8192"], "patch_memory": ["100"],
}
# (override, what the error line must name): backbones timm cannot build (on the meta device).
MODEL_CASES = [
    ("model.kwargs.depth=-1", "model.kwargs"), ("model.kwargs.embed_dim=97", "model.kwargs"),
    ("model.kwargs.num_heads=0", "model.kwargs"), ("model.kwargs.patch_size=0", "model.kwargs"),
    ("model.kwargs.img_size=-1", "model.kwargs"), ("model.kwargs.mlp_ratio=-1", "model.kwargs"),
    ("model.kwargs.global_pool=zzz", "model.kwargs"), ("model.kwargs.act_layer=nope", "model.kwargs"),
    ("model.kwargs.num_classes=10", "model.kwargs"), ("model.kwargs.qkv_bais=true", "model.kwargs"),
    ("model.arch=vit_smal_patch16_224", "model.arch"), ("model.arch=resnet5000", "model.arch"),
    ("model.arch=not-a-model", "model.arch"), ("data.path=/no/such/folder", "/no/such/folder"),
    ("data.path=builtin:nope", "builtin:nope"),
]
# Valid overrides (some on the boundary of a range check): each must exit 0.
VALID = [[], ["optim.lr=1e-3", "train.epochs=1"],
         ["data.global_crops_scale=[1, 1]", "data.local_crops_scale=[0.05, 0.05]"],
         ["bootstrap.tau=0", "optim.clip_grad=0", "optim.momentum=1", "optim.weight_decay=0"],
         ["model.kwargs={depth: 2}", "data.local_crops=0", "data.mask_min_block=null"],
         ["method.momentum_teacher=1", "method.center_momentum=0", "data.color_jitter=[0, 0, 0, 0.5]"],
         ["method.name=simdino", "method.gamma=null", "method.eps2=1e-9"]] + [b for b in METHOD_BASES.values() if b]


@dataclasses.dataclass
class Case:
    overrides: list[str]  # the base overrides of a method, then the fuzzed one
    expect: str  # a fragment the error line must contain (the culprit key)
    kind: str


# ----------------------------------------------------------------------------- generation


def leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, annotation) of every non-section field; the `method:` union is walked per method."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, f"{prefix}{f.name}.")
        elif not all(map(dataclasses.is_dataclass, typing.get_args(tp) or (None,))):
            out.append((f"{prefix}{f.name}", tp))
    return out


def sections(cls: type = Config, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    return [s for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
            for s in [f"{prefix}{f.name}"] + sections(hints[f.name], f"{prefix}{f.name}.")]


def typo(rng: random.Random, word: str, taken: set[str]) -> str:
    """A one-edit misspelling of `word` that is not in `taken` (and stays a plain key)."""
    letters = string.ascii_lowercase
    while True:
        i, op = rng.randrange(len(word)), rng.choice("dsir")
        if op == "d" and len(word) > 2:
            cand = word[:i] + word[i + 1:]
        elif op == "s" and i + 1 < len(word):
            cand = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif op == "i":
            cand = word[:i] + rng.choice(letters) + word[i:]
        else:
            cand = word[:i] + rng.choice(letters) + word[i + 1:]
        if cand != word and cand not in taken and cand not in ("null", "true", "false", "yes", "no", "on", "off"):
            return cand


def random_word(rng: random.Random, taken: set[str] = frozenset()) -> str:
    while True:
        word = rng.choice(string.ascii_lowercase) + "".join(rng.choices(string.ascii_lowercase + "_0123456789",
                                                                        k=rng.randint(3, 9)))
        if word not in taken:
            return word


def optional_inner(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(tp))
    return tp, False


def wrong_values(tp: Any, rng: random.Random) -> list[str]:
    """YAML texts whose value can never be coerced to `tp`."""
    tp, optional = optional_inner(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        values = [typo(rng, rng.choice(args), set(args)), random_word(rng), "5", "[x]", "{a: 1}", "true"]
    elif origin is tuple:
        n = len(args)
        values = ["0.5", f"[{', '.join(['0.5'] * (n + 1))}]", f"[{', '.join(['abc'] * n)}]", "{a: 1}",
                  f"[{', '.join(['.nan'] * n)}]", f"[{', '.join(['[0.5]'] * n)}]"] + (["[0.5]"] if n > 1 else [])
    elif origin is dict:
        values = ["[1, 2]", "5", "abc", "true"] + (["{a: abc}", "{a: .inf}", "{a: [1]}"] if args[1] is float else [])
    elif tp is int:
        values = ["abc", "1.5", "true", "[1, 2]", "{a: 1}", "'12'", "1e3", "0x1p3"]
    elif tp is float:
        values = ["abc", "true", "[0.1]", "{a: 1.0}", "nan", "'0.5x'", "1/2"]
    elif tp is str:
        values = ["5", "1.5", "true", "[a, b]", "{a: b}"]
    elif tp is bool:
        values = ["maybe", "2", "0.5", "[true]", "{a: 1}", "'true'"]
    else:
        raise AssertionError(f"no wrong values for {tp}: teach wrong_values the new type")
    return values + ([] if optional else ["null", ""])


def non_finite(rng: random.Random) -> str:
    return rng.choice([".nan", ".NaN", ".inf", "-.inf", "+.inf", "1e400", "-1.0e+999"])


def generate(rng: random.Random) -> list[Case]:
    cases: list[Case] = []
    # (prefix of keys, base overrides, leaves): the root config, then each method under its base
    groups = [("", [], [(k, t) for k, t in leaves(Config)])]
    groups += [("method.", METHOD_BASES[name], [(k, t) for k, t in leaves(cls, "method.") if k != "method.name"])
               for name, cls in METHOD_CONFIGS.items()]
    for _, base, group in groups:
        names = {k for k, _ in group}
        for key, tp in group:  # wrong types, every key
            cases.append(Case(base + [f"{key}={rng.choice(wrong_values(tp, rng))}"], key, "type"))
            if optional_inner(tp)[0] is float:  # NaN / inf, every float key
                cases.append(Case(base + [f"{key}={non_finite(rng)}"], key, "non-finite"))
        for _ in range(3):  # typos of real keys, at their own level
            key = rng.choice(sorted(names))
            head, _, last = key.rpartition(".")
            siblings = {k.rpartition(".")[2] for k in names | set(sections()) if k.rpartition(".")[0] == head}
            bad = f"{head}.{typo(rng, last, siblings)}" if head else typo(rng, last, siblings)
            cases.append(Case(base + [f"{bad}={rng.choice(['1', '0.5', 'x', '[1]'])}"], bad, "unknown"))
    for name, cls in METHOD_CONFIGS.items():  # another method's key under this one
        own = {f.name for f in dataclasses.fields(cls)}
        foreign = sorted({f.name for c in METHOD_CONFIGS.values() for f in dataclasses.fields(c)} - own)
        if foreign:
            key = f"method.{rng.choice(foreign)}"
            cases.append(Case(METHOD_BASES[name] + [f"{key}=1"], key, "unknown"))
        cases.append(Case([f"method.name={typo(rng, name, set(METHOD_CONFIGS))}"], "method.name", "type"))
        for field, values in METHOD_RANGES.items():  # one of the values per method (all: RANGES)
            if field in own:
                cases.append(Case(METHOD_BASES[name] + [f"method.{field}={rng.choice(values)}"], field, "range"))
    all_sections = sections()
    every_name = {part for k, _ in leaves(Config) for part in k.split(".")}
    for _ in range(4):  # random keys: top level, in a section, below a section, under a leaf
        word = random_word(rng, every_name)
        cases.append(Case([f"{word}={rng.choice(['1', 'x', '{a: 1}'])}"], word, "unknown"))
        section = rng.choice(all_sections)
        cases.append(Case([f"{section}.{word}=1"], f"{section}.{word}", "unknown"))
        cases.append(Case([f"{section}.{word}.{random_word(rng)}=1"], f"{section}.{word}", "unknown"))
        key, _ = rng.choice([(k, t) for k, t in leaves(Config) if typing.get_origin(optional_inner(t)[0]) is not dict])
        cases.append(Case([f"{key}.{word}=1"], key, "unknown"))
    for key, values in RANGES.items():
        cases += [Case([f"{key}={v}"], key, "range") for v in values]
    cases += [Case([override], expect, "model") for override, expect in MODEL_CASES]
    return cases


# ----------------------------------------------------------------------------- running


_open_dataset_once = functools.cache(sslcli.train.pretrain.open_dataset)  # errors are not cached


@pytest.fixture(autouse=True)
def _speed_up(monkeypatch):
    """Keep a few hundred dry runs fast: builtin:shapes renders 2,000 images per open (0.5 s), so the
    runs share one; typer rebuilds the click command of the whole app per invoke (half of a case's
    time), so it is built once when this typer version has that hook."""
    monkeypatch.setattr(sslcli.train.pretrain, "open_dataset", _open_dataset_once)
    if callable(getattr(typer.testing, "_get_command", None)):
        monkeypatch.setattr(typer.testing, "_get_command", functools.cache(typer.testing._get_command))


def dry_run(*args: str):
    return runner.invoke(app, ["pretrain", "--preset", "demo", "--dry-run", *args])


def set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def problem(result, expect: str | None = None) -> str | None:
    """Why `result` is not a one-line input error (exit 2) naming `expect`; None when it is."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "raised " + "".join(traceback.format_exception(*result.exc_info))[-1500:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.exit_code != 2:
        return f"exit {result.exit_code}: {result.stderr[-500:]}"
    if "Traceback" in result.output:
        return f"traceback: {result.output[-1500:]}"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"not one 'error:' line: {lines}"
    if result.stdout.strip():
        return f"stdout not empty: {result.stdout[:200]}"
    if expect and expect not in lines[0]:
        return f"error does not name '{expect}': {lines[0]}"
    return None


def test_generation_is_deterministic_and_covers_every_key():
    first, again = generate(random.Random(SEED)), generate(random.Random(SEED))
    assert [c.overrides for c in first] == [c.overrides for c in again]
    typed = {c.overrides[-1].partition("=")[0] for c in first if c.kind == "type"}
    assert {k for k, _ in leaves(Config)} <= typed
    every_method_key = {k for cls in METHOD_CONFIGS.values() for k, _ in leaves(cls, "method.")} - {"method.name"}
    assert every_method_key <= typed
    assert set(METHOD_BASES) == set(METHOD_CONFIGS), "give the new method its base overrides in METHOD_BASES"
    known = {k for k, _ in leaves(Config)}
    assert set(RANGES) <= known, sorted(set(RANGES) - known)  # the table names real keys
    method_fields = {f.name for cls in METHOD_CONFIGS.values() for f in dataclasses.fields(cls)}
    assert set(METHOD_RANGES) <= method_fields, sorted(set(METHOD_RANGES) - method_fields)
    assert 300 <= len(first) <= 400


def test_fuzzed_overrides_exit_2_with_one_line():
    cases = generate(random.Random(SEED))
    started, failures = time.perf_counter(), []
    for case in cases:
        result = dry_run(*set_args(case.overrides))
        why = problem(result, case.expect)
        if why:
            failures.append(f"[{case.kind}] --set {' --set '.join(case.overrides)}\n    {why}")
    elapsed = time.perf_counter() - started
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:25])
    assert elapsed < 60, f"{len(cases)} cases took {elapsed:.0f} s"


@pytest.mark.parametrize("overrides", VALID, ids=lambda o: " ".join(o) or "demo")
def test_valid_overrides_exit_0(overrides):
    result = dry_run(*set_args(overrides))
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "name: demo" in result.stdout


# ----------------------------------------------------------------------------- hostile YAML


BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))  # 9**9 values


def write_big_yaml(path, mib: int = 50) -> None:
    chunk = "".join(f"key{i}: {i}\n" for i in range(20_000)).encode()
    with open(path, "wb") as f:
        while f.tell() < mib * 2**20:
            f.write(chunk)


@pytest.mark.parametrize("flag", ["--config", "--preset"])
def test_huge_yaml_file_is_refused_before_reading(tmp_path, flag):
    big = tmp_path / "big.yaml"
    write_big_yaml(big)
    args = ["pretrain", flag, str(big), "--dry-run"] + (["--preset", "demo"] if flag == "--config" else [])
    started = time.perf_counter()
    result = runner.invoke(app, args)
    assert time.perf_counter() - started < 2
    assert problem(result, str(big)) is None, problem(result, str(big))
    assert "too large" in result.stderr and "MiB" in result.stderr


@pytest.mark.parametrize("where", ["--config", "--preset", "--set"])
def test_billion_laughs_is_refused_without_expanding(tmp_path, where):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    if where == "--set":
        inline = "{" + BILLION_LAUGHS.replace("\n", ", ") + "}"
        args = ["pretrain", "--preset", "demo", "--dry-run", "--set", f"notes={inline}"]
    else:
        args = ["pretrain", where, str(bomb), "--dry-run"] + (["--preset", "demo"] if where == "--config" else [])
    started = time.perf_counter()
    result = runner.invoke(app, args)
    assert time.perf_counter() - started < 1
    tracemalloc.start()  # again, measured: expanding 9**9 values would take gigabytes
    try:
        again = runner.invoke(app, args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert again.stderr == result.stderr
    assert problem(result, "alias") is None, problem(result, "alias")


@pytest.mark.parametrize("text, fragment", [
    ("a: &a [*a]\n", "alias inside its own anchor"),
    ("notes: " + "[" * 200 + "]" * 200 + "\n", "nests deeper"),
    ("a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 100)), "nests deeper"),
    ("optim: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
])
def test_other_hostile_yaml_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["pretrain", "--preset", "demo", "--config", str(path), "--dry-run"])
    assert problem(result, fragment) is None, problem(result, fragment)


def test_binary_file_is_one_line(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(app, ["pretrain", "--preset", "demo", "--config", str(path), "--dry-run"])
    assert problem(result, "UTF-8") is None, problem(result, "UTF-8")


def test_normal_anchors_and_aliases_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("optim: &opt {lr: 0.001, weight_decay: 0.05, weight_decay_end: 0.05}\n"
                    "data:\n  global_crops_scale: &scale [0.5, 1.0]\n  local_crops_scale: [0.1, 0.5]\n"
                    "monitor: {<<: {knn_every: 0, knn_k: 10}, knn_k: 5}\n")
    result = runner.invoke(app, ["pretrain", "--preset", "demo", "--config", str(path), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "weight_decay: 0.05" in result.stdout and "knn_k: 5" in result.stdout
    assert "global_crops_scale: [0.5, 1.0]" in result.stdout


def test_suite_file_uses_the_guarded_reader(tmp_path):
    from sslcli.errors import ConfigError
    from sslcli.eval.suite import read_suite

    bomb = tmp_path / "suite.yaml"
    bomb.write_text(BILLION_LAUGHS + "evals: [{task: knn}]\n")
    with pytest.raises(ConfigError, match="suite file .* alias"):
        read_suite(bomb)
    big = tmp_path / "big-suite.yaml"
    write_big_yaml(big, mib=2)
    with pytest.raises(ConfigError, match="suite file .* too large"):
        read_suite(big)
