"""The feature-graph audit: block-wise top-k graph, the three scans, and `ssl neighbors --data`.

The scans are checked on features planted by hand (clusters per true class, copies, flipped
labels), where the right answer is known exactly; the command end to end on `ssl data make audit`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.data.datasets import open_dataset
from sslcli.data.planted import make_audit_folder
from sslcli.errors import UsageError
from sslcli.eval.graph import topk_neighbors
from sslcli.feature_audit import Graph, PatchGrid, query_graph, scan_duplicates, scan_leakage, scan_other_class

runner = CliRunner()


def brute_force(queries, keys, k, exclude_self):
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    if exclude_self:
        sims.fill_diagonal_(float("-inf"))
    return sims.topk(k, dim=1)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_block_graph_equals_brute_force(exclude_self):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(97, 16, generator=g)
    queries = keys if exclude_self else torch.randn(31, 16, generator=g)
    blocks = []
    sims, ids = topk_neighbors(queries, keys, 7, exclude_self, budget=3 * 97, on_block=blocks.append)
    ref_sims, ref_ids = brute_force(queries, keys, 7, exclude_self)
    assert blocks == [3] * (queries.shape[0] // 3) + ([queries.shape[0] % 3] if queries.shape[0] % 3 else [])
    assert torch.equal(ids, ref_ids) and torch.allclose(sims, ref_sims, atol=1e-6)
    if exclude_self:
        assert not (ids == torch.arange(97)[:, None]).any()


def test_a_few_rows_equal_the_same_rows_of_the_whole_graph():
    keys = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([0, 17, 49])
    sims, ids = topk_neighbors(keys[rows], keys, 5, self_ids=rows)
    all_sims, all_ids = topk_neighbors(keys, keys, 5, exclude_self=True)
    assert torch.equal(ids, all_ids[rows]) and torch.allclose(sims, all_sims[rows])


def test_graph_refuses_bad_shapes_and_clips_k():
    with pytest.raises(UsageError, match="feature shapes do not match"):
        topk_neighbors(torch.zeros(2, 3), torch.zeros(4, 5), 1)
    sims, ids = topk_neighbors(torch.randn(4, 3), torch.randn(4, 3), 10, exclude_self=True)
    assert ids.shape == (4, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A planted audit folder (its images are read for names and labels; features are planted)."""
    return make_audit_folder(tmp_path_factory.mktemp("audit") / "data", n_train=60, n_val=20, duplicates=4,
                             flips=4, leaked=3)


def planted_graph(folder: Path, k: int = 5):
    """Features: each image a tight cluster point of its TRUE class (so flipped labels stand out);
    a planted duplicate or leak sits next to its source."""
    truth = json.loads((folder / "faults.json").read_text())
    ds = open_dataset(str(folder / "train"))
    rel = {str(Path("train") / p): i for i, p in enumerate(ds.paths)}
    true_class = {rel[f["path"]]: ds.classes.index(f["true_class"]) for f in truth["label_flips"]}
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(len(ds.classes), 32, generator=g) * 4
    labels = [true_class.get(i, int(ds.labels[i])) for i in range(len(ds))]
    feats = centres[labels] + torch.randn(len(ds), 32, generator=g)
    for a, b in truth["duplicates"]:
        feats[rel[b]] = feats[rel[a]] + 0.01 * torch.randn(32, generator=g)
    sims, ids = topk_neighbors(feats, feats, k, exclude_self=True)
    return Graph(ds, feats, sims, ids, "planted", str(folder / "train")), truth, rel


def test_planted_label_flips_and_duplicates_are_found(folder):
    graph, truth, rel = planted_graph(folder)
    flipped = {rel[f["path"]] for f in truth["label_flips"]}
    found = {r["query"] for r in scan_other_class(graph, min_disagreement=0.5)}
    assert len(found & flipped) / len(flipped) >= 0.75 and len(found & flipped) / max(len(found), 1) >= 0.75
    rows = scan_other_class(graph, min_disagreement=0.5)
    flip = next(r for r in rows if r["query"] in flipped)
    true_name = next(f["true_class"] for f in truth["label_flips"] if rel[f["path"]] == flip["query"])
    assert flip["suggested_class_name"] == true_name and flip["disagreement"] > 0.5
    pairs = {tuple(sorted((rel[a], rel[b]))) for a, b in truth["duplicates"]}
    dups = scan_duplicates(graph, threshold=0.99)
    assert {(r["a"], r["b"]) for r in dups} == pairs  # recall 1 and precision 1 on planted copies
    assert all(r["cluster"] == r["a"] for r in dups)


def test_duplicates_form_clusters_through_their_links(folder):
    graph, _, _ = planted_graph(folder)
    feats = graph.features.clone()
    feats[1] = feats[0] + 1e-3
    feats[2] = feats[1] + 1e-3  # 0 - 1 - 2 chained: one cluster
    sims, ids = topk_neighbors(feats, feats, 1, exclude_self=True)
    rows = scan_duplicates(Graph(graph.ds, feats, sims, ids, "w", "d"), threshold=0.999)
    assert {r["cluster"] for r in rows if {r["a"], r["b"]} <= {0, 1, 2}} == {0}


