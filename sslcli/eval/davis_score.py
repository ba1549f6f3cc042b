"""DAVIS-2017 semi-supervised scoring: region similarity J and boundary measure F.

Follows the official davis2017-evaluation toolkit (`davis2017/metrics.py`, `utils.py`,
`evaluation.py`) without OpenCV / scikit-image:

- J = IoU of one object's masks (1 when both are empty; void pixels, when given, are ignored).
- F = boundary F-measure. Boundary map (`seg2bmap`) = pixels differing from their east, south or
  south-east neighbour (the last row compares east only, the last column south only, the bottom
  right pixel is never a boundary). Each boundary is dilated with a disk of radius
  `bound_th` (>= 1: pixels) or `ceil(bound_th * image diagonal)` (skimage `disk`, cv2 `dilate`
  with zero border), precision/recall count boundary pixels inside the other's dilated boundary.
- Per object: mean, recall (fraction of frames > 0.5) and decay over 4 overlapping bins.

Masks are palette PNGs whose pixel values are object ids (0 background, 255 void); the palette
is the PASCAL VOC colour map, generated locally (sslcli.data.palette).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from sslcli.data.palette import davis_palette, read_mask, write_indexed_png
from sslcli.errors import DataError, UsageError, hint

__all__ = ["davis_palette", "read_mask", "write_indexed_png", "db_eval_iou", "db_eval_boundary",
           "db_statistics", "evaluate_davis"]

VOID = 255
ANNOTATIONS = Path("Annotations") / "480p"
IMAGESETS = Path("ImageSets") / "2017"


# --------------------------------------------------------------------------- per-frame measures


def _binary_pair(annotation, segmentation, void) -> tuple[np.ndarray, ...]:
    """Boolean (annotation, segmentation) [..., H, W] and void broadcast to them (or None)."""
    a = np.asarray(annotation, dtype=bool)
    s = np.asarray(segmentation, dtype=bool)
    if a.shape != s.shape or a.ndim < 2:
        raise DataError(
            f"annotation shape {a.shape} and segmentation shape {s.shape} differ or are not [..., H, W]"
        )
    if void is None:
        return a, s, None
    v = np.asarray(void, dtype=bool)
    try:
        v = np.broadcast_to(v, a.shape)
    except ValueError:
        raise DataError(f"void shape {v.shape} does not fit masks of shape {a.shape}") from None
    return a, s, v


def _count(x: np.ndarray) -> np.ndarray:
    """Number of True pixels [...] of x [..., H, W] (count_nonzero per map: faster than axis=)."""
    flat = x.reshape(math.prod(x.shape[:-2]), x.shape[-2] * x.shape[-1])
    return np.array([np.count_nonzero(m) for m in flat], dtype=np.int64).reshape(x.shape[:-2])


def db_eval_iou(annotation, segmentation, void=None) -> np.ndarray:
    """J [...] of binary masks [..., H, W]: |A∩S| / |A∪S| outside void; 1 where the union is empty."""
    a, s, v = _binary_pair(annotation, segmentation, void)
    if v is not None:
        a, s = a & ~v, s & ~v
    inter, union = _count(a & s), _count(a | s)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """Boundary map [..., H, W] bool of masks [..., H, W], as the official `_seg2bmap`.

    A pixel is boundary when it differs from its east, south or south-east neighbour; in the last
    row only the east neighbour counts, in the last column only the south one, and the bottom-right
    pixel is never boundary (so the image border itself is never a boundary).
    """
    seg = np.asarray(seg, dtype=bool)
    b = np.zeros_like(seg)
    c = seg[..., :-1, :-1]
    b[..., :-1, :-1] = (c ^ seg[..., :-1, 1:]) | (c ^ seg[..., 1:, :-1]) | (c ^ seg[..., 1:, 1:])
    b[..., -1, :-1] = seg[..., -1, :-1] ^ seg[..., -1, 1:]
    b[..., :-1, -1] = seg[..., :-1, -1] ^ seg[..., 1:, -1]
    return b


def boundary_radius(height: int, width: int, bound_th: float = 0.008) -> float:
    """Disk radius in pixels: bound_th if >= 1, else ceil(bound_th * sqrt(H² + W²))."""
    if bound_th < 0:
        raise UsageError(f"bound_th must be >= 0, got {bound_th}")
    return float(bound_th) if bound_th >= 1 else float(np.ceil(bound_th * math.hypot(height, width)))


def disk_rows(radius: float) -> list[tuple[int, int, int]]:
    """skimage `disk(radius)` as rows (dy, dx_lo, dx_hi) of offsets from cv2's default anchor."""
    grid = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(grid, grid)
    kernel = x**2 + y**2 <= radius**2
    anchor = kernel.shape[0] // 2
    rows = []
    for i, row in enumerate(kernel):
        cols = np.flatnonzero(row)
        if cols.size:
            rows.append((i - anchor, int(cols[0]) - anchor, int(cols[-1]) - anchor))
    return rows


