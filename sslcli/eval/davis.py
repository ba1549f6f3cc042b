"""DAVIS-2017 label propagation (DINO protocol, docs/evals.md "DAVIS-2017 video object segmentation").

Follows DINO's `eval_video_segmentation.py` (`read_frame`, `read_seg`, `label_propagation`,
`restrict_neighborhood`, `norm_mask`, `eval_video_tracking_davis`):

- Frames: short side -> `short_side` (480), long side -> floor(short_side * long / short / 64) * 64
  (854x480 -> 832x480); bilinear resize without antialiasing (cv2 INTER_LINEAR, rounded to uint8
  as cv2 does on uint8 images); /255; normalise with mean (0.485, 0.456, 0.406), std (0.228, 0.224,
  0.225).
- Features: `forward_features(x)["patch"]` (last block, after the final norm) [N, D], L2-normalised,
  row-major on the grid (H' // patch, W' // patch).
- Labels of frame 0: annotation resized to the grid with PIL nearest, one-hot over ids 0..max.
- Frame t > 0: context = frame 0 + the `n_last_frames` previous frames (soft labels, before argmax);
  affinity exp(f_t . f_src / T) over sources within a (2r+1)^2 window of the target's grid position;
  per target the top-k over all context frames jointly (ties with the k-th value kept, as DINO's
  `aff < min(topk)`), normalised to sum 1; labels = affinity-weighted sum of the source labels.
- Output: soft labels upsampled x patch (bilinear, align_corners=False), per-channel min-max
  normalisation, argmax, PIL nearest resize to the frame's size; frame 0 = its annotation.

Choices where DINO is silent, inconsistent or numerically fragile:

1. exp((s - m) / T) with m = each target's largest in-window similarity instead of exp(s / T): the
   same after the per-target normalisation (one factor per target), but no overflow for small T.
   Out-of-window sources get exactly 0, as DINO's multiplication by the 0/1 mask.
2. The neighbourhood is |di| <= r and |dj| <= r (DINO's square window), cached per (grid, r,
   device); r = 0 disables it, as DINO's `size_mask_neighborhood > 0` test.
3. k is capped at the number of context sources (torch.topk would fail on tiny grids).
4. The number of label channels is max id + 1 of the full-size annotation (DINO: of the grid-size
   one); void (255) counts as background for propagation (DINO would make 256 channels). Frame 0's
   output is the annotation as read, void included (DINO writes `seg_ori`).
5. Square frames: DINO's `read_frame` and `read_seg` disagree (480x448 vs 448x480); the annotation
   is resized to the frame's grid, so they always agree here.
6. A constant channel with max > 0 becomes 1 in `norm_mask` (DINO divides 0 by 0: NaN, which
   torch.max then picks; 1 gives the same argmax without NaNs).
7. n_last_frames = 0 means frame 0 only (DINO's queue.Queue(0) would be unbounded).
8. bf16 autocast only around the backbone on CUDA; the affinity runs in float32 (DINO: all fp32).
   Frames of a sequence go through the backbone in batches of `batch_size`.
9. All frames must have the annotation's size (DINO uses frame 0's size for every output).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sslcli.device import autocast
from sslcli.errors import DataError, UsageError, hint
from sslcli.eval.davis_score import ANNOTATIONS, select_sequences, split_sequences, read_mask, write_indexed_png

if TYPE_CHECKING:
    from sslcli.models.backbone import Backbone

JPEGS = Path("JPEGImages") / "480p"
MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)
VOID = 255


# --------------------------------------------------------------------------- frames and features


def target_size(height: int, width: int, short_side: int = 480) -> tuple[int, int]:
    """(H', W') of a frame: short side -> short_side, long side floored to a multiple of 64.

    As DINO's `read_frame`: portrait (H > W) fixes W' = short_side, otherwise H' = short_side.
    """
    if height > width:
        size = (int((short_side * height / width) // 64 * 64), short_side)
    else:
        size = (short_side, int((short_side * width / height) // 64 * 64))
    if min(size) < 1:
        raise UsageError(f"short_side {short_side} is too small for {width}x{height} frames "
                         "(the long side floors to 0 at multiples of 64)")
    return size


def preprocess_frame(frame: Image.Image, short_side: int = 480) -> Tensor:
    """PIL frame (W x H) -> normalised tensor [3, H', W'] (see `target_size`)."""
    rgb = torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.float32).copy())
    x = rgb.permute(2, 0, 1)[None]  # [1, 3, H, W] in 0..255
    size = target_size(x.shape[2], x.shape[3], short_side)
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = x.round_().clamp_(0, 255)  # cv2.resize of a uint8 image gives uint8
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x / 255 - mean) / std)[0]


def _grid(backbone, size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (h, w) of a preprocessed frame of size (H', W')."""
    patch = int(backbone.patch_size)
    return size[0] // patch, size[1] // patch


