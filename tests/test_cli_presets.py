"""`ssl presets list`: the default view fits an 80-column terminal, --wide keeps the long text."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.cli.presets import short_arch, short_reported
from sslcli.config import load_config, preset_names

runner = CliRunner()


def list_output(*extra: str, columns: int = 80) -> str:
    result = runner.invoke(app, ["presets", "list", *extra], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_compact_view_fits_80_columns_with_every_name_intact():
    out = list_output()
    lines = out.splitlines()
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, too_long
    first_words = [line.split()[0] for line in lines if line.split()]
    for name in preset_names():
        assert first_words.count(name) == 1, f"'{name}' is not intact on one line"
    header = next(line for line in lines if line.split()[:1] == ["name"])
    for column in ("method", "arch", "reported"):  # no column folded into one letter per line
        assert column in header.split(), header
    row = next(line for line in lines if line.split()[:1] == ["dino-vits16"])
    assert row.split()[1:] == ["dino", "ViT-S/16", "800", "knn", "74.5", "lin", "77.0"]


def test_wide_view_has_paper_table_row_and_crops():
    out = list_output("--wide")
    for name in ("adasim-dino2-rn50", "dino-vits16-mc2x224-6x96"):
        cfg = load_config(name)
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert cfg.source.row in line and cfg.model.arch in line, line
        assert f" {cfg.source.table} " in line and cfg.source.paper.split(" (")[0] in line
    assert "2x224+6x96" in out


def test_json_is_unchanged_by_the_views():
    rows = json.loads(list_output("--json"))
    assert [r["name"] for r in rows] == preset_names()
    assert set(rows[0]) == {"name", "method", "bootstrap", "arch", "epochs", "crops", "paper", "table",
                            "row", "reported"}


def test_short_cells():
    assert short_arch("vit_small_patch16_224", {}) == "ViT-S/16"
    assert short_arch("vit_base_patch8_224", {}) == "ViT-B/8"
    assert short_arch("resnet50", {"zero_init_last": False}) == "RN50"
    assert short_arch("vit_small_patch16_224", {"depth": 3}) == "ViT-S/16*"
    assert short_arch("swin_tiny_patch4_window7_224", {}) == "Swin-T/4w7"
    assert short_arch("convnext_tiny", {}) == "convnext_tiny"  # anything else: the timm name
    assert short_reported({}) == "-"
    assert short_reported({"knn": 74.5, "linear": 77.0}) == "knn 74.5 lin 77.0"
    assert short_reported({"linear": 74.5, "time_h": 51.0, "mem_gb": 10.5}) == "lin 74.5 +2"
    assert short_reported({"converged": 0.0}) == "converged 0.0"