def _or_shifted(dst: np.ndarray, src: np.ndarray, shift: int, axis: int) -> None:
    """In place, dst[..., i, ...] |= src[..., i + shift, ...] along `axis` (zero outside)."""
    n = src.shape[axis]
    if abs(shift) >= n:
        return
    lo, hi = (slice(0, n - shift), slice(shift, n)) if shift >= 0 else (slice(-shift, n), slice(0, n + shift))
    index = [slice(None)] * src.ndim
    index[axis] = lo
    d = tuple(index)
    index[axis] = hi
    dst[d] |= src[tuple(index)]


def dilate(mask: np.ndarray, rows: list[tuple[int, int, int]]) -> np.ndarray:
    """Binary dilation [..., H, W] bool: out[y, x] = any mask[y + dy, x + lo .. x + hi] over rows.

    Equals cv2.dilate with the kernel given by `rows` (zero border). Rows are taken from the
    narrowest to the widest so that each horizontal OR extends the previous one.
    """
    by_range: dict[tuple[int, int], list[int]] = defaultdict(list)
    for dy, lo, hi in rows:
        by_range[(lo, hi)].append(dy)
    out = np.zeros_like(mask)
    cur = np.zeros_like(mask)
    c_lo, c_hi = 0, -1  # current horizontal range of `cur` (empty)
    for (lo, hi), dys in sorted(by_range.items(), key=lambda item: item[0][1] - item[0][0]):
        if c_lo <= c_hi and (lo > c_lo or hi < c_hi):  # not nested: start again
            cur[...] = False
            c_lo, c_hi = 0, -1
        for dx in range(lo, hi + 1):
            if not c_lo <= dx <= c_hi:
                _or_shifted(cur, mask, dx, axis=-1)
        c_lo, c_hi = lo, hi
        for dy in dys:
            _or_shifted(out, cur, dy, axis=-2)
    return out