def frame_features(backbone, frames: Iterable[Image.Image], size: tuple[int, int], short_side: int,
                   device: torch.device, batch_size: int = 8) -> Iterator[Tensor]:
    """Yield each frame's L2-normalised patch features [h*w, D] float32 on `device`.

    `size` = (W, H) that every frame must have (DataError otherwise).
    """
    grid = _grid(backbone, target_size(size[1], size[0], short_side))
    batch: list[Tensor] = []
    for index, frame in enumerate(frames):
        if frame.size != size:
            raise DataError(f"frame {index} is {frame.size[0]}x{frame.size[1]}, "
                            f"expected {size[0]}x{size[1]} as the annotation")
        batch.append(preprocess_frame(frame, short_side))
        if len(batch) == batch_size:
            yield from _embed(backbone, batch, grid, device)
            batch = []
    if batch:
        yield from _embed(backbone, batch, grid, device)


def _embed(backbone, batch: list[Tensor], grid: tuple[int, int], device: torch.device) -> list[Tensor]:
    """Frames [3, H', W'] -> list of L2-normalised patch features [h*w, D] float32."""
    x = torch.stack(batch).to(device)
    with autocast(device):
        patch = backbone.forward_features(x)["patch"]
    if patch.shape[1] != grid[0] * grid[1]:
        raise UsageError(f"backbone gave {patch.shape[1]} patch tokens for {x.shape[3]}x{x.shape[2]} "
                         f"frames, expected {grid[0]}x{grid[1]} (patch size {backbone.patch_size})")
    return list(F.normalize(patch.float(), dim=-1, p=2))


# --------------------------------------------------------------------------- propagation


@lru_cache(maxsize=4)
def neighbourhood_mask(h: int, w: int, radius: int, device: str = "cpu") -> Tensor:
    """[h*w (target), h*w (source)] bool: True where |di| <= radius and |dj| <= radius.

    DINO's `restrict_neighborhood` (a (2r+1)^2 window clipped at the grid border), vectorised.
    """
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    i, j = i.flatten().to(device), j.flatten().to(device)
    return ((i[:, None] - i[None]).abs() <= radius) & ((j[:, None] - j[None]).abs() <= radius)


def first_frame_labels(mask: np.ndarray, grid: tuple[int, int]) -> Tensor:
    """Annotation [H, W] uint8 -> one-hot labels [h*w, K] float32 on the grid (K = max id + 1).

    Nearest (PIL) resize to the grid as DINO's `read_seg`; void (255) is background.
    """
    ids = np.where(mask == VOID, 0, mask).astype(np.uint8)
    small = np.array(Image.fromarray(ids).resize((grid[1], grid[0]), Image.NEAREST))
    return F.one_hot(torch.from_numpy(small).long().flatten(), int(ids.max()) + 1).float()


