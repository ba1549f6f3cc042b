"""Retrieval metrics and the restricted gnd unpickler (sslcli.eval.retrieval)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from sslcli.errors import DataError, UsageError
from sslcli.eval.retrieval import compute_map, evaluate_retrieval, load_gnd

# Two queries over a database of 8 images; rankings best first (column q of `ranks`).
RANKING_0 = [5, 2, 7, 0, 3, 1, 4, 6]
RANKING_1 = [3, 6, 1, 0, 2, 4, 5, 7]
RANKS = np.array([RANKING_0, RANKING_1]).T  # [ndb=8, nq=2]


def test_compute_map_by_hand():
    # Query 0: ok = {2, 0, 4}, junk = {5, 3}.
    #   ranking 5(junk) 2(+) 7 0(+) 3(junk) 1 4(+) 6 -> positives at 1, 3, 6; junk at 0, 4.
    #   junk before each positive: 1, 1, 2 -> adjusted ranks r = 0, 2, 4.
    #   j=0, r=0: before 1 (r = 0),  after 1/1 = 1     -> mean 1
    #   j=1, r=2: before 1/2,        after 2/3         -> mean 7/12
    #   j=2, r=4: before 2/4,        after 3/5         -> mean 11/20
    #   AP0 = (1 + 7/12 + 11/20) / 3 = (60 + 35 + 33) / 60 / 3 = 128/180 = 32/45 = 0.71111
    #   1-based adjusted ranks 1, 3, 5 (last = 5):
    #   P@1: kq = min(5, 1) = 1 -> 1/1 = 1; P@5: kq = 5 -> 3/5; P@10: kq = min(5, 10) = 5 -> 3/5.
    # Query 1: ok = {1, 7}, junk = {6}.
    #   ranking 3 6(junk) 1(+) 0 2 4 5 7(+) -> positives at 2, 7; junk at 1 -> adjusted r = 1, 6.
    #   j=0, r=1: before 0/1 = 0, after 1/2 -> mean 1/4
    #   j=1, r=6: before 1/6,     after 2/7 -> mean 19/84
    #   AP1 = (1/4 + 19/84) / 2 = (21 + 19) / 84 / 2 = 5/21 = 0.238095
    #   1-based adjusted ranks 2, 7 (last = 7):
    #   P@1: kq = 1 -> 0/1 = 0; P@5: kq = 5 -> 1/5; P@10: kq = min(7, 10) = 7 -> 2/7.
    # Query 2: no positives -> NaN, left out of the means.
    # mAP = (32/45 + 5/21) / 2 = (224 + 75) / 315 / 2 = 299/630 = 0.474603
    # mP@1 = (1 + 0) / 2 = 1/2; mP@5 = (3/5 + 1/5) / 2 = 2/5; mP@10 = (3/5 + 2/7) / 2 = 31/70.
    ranks = np.concatenate([RANKS, RANKS[:, :1]], axis=1)
    gnd = [{"ok": [2, 0, 4], "junk": [5, 3]}, {"ok": [1, 7], "junk": [6]}, {"ok": [], "junk": [1]}]
    mean_ap, aps, mpr, prs = compute_map(ranks, gnd, ks=(1, 5, 10))
    assert mean_ap == pytest.approx(299 / 630)
    assert aps[:2] == pytest.approx([32 / 45, 5 / 21])
    assert np.isnan(aps[2]) and np.isnan(prs[2]).all()
    assert mpr == pytest.approx([1 / 2, 2 / 5, 31 / 70])
    assert prs[:2] == pytest.approx(np.array([[1, 3 / 5, 3 / 5], [0, 1 / 5, 2 / 7]]))


def features_for(rankings, ndb):
    """Query features whose cosine ranking of one-hot database features is `rankings`."""
    db = torch.eye(ndb)
    queries = torch.zeros(len(rankings), ndb)
    for q, ranking in enumerate(rankings):
        for position, index in enumerate(ranking):
            queries[q, index] = ndb - position  # higher = closer
    return queries, db


GND = [
    {"easy": [2, 0], "hard": [4], "junk": [5, 3]},
    {"easy": [1], "hard": [7], "junk": [6]},
]


def test_evaluate_retrieval_protocols_by_hand():
    # Medium (ok = easy + hard, junk = junk) is exactly test_compute_map_by_hand.
    # Easy (ok = easy, junk = junk + hard):
    #   q0: ok {2, 0}, junk {5, 3, 4}: positives at 1, 3, junk before 1, 1 -> r = 0, 2
    #       AP = (1 + 7/12) / 2 = 19/24; ranks 1, 3: P@1 = 1, P@5 = P@10 = 2/3 (kq = 3).
    #   q1: ok {1}, junk {6, 7}: positive at 2, junk before 1 -> r = 1: AP = (0 + 1/2)/1/2 = 1/4;
    #       rank 2: P@1 = 0, P@5 = P@10 = 1/2 (kq = 2).
    #   mAP-E = (19/24 + 1/4) / 2 = 25/48; mP@1 = 1/2; mP@5 = mP@10 = (2/3 + 1/2) / 2 = 7/12.
    # Hard (ok = hard, junk = junk + easy):
    #   q0: ok {4}, junk {5, 3, 2, 0}: positive at 6, junk before 4 -> r = 2: AP = (0 + 1/3)/2
    #       = 1/6; rank 3: P@1 = 0, P@5 = P@10 = 1/3 (kq = 3).
    #   q1: ok {7}, junk {6, 1}: positive at 7, junk before 2 -> r = 5: AP = (0 + 1/6)/2 = 1/12;
    #       rank 6: P@1 = 0, P@5 = 0/5 = 0, P@10 = 1/6 (kq = 6).
    #   mAP-H = (1/6 + 1/12) / 2 = 1/8; mP@1 = 0; mP@5 = 1/6; mP@10 = (1/3 + 1/6) / 2 = 1/4.
    queries, db = features_for([RANKING_0, RANKING_1], 8)
    out = evaluate_retrieval(queries, db, GND)
    expected = {
        "mAP-E": 25 / 48, "mAP-M": 299 / 630, "mAP-H": 1 / 8,
        "mP@1-E": 1 / 2, "mP@5-E": 7 / 12, "mP@10-E": 7 / 12,
        "mP@1-M": 1 / 2, "mP@5-M": 2 / 5, "mP@10-M": 31 / 70,
        "mP@1-H": 0.0, "mP@5-H": 1 / 6, "mP@10-H": 1 / 4,
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(100 * value), key


def test_protocol_without_any_positive_reports_none():
    queries, db = features_for([RANKING_0, RANKING_1], 8)
    gnd = [dict(g, hard=[]) for g in GND]
    out = evaluate_retrieval(queries, db, gnd)
    assert out["mAP-H"] is None and out["mP@5-H"] is None
    assert out["mAP-E"] == pytest.approx(out["mAP-M"])


def reference_compute_map(ranks, gnd, kappas):
    """revisitop's loop as docs/evals.md describes it (junk counted with a walking pointer)."""
    aps, prs = [], []
    for i, g in enumerate(gnd):
        ok, junk = np.array(g["ok"]), np.array(g["junk"])
        if len(ok) == 0:
            continue
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], ok)]
        jnk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], junk)]
        k = ij = 0
        for ip in range(len(pos)):
            while ij < len(jnk) and pos[ip] > jnk[ij]:
                k, ij = k + 1, ij + 1
            pos[ip] -= k
        ap = 0.0
        for j, r in enumerate(pos):
            p0 = 1.0 if r == 0 else j / r
            ap += (p0 + (j + 1) / (r + 1)) / 2 / len(ok)
        aps.append(ap)
        pos = pos + 1
        prs.append([(pos <= min(pos.max(), kk)).sum() / min(pos.max(), kk) for kk in kappas])
    return np.mean(aps), np.mean(prs, axis=0)