def _crop_to(*maps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Maps [..., H, W] cropped to the bounding box of all their True pixels (exact for matching)."""
    any_map = np.logical_or.reduce([m.reshape(-1, *m.shape[-2:]).any(axis=0) for m in maps])
    rows, cols = np.flatnonzero(any_map.any(axis=1)), np.flatnonzero(any_map.any(axis=0))
    if rows.size == 0:
        return tuple(m[..., :0, :0] for m in maps)
    box = (..., slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return tuple(m[box] for m in maps)


def _f_from_boundaries(gt_b: np.ndarray, fg_b: np.ndarray, rows: list[tuple[int, int, int]]):
    """F [...] (ndarray) from true / predicted boundary maps [..., H, W] and the disk `rows`."""
    n_gt, n_fg = _count(gt_b), _count(fg_b)
    # Matches only involve boundary pixels, so the dilation can run on their bounding box.
    gt_c, fg_c = _crop_to(gt_b, fg_b)
    fg_match = _count(fg_c & dilate(gt_c, rows))
    gt_match = _count(gt_c & dilate(fg_c, rows))
    precision = np.where(n_fg > 0, fg_match / np.maximum(n_fg, 1), 1.0)
    recall = np.where(n_gt > 0, gt_match / np.maximum(n_gt, 1), 1.0)
    precision = np.where((n_fg > 0) & (n_gt == 0), 0.0, precision)  # true empty: P=0, R=1
    recall = np.where((n_fg == 0) & (n_gt > 0), 0.0, recall)  # predicted empty: P=1, R=0
    total = precision + recall
    return np.where(total == 0, 0.0, 2 * precision * recall / np.where(total == 0, 1, total))


def db_eval_boundary(annotation, segmentation, void=None, bound_th: float = 0.008) -> np.ndarray:
    """F [...] of binary masks [..., H, W] (void pixels, if given, are removed from both first).

    precision = predicted boundary pixels within the dilated true boundary / predicted ones,
    recall the reverse; empty cases: both empty P=R=1, predicted empty P=1 R=0, true empty P=0 R=1;
    F = 2PR / (P + R), 0 when P + R = 0.
    """
    a, s, v = _binary_pair(annotation, segmentation, void)
    if v is not None:
        a, s = a & ~v, s & ~v
    rows = disk_rows(boundary_radius(*a.shape[-2:], bound_th))
    return _f_from_boundaries(seg2bmap(a), seg2bmap(s), rows)


def db_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame values [n] (official `db_statistics`, without its uint8 bug).

    recall = mean(per_frame > 0.5); decay = nanmean(bin 0) - nanmean(bin 3) with bin edges
    ids = round(linspace(1, n, 5)) - 1 (halves round up), bin i = per_frame[ids[i] : ids[i+1] + 1].
    """
    values = np.asarray(per_frame, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise UsageError(f"db_statistics needs a non-empty 1-D array, got shape {values.shape}")
    ids = (np.round(np.linspace(1, values.size, 5) + 1e-10) - 1).astype(np.int64)
    bins = [values[ids[i] : ids[i + 1] + 1] for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(values)
        decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return float(mean), float(np.mean(values > 0.5)), float(decay)


# --------------------------------------------------------------------------- dataset scoring


def split_sequences(davis_root: Path, split: str) -> list[str]:
    """Sequence names listed in ROOT/ImageSets/2017/<split>.txt."""
    if not davis_root.is_dir():
        raise DataError(f"DAVIS root not found: {davis_root}")
    path = davis_root / IMAGESETS / f"{split}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in (davis_root / IMAGESETS).glob("*.txt"))
        raise DataError(f"split file not found: {path}{hint(split, known)}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"split file lists no sequence: {path}")
    return names


def select_sequences(names: list[str], sequences: list[str] | None, split: str) -> list[str]:
    """The requested sequences (all of the split when None), checked against the split."""
    if sequences is None:
        return names
    if not sequences:
        raise UsageError("no sequence to score (empty sequence list)")
    for seq in sequences:
        if seq not in names:
            raise DataError(f"unknown sequence {seq!r} (not in split {split!r}){hint(seq, names)}")
    return list(dict.fromkeys(sequences))


def _seq_dir(root: Path, seq: str, what: str) -> Path:
    """ROOT/<seq>, or DataError naming the sequence and the closest existing folders."""
    folder = root / seq
    if not folder.is_dir():
        near = hint(seq, (p.name for p in root.iterdir() if p.is_dir())) if root.is_dir() else ""
        raise DataError(f"{what} folder of sequence {seq!r} not found: {folder}{near}")
    return folder


def _annotation_frames(folder: Path, seq: str) -> tuple[list[str], int]:
    """(frame names, number of objects = max id of the first frame, void excluded)."""
    frames = sorted(p.stem for p in folder.glob("*.png"))
    if len(frames) < 3:
        raise DataError(
            f"sequence {seq!r} needs >= 3 annotation frames (the first and last are not scored), "
            f"found {len(frames)} in {folder}"
        )
    first = read_mask(folder / f"{frames[0]}.png")
    first = np.where(first == VOID, 0, first)
    n_objects = int(first.max())
    if n_objects == 0:
        raise DataError(f"sequence {seq!r}: first annotation frame {folder / frames[0]}.png has no object")
    return frames, n_objects


def _object_box(gt: np.ndarray, pred: np.ndarray, n_objects: int) -> tuple[slice, slice] | None:
    """Bounding box of pixels with ids 1..K in gt or pred [H, W], grown by 1 pixel (None if none).

    J and F computed on this crop equal those of the full frame: outside it no pixel is an object
    pixel or a boundary pixel, and the margin keeps seg2bmap's border rule where it matters.
    """
    fg = ((gt >= 1) & (gt <= n_objects)) | ((pred >= 1) & (pred <= n_objects))
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None
    return slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2)


def _score_frame(gt: np.ndarray, pred: np.ndarray, n_objects: int, rows: list) -> tuple[np.ndarray, ...]:
    """(J [K], F [K]) of id masks gt, pred [H, W] for object ids 1..K, all objects at once.

    `rows` = disk_rows(boundary_radius(H, W)) of the full frame.
    """
    box = _object_box(gt, pred, n_objects)
    if box is None:  # every object empty in both: J = F = 1
        return np.ones(n_objects), np.ones(n_objects)
    ids = np.arange(1, n_objects + 1, dtype=np.uint8)[:, None, None]
    a, s = gt[box][None] == ids, pred[box][None] == ids
    return db_eval_iou(a, s), _f_from_boundaries(seg2bmap(a), seg2bmap(s), rows)


def _score_sequence(ann_dir: Path, pred_dir: Path, seq: str) -> tuple[np.ndarray, np.ndarray]:
    """(J [K, T-2], F [K, T-2]) of one sequence over all frames but the first and the last."""
    frames, n_objects = _annotation_frames(ann_dir, seq)
    j_all, f_all = [], []
    for frame in frames[1:-1]:
        pred_path = pred_dir / f"{frame}.png"
        if not pred_path.is_file():
            raise DataError(f"prediction of sequence {seq!r} frame {frame} not found: {pred_path}")
        gt, pred = read_mask(ann_dir / f"{frame}.png"), read_mask(pred_path)
        if pred.shape != gt.shape:
            raise DataError(f"{pred_path}: prediction size {pred.shape} differs from annotation's {gt.shape}")
        if int(pred.max()) > n_objects:
            raise UsageError(
                f"{pred_path}: prediction has object id {int(pred.max())} "
                f"but sequence {seq!r} has {n_objects} object(s)"
            )
        j, f = _score_frame(gt, pred, n_objects, disk_rows(boundary_radius(*gt.shape)))
        j_all.append(j)
        f_all.append(f)
    return np.stack(j_all, axis=1), np.stack(f_all, axis=1)


def evaluate_davis(
    davis_root: Path, predictions: Path, split: str = "val", sequences: list[str] | None = None
) -> dict:
    """Semi-supervised DAVIS-2017 J&F of PRED/<seq>/<frame>.png against ROOT/Annotations/480p.

    Objects are ids 1..max id of each sequence's first annotation frame; frames 1..T-2 are scored;
    statistics are per object and averaged over objects (not sequences). Annotation void (255)
    counts as background and is not excluded, as in the official semi-supervised evaluation.
    Returns {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay",
    "per_object": {"<seq>_<id>": {"J-Mean", "F-Mean"}}}, all x100.
    """
    davis_root, predictions = Path(davis_root), Path(predictions)
    names = select_sequences(split_sequences(davis_root, split), sequences, split)
    if not predictions.is_dir():
        raise DataError(f"predictions folder not found: {predictions}")
    stats: dict[str, list[float]] = defaultdict(list)
    per_object: dict[str, dict[str, float]] = {}
    for seq in names:
        ann_dir = _seq_dir(davis_root / ANNOTATIONS, seq, "annotation")
        pred_dir = _seq_dir(predictions, seq, "prediction")
        j_seq, f_seq = _score_sequence(ann_dir, pred_dir, seq)
        for k, (j, f) in enumerate(zip(j_seq, f_seq), start=1):
            for name, values in (("J", j), ("F", f)):
                mean, recall, decay = db_statistics(values)
                stats[f"{name}-Mean"].append(mean)
                stats[f"{name}-Recall"].append(recall)
                stats[f"{name}-Decay"].append(decay)
            per_object[f"{seq}_{k}"] = {key: 100 * stats[key][-1] for key in ("J-Mean", "F-Mean")}
    result = {key: 100 * float(np.mean(values)) for key, values in stats.items()}
    result["J&F-Mean"] = (result["J-Mean"] + result["F-Mean"]) / 2
    order = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    return {**{key: result[key] for key in order}, "per_object": per_object}