def propagate_labels(feat_tar: Tensor, feat_src: Tensor, labels_src: Tensor, neighbourhood: Tensor | None,
                     topk: int = 5, temperature: float = 0.1) -> Tensor:
    """Soft labels [N, K] of a target frame, DINO's `label_propagation`.

    feat_tar [N, D] and feat_src [C, N, D] L2-normalised; labels_src [C, N, K]; neighbourhood
    [N, N] bool (target, source) or None. Per target: exp(cos / T) over in-window sources of all C
    context frames, keep the values >= the k-th largest, normalise to sum 1, weight the labels.
    """
    n_ctx, n_src, n_cls = labels_src.shape
    sim = torch.einsum("nd,cmd->ncm", feat_tar, feat_src)  # [N, C, M]
    if neighbourhood is not None:
        sim.masked_fill_(~neighbourhood[:, None, :], float("-inf"))
    sim = sim.reshape(feat_tar.shape[0], n_ctx * n_src)
    aff = sim.sub_(sim.amax(dim=1, keepdim=True)).div_(temperature).exp_()  # choice 1: stable exp
    kth = aff.topk(min(topk, aff.shape[1]), dim=1).values[:, -1:]
    aff.masked_fill_(aff < kth, 0)
    aff.div_(aff.sum(dim=1, keepdim=True))
    return aff @ labels_src.reshape(n_ctx * n_src, n_cls)


def norm_mask(mask: Tensor) -> Tensor:
    """DINO's `norm_mask` on [K, H, W]: channels with max > 0 min-max scaled to [0, 1] (in place)."""
    high = mask.amax(dim=(1, 2), keepdim=True)
    low = mask.amin(dim=(1, 2), keepdim=True)
    span = high - low
    scaled = torch.where(span > 0, (mask - low) / span.clamp_min(1e-30), torch.ones_like(mask))
    return mask.copy_(torch.where(high > 0, scaled, mask))


def labels_to_mask(soft: Tensor, grid: tuple[int, int], patch: int, size: tuple[int, int]) -> np.ndarray:
    """Soft labels [h*w, K] -> object ids [H, W] uint8 at frame size (W, H).

    Bilinear upsampling x patch, `norm_mask`, argmax, PIL nearest resize.
    """
    x = soft.T.reshape(1, soft.shape[1], *grid)
    x = F.interpolate(x, scale_factor=patch, mode="bilinear", align_corners=False,
                      recompute_scale_factor=False)[0]
    seg = torch.max(norm_mask(x), dim=0).indices.to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(seg).resize(size, Image.NEAREST))


def _check_args(n_last_frames: int, size_mask_neighborhood: int, topk: int, temperature: float,
                short_side: int) -> None:
    """UsageError on out-of-range propagation settings."""
    if n_last_frames < 0 or size_mask_neighborhood < 0:
        raise UsageError("n_last_frames and size_mask_neighborhood must be >= 0, "
                         f"got {n_last_frames} and {size_mask_neighborhood}")
    if topk < 1 or not temperature > 0 or short_side < 1:
        raise UsageError(f"topk and short_side must be >= 1 and temperature > 0, "
                         f"got {topk}, {short_side} and {temperature}")


@torch.no_grad()
def propagate_sequence(backbone: Backbone, frames: Iterable[Image.Image], first_mask: np.ndarray,
                       device: torch.device | str = "cpu", n_last_frames: int = 7,
                       size_mask_neighborhood: int = 12, topk: int = 5, temperature: float = 0.1,
                       short_side: int = 480, batch_size: int = 8,
                       on_frame: Callable[[], None] | None = None) -> list[np.ndarray]:
    """Object ids [H, W] uint8 of every frame (frame 0 = `first_mask` [H, W], copied).

    `frames` (a list, or any iterable: read lazily) are PIL images of size W x H. The backbone runs
    in eval mode (restored afterwards). `on_frame()` is called once per frame, frame 0 included.
    """
    _check_args(n_last_frames, size_mask_neighborhood, topk, temperature, short_side)
    device = torch.device(device)
    first_mask = np.asarray(first_mask)
    if first_mask.ndim != 2:
        raise UsageError(f"first_mask must be [H, W], got shape {first_mask.shape}")
    size = (first_mask.shape[1], first_mask.shape[0])
    grid = _grid(backbone, target_size(size[1], size[0], short_side))
    was_training = backbone.training
    backbone.eval()
    try:
        feats = frame_features(backbone, frames, size, short_side, device, batch_size)
        return _propagate(backbone, feats, first_mask, grid, device, n_last_frames,
                          size_mask_neighborhood, topk, temperature, on_frame)
    finally:
        backbone.train(was_training)


