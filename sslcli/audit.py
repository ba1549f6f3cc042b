"""`ssl neighbors`: one query or one scan, from an AdaSim run's window or any backbone's features.

`run_audit(AuditRequest)` is the CLI's one call. The window (`sslcli.neighbors`) is what an AdaSim
run kept during training; the feature graph (`sslcli.feature_audit`) works for any backbone on any
folder. The feature graph is used for --scan duplicates / leakage, with --features, and whenever
the weights hold no AdaSim window (an export, a run without bootstrapping); --scan not-self needs
the window. Every flag is checked before anything is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from safetensors import safe_open

from sslcli import runfiles
from sslcli.contact_sheet import contact_sheet
from sslcli.data.datasets import ImageDataset
from sslcli.errors import UsageError, hint
from sslcli.eval.tasks import Source
from sslcli.feature_audit import (DEFAULT_FEATURE, DEFAULT_GRID, DEFAULT_K, DEFAULT_MIN_DISAGREEMENT, DEFAULT_THRESHOLD,
                                  FEATURE_SCANS, FEATURES, build_graph, query_graph, scan_duplicates, scan_leakage,
                                  scan_other_class)
from sslcli.neighbors import (IDS, SCANS, Progress, check_out, check_query, latest_run, neighbors_of, open_images,
                              open_window, scan_window, write_result)
from sslcli.runfiles import read_checkpoint_header, resolve_weights_file

logger = logging.getLogger(__name__)

ALL_SCANS = tuple(dict.fromkeys(SCANS + FEATURE_SCANS))

class Audit(NamedTuple):
    result: dict | list[dict]  # a query's dict or a scan's rows
    matched: int | None  # scans: images that match (before --limit)
    source: str  # "window" (the AdaSim run's neighbour window) or "features" (the feature graph)


@dataclass
class AuditRequest:
    """What `ssl neighbors` was asked (flags, checked by `run_audit` before anything is read)."""

    weights: str | None = None  # run, checkpoint or export (None: the newest run in ./runs)
    query: int | None = None
    scan: str | None = None  # not-self | other-class | duplicates | leakage
    top: int | None = None  # --query: the first K neighbours
    limit: int | None = None  # --scan: the first N rows
    data: str | None = None  # window: the run's images if they moved; features: the folder to audit
    out: Path | None = None  # .csv | .json
    image: Path | None = None  # --query: contact sheet PNG
    features: bool = False  # use the feature graph even for a run that kept an AdaSim window
    k: int = DEFAULT_K  # neighbours per image in the feature graph
    threshold: float | None = None  # cosine; None: DEFAULT_THRESHOLD of the scan
    min_disagreement: float = DEFAULT_MIN_DISAGREEMENT  # other-class on the feature graph
    against: str | None = None  # leakage: the second folder (e.g. val)
    feature: str | None = None  # cls | grid (None: DEFAULT_FEATURE of the query / scan)
    grid: int = DEFAULT_GRID
    source: Source = field(default_factory=Source)  # features: device, cache, workers, which


def run_audit(req: AuditRequest, progress: Progress | None = None) -> Audit:
    """One --query or one --scan (module doc); writes `out` (csv|json) and `image` (PNG, queries
    only) when given."""
    _check_request(req)
    if _uses_window(req):
        window = open_window(req.weights)
        if req.query is not None:
            check_query(window, req.query, req.top)
        ds = open_images(window, req.data)
        if req.query is not None:
            audit = Audit(neighbors_of(window, ds, req.query, req.top), None, "window")
        else:
            audit = Audit(*scan_window(window, ds, req.scan, req.limit, progress), "window")
    else:
        audit, ds = _feature_audit(req, progress)
    if req.image is not None:
        contact_sheet(audit.result, ds, req.image)
    if req.out is not None:
        write_result(audit.result, req.out)
    return audit


def _check_request(req: AuditRequest) -> None:
    if (req.query is None) == (req.scan is None):
        raise UsageError("give exactly one of --query ID (one image) or --scan KIND (all images)")
    if req.query is not None and req.limit is not None:
        raise UsageError("--limit applies to --scan; use --top K with --query")
    if req.scan is not None:
        if req.scan not in ALL_SCANS:
            raise UsageError(f"--scan must be one of {', '.join(ALL_SCANS)}, got '{req.scan}'{hint(req.scan, ALL_SCANS)}")
        if req.top is not None:
            raise UsageError("--top applies to --query; use --limit N with --scan")
        if req.image is not None:
            raise UsageError("--image draws the neighbours of one --query image")
        if req.limit is not None and req.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {req.limit}")
    if (req.scan == "leakage") != (req.against is not None):
        raise UsageError("--scan leakage needs --against FOLDER (the images to check, e.g. val), and --against "
                         "applies to --scan leakage only")
    if req.top is not None and req.top < 1:
        raise UsageError(f"--top must be >= 1, got {req.top}")
    if req.k < 1 or req.grid < 1:
        raise UsageError(f"--k and --grid must be >= 1, got {req.k} and {req.grid}")
    if req.feature is not None and req.feature not in FEATURES:
        raise UsageError(f"--feature must be cls or grid, got '{req.feature}'{hint(req.feature, FEATURES)}")
    if req.out is not None:
        check_out(req.out)


def _uses_window(req: AuditRequest) -> bool:
    """The AdaSim window for not-self, and for a query / other-class on a run that kept one."""
    if req.scan == "not-self":
        return True
    if req.features or req.scan in ("duplicates", "leakage"):
        return False
    path = resolve_weights_file(latest_run() if req.weights is None else req.weights)
    if runfiles.format_of(runfiles.read_metadata(path))[0] != runfiles.TRAIN_FORMAT:
        return False
    with safe_open(str(path), framework="pt") as f:
        return IDS in set(f.keys())


def _feature_audit(req: AuditRequest, progress: Progress | None) -> tuple[Audit, ImageDataset]:
    weights = str(resolve_weights_file(latest_run() if req.weights is None else req.weights))
    data = req.data or _run_data(weights)
    src = replace(req.source, weights=weights)
    feature = req.feature or DEFAULT_FEATURE["query" if req.query is not None else req.scan]
    k = max(req.k, req.top or 0)  # a query's --top may ask for more than --k neighbours
    graph = build_graph(src, data, k, progress, None if req.query is None else [req.query], feature, req.grid)
    if req.query is not None:
        return Audit(query_graph(graph, req.query, req.top), None, "features"), graph.ds
    threshold = DEFAULT_THRESHOLD[req.scan] if req.threshold is None else req.threshold
    if req.scan == "other-class":
        rows = scan_other_class(graph, threshold, req.min_disagreement)
    elif req.scan == "duplicates":
        rows = scan_duplicates(graph, threshold)
    else:
        rows = scan_leakage(graph, src, req.against, threshold, progress)
    logger.info("scan %s on the feature graph: %d rows", req.scan, len(rows))
    return Audit(rows[:req.limit], len(rows), "features"), graph.ds


def _run_data(weights: str) -> str:
    """The training data of a checkpoint's run: what --data defaults to for the feature graph."""
    meta = runfiles.read_metadata(Path(weights))
    path = read_checkpoint_header(Path(weights)).config.data.path if runfiles.format_of(meta)[0] == runfiles.TRAIN_FORMAT else None
    if not path:
        raise UsageError(f"give --data FOLDER: the images to audit ('{weights}' names no training data)")
    return path