@pytest.mark.parametrize("seed", range(3))
def test_compute_map_matches_reference_loop(seed):
    rng = np.random.default_rng(seed)
    ndb, nq = 60, 12
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)], axis=1)
    gnd = []
    for _ in range(nq):
        chosen = rng.permutation(ndb)[: rng.integers(1, 20)]
        cut = rng.integers(1, len(chosen) + 1)
        gnd.append({"ok": chosen[:cut], "junk": chosen[cut:]})
    mean_ap, _, mpr, _ = compute_map(ranks, gnd, ks=(1, 5, 10))
    ref_map, ref_mpr = reference_compute_map(ranks, gnd, (1, 5, 10))
    assert mean_ap == pytest.approx(ref_map)
    assert mpr == pytest.approx(ref_mpr)


def write_pickle(path, obj, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def revisitop_like():
    return {
        "imlist": [f"img_{i}" for i in range(8)],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"bbx": np.array([1.0, 2.0, 30.5, 40.0]), "easy": np.array([2, 0]),
             "hard": [np.int64(4)], "junk": np.array([5, 3], dtype=np.int32)},
            {"bbx": [0, 0, 5, 5], "easy": [1], "hard": np.array([7]), "junk": []},
        ],
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_load_gnd_accepts_containers_and_numpy_arrays(tmp_path, protocol):
    gnd = load_gnd(write_pickle(tmp_path / "gnd.pkl", revisitop_like(), protocol))
    assert gnd["imlist"][3] == "img_3" and gnd["qimlist"] == ["q0", "q1"]
    assert gnd["gnd"][0]["easy"].tolist() == [2, 0]
    assert gnd["gnd"][0]["hard"].tolist() == [4]
    assert gnd["gnd"][0]["junk"].dtype == np.int64
    assert gnd["gnd"][0]["bbx"] == [1.0, 2.0, 30.5, 40.0]
    assert gnd["gnd"][1]["junk"].tolist() == []