def _propagate(backbone, feats: Iterator[Tensor], first_mask: np.ndarray, grid: tuple[int, int],
               device: torch.device, n_last_frames: int, radius: int, topk: int, temperature: float,
               on_frame: Callable[[], None] | None) -> list[np.ndarray]:
    """DINO's `eval_video_tracking_davis` loop over per-frame features [h*w, D] -> masks [H, W]."""
    feat0 = next(feats, None)
    if feat0 is None:
        raise DataError("no frame to propagate")
    labels0 = first_frame_labels(first_mask, grid).to(device)
    window = neighbourhood_mask(*grid, radius, str(device)) if radius > 0 else None
    queue: deque[tuple[Tensor, Tensor]] = deque(maxlen=n_last_frames)
    size = (first_mask.shape[1], first_mask.shape[0])
    outputs = [first_mask.astype(np.uint8, copy=True)]
    if on_frame is not None:
        on_frame()
    for feat in feats:
        ctx_feats = torch.stack([feat0] + [f for f, _ in queue])
        ctx_labels = torch.stack([labels0] + [lab for _, lab in queue])
        soft = propagate_labels(feat, ctx_feats, ctx_labels, window, topk, temperature)
        queue.append((feat, soft))
        outputs.append(labels_to_mask(soft, grid, int(backbone.patch_size), size))
        if on_frame is not None:
            on_frame()
    return outputs


# --------------------------------------------------------------------------- dataset


def _sequence_paths(davis_root: Path, seq: str) -> tuple[list[Path], Path]:
    """(sorted frame JPEGs, first-frame annotation path) of a sequence; DataError if missing."""
    folder = davis_root / JPEGS / seq
    if not folder.is_dir():
        parent = folder.parent
        near = hint(seq, (p.name for p in parent.iterdir() if p.is_dir())) if parent.is_dir() else ""
        raise DataError(f"frames folder of sequence {seq!r} not found: {folder}{near}")
    frames = sorted(folder.glob("*.jpg"))
    if not frames:
        raise DataError(f"no .jpg frame in {folder}")
    annotation = davis_root / ANNOTATIONS / seq / f"{frames[0].stem}.png"
    if not annotation.is_file():
        raise DataError(f"first-frame annotation of sequence {seq!r} not found: {annotation}")
    return frames, annotation


def _load_frames(paths: list[Path]) -> Iterator[Image.Image]:
    """RGB PIL images read one at a time; DataError naming an unreadable file."""
    for path in paths:
        try:
            with Image.open(path) as image:
                yield image.convert("RGB")
        except OSError as err:
            raise DataError(f"cannot read frame {path}: {err}") from None


def run_davis(backbone: Backbone, davis_root: Path, out_dir: Path, split: str = "val",
              sequences: list[str] | None = None, device: torch.device | str = "cpu",
              short_side: int = 480, on_frame: Callable[[], None] | None = None,
              n_last_frames: int = 7, size_mask_neighborhood: int = 12, topk: int = 5,
              temperature: float = 0.1) -> Path:
    """Propagate every sequence of ROOT/ImageSets/2017/<split>.txt (or `sequences`) -> out_dir.

    Reads ROOT/JPEGImages/480p/<seq>/*.jpg and ROOT/Annotations/480p/<seq>/<first frame>.png,
    writes OUT/<seq>/<frame>.png palette PNGs (DAVIS palette, one per JPEG, same stems).
    Every sequence's layout is checked before any work. Returns out_dir.
    """
    davis_root, out_dir = Path(davis_root), Path(out_dir)
    names = select_sequences(split_sequences(davis_root, split), sequences, split)
    layout = {seq: _sequence_paths(davis_root, seq) for seq in names}
    for seq, (frames, annotation) in layout.items():
        masks = propagate_sequence(
            backbone, _load_frames(frames), read_mask(annotation), device, n_last_frames,
            size_mask_neighborhood, topk, temperature, short_side, on_frame=on_frame)
        for path, mask in zip(frames, masks):
            write_indexed_png(mask, out_dir / seq / f"{path.stem}.png")
    return out_dir