def test_query_lists_the_nearest_images(folder):
    graph, _, _ = planted_graph(folder)
    result = query_graph(graph, 7, top=3)
    assert [n["id"] for n in result["neighbors"]] == graph.ids[7, :3].tolist()
    assert [n["similarity"] for n in result["neighbors"]] == pytest.approx(graph.sims[7, :3].tolist())
    with pytest.raises(UsageError, match="out of range"):
        query_graph(graph, len(graph.ds))


class FixedSource:
    """A Source stand-in whose features are planted (scan_leakage embeds the second folder)."""

    def __init__(self, feats):
        self.feats = feats

    def torch_device(self):
        return torch.device("cpu")


def test_leakage_finds_the_planted_copies(folder, monkeypatch):
    graph, truth, rel = planted_graph(folder)
    val = open_dataset(str(folder / "val"))
    vrel = {str(Path("val") / p): i for i, p in enumerate(val.paths)}
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(len(val), 32, generator=g) * 4
    for leak, source in truth["leaked"]:
        feats[vrel[leak]] = graph.features[rel[source]] + 0.01 * torch.randn(32, generator=g)
    monkeypatch.setattr("sslcli.feature_audit.embed", lambda *args: (val, feats))
    rows = scan_leakage(graph, FixedSource(feats), str(folder / "val"), threshold=0.99)
    assert {(r["query"], r["neighbor"]) for r in rows} == {(vrel[a], rel[b]) for a, b in truth["leaked"]}


def test_cli_scans_a_folder_with_an_export(tiny_export, folder, tmp_path):
    """End to end with a real backbone: every scan runs, writes its file and names the planted rows' paths."""
    base = ["neighbors", "--weights", str(tiny_export), "--data", str(folder / "train"), "--workers", "0",
            "--cache", str(tmp_path / "cache")]
    dups = runner.invoke(app, base + ["--scan", "duplicates", "--threshold", "0.5", "--out", str(tmp_path / "d.csv")])
    assert dups.exit_code == 0, dups.stderr
    header = (tmp_path / "d.csv").read_text().splitlines()[0]
    assert header.startswith("cluster,a,a_class,a_class_name,a_path,b,")
    leak = runner.invoke(app, base + ["--scan", "leakage", "--against", str(folder / "val"), "--threshold", "0.5",
                                      "--json"])
    assert leak.exit_code == 0, leak.stderr
    assert all(r["similarity"] >= 0.5 for r in json.loads(leak.stdout))
    query = runner.invoke(app, base + ["--query", "3", "--top", "4", "--image", str(tmp_path / "q.png")])
    assert query.exit_code == 0, query.stderr
    assert "by cosine" in query.stdout and (tmp_path / "q.png").stat().st_size > 0
    assert max(map(len, query.stdout.splitlines())) <= 80  # readable in 80 columns (paths shortened)
    table = runner.invoke(app, base + ["--scan", "leakage", "--against", str(folder / "val"), "--threshold", "0.5"])
    lines = table.stdout.splitlines()
    assert table.exit_code == 0 and max(map(len, lines)) <= 80
    first = json.loads(leak.stdout)[0]  # ids and classes whole; the second path column makes way
    assert any(f"│ {first['query']:>5} │" in line and first["query_class_name"] in line for line in lines)
    assert "match path: --wide, --out or --json" in table.stdout
    wide = runner.invoke(app, base + ["--scan", "leakage", "--against", str(folder / "val"), "--threshold", "0.5",
                                      "--wide"])
    assert first["neighbor_path"] in wide.stdout and first["query_path"] in wide.stdout


def test_cli_refuses_inconsistent_flags(tiny_export, folder):
    base = ["neighbors", "--weights", str(tiny_export), "--data", str(folder / "train")]
    missing = runner.invoke(app, base + ["--scan", "leakage"])
    assert missing.exit_code == 2 and "--scan leakage needs --against FOLDER" in missing.stderr
    far = runner.invoke(app, base + ["--query", "100000", "--workers", "0"])
    assert far.exit_code == 2 and "query id 100000 is out of range: image ids are 0..63" in far.stderr
    window = runner.invoke(app, base + ["--scan", "not-self"])
    assert window.exit_code == 2 and "not an sslcli training checkpoint" in window.stderr


def test_patch_grid_pools_the_token_layout():
    class Tokens(torch.nn.Module):  # 4 x 4 patch tokens: token (r, c) = [r, c]
        def forward_tokens(self, x):
            r, c = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
            return None, torch.stack([r, c], -1).reshape(1, 16, 2).expand(x.shape[0], -1, -1)

    pooled = PatchGrid(Tokens(), 2)(torch.zeros(3, 3, 8, 8))  # (B, D * 2 * 2), channel-major
    assert pooled.shape == (3, 8)
    assert pooled[0].tolist() == [0.5, 0.5, 2.5, 2.5, 0.5, 2.5, 0.5, 2.5]  # row means, then column means