def test_load_gnd_accepts_numpy1_module_names(tmp_path):
    data = pickle.dumps(revisitop_like(), protocol=2)
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != data
    (tmp_path / "gnd.pkl").write_bytes(legacy)
    assert load_gnd(tmp_path / "gnd.pkl")["gnd"][0]["easy"].tolist() == [2, 0]


class Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_gnd_refuses_os_system_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = revisitop_like()
    payload["gnd"][0]["junk"] = Exploit(marker)
    path = write_pickle(tmp_path / "gnd.pkl", payload, 2)
    refused = r"refusing to unpickle (os|posix)\.system from .*gnd\.pkl"
    with pytest.raises(UsageError, match=refused) as err:
        load_gnd(path)
    assert err.value.exit_code == 2
    assert not marker.exists()


def test_load_gnd_refuses_other_globals(tmp_path):
    path = write_pickle(tmp_path / "gnd.pkl", {"imlist": [], "f": eval}, 4)
    with pytest.raises(UsageError, match="refusing to unpickle builtins.eval"):
        load_gnd(path)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("qimlist"),
        lambda d: d["gnd"].pop(),
        lambda d: d["gnd"][0].pop("hard"),
        lambda d: d["gnd"][1].update(easy=[8]),
        lambda d: d["gnd"][1].update(easy=[1.5]),
        lambda d: d["gnd"][0].update(bbx=[1, 2, 3]),
        lambda d: d.update(imlist=[1, 2]),
    ],
)
def test_load_gnd_rejects_malformed_structure(tmp_path, mutate):
    payload = revisitop_like()
    mutate(payload)
    with pytest.raises(DataError):
        load_gnd(write_pickle(tmp_path / "gnd.pkl", payload, 4))


def test_load_gnd_missing_or_corrupt_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_gnd(tmp_path / "nope.pkl")
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        load_gnd(tmp_path / "bad.pkl")


def test_evaluate_retrieval_rejects_mismatched_inputs():
    queries, db = features_for([RANKING_0, RANKING_1], 8)
    with pytest.raises(DataError):
        evaluate_retrieval(queries[:1], db, GND)
    with pytest.raises(DataError):
        evaluate_retrieval(queries, db[:5], GND)  # index 7 outside a 5-image database
    with pytest.raises(DataError):
        evaluate_retrieval(queries, db[:, :4], GND)
