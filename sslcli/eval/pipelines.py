"""Protocol preprocessing + feature extraction (docs/evals.md), each returning FeatureSet(s).

Every pipeline runs the frozen backbone (`Backbone(x)`: the CLS token after the final norm for
ViTs, the pooled vector for CNNs), in eval mode, bf16 autocast on CUDA, and goes through the
feature cache when one is given (key = weights + data + the preprocessing dict built here, which
also holds a fingerprint of the dataset index: image count and sha1 of the relative paths and
labels, so added / removed / renamed images miss the cache).

Choices the protocols leave open, made here:
- crop size = `image_size` or the weights' training crop (`WeightsInfo.image_size`; 224 for the
  paper presets); mean / std = the weights' training normalisation (ImageNet for the presets).
- k-NN: the resize is round(crop * 256 / 224) px on the shorter side (256 for 224); features are
  stored raw (the k-NN classifier L2-normalises).
- few-shot: the square resize is round(crop * 257 / 224) px (257 for 224), bicubic (PIL, so
  antialiased when shrinking), aspect not kept.
- unlabeled folders (label -1 everywhere) give labels None; ids = position (0..N-1) always;
  labeled ones carry their class names as meta["classes"] (JSON list, index = label), which the
  evals use to match val classes to train's by name (sslcli.eval.classes).
- linear probe (logreg protocol): the k-NN preprocessing, and the probe features of
  sslcli.eval.probe instead of the global feature.
- retrieval: see `retrieval_features`.
- with a cache dir, the folder index of sslcli.data.folder is kept there too (index-*.json); the
  dataset is indexed even on a cache hit (for the fingerprint); on_batch is not called on a hit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.data.decode import to_rgb
from sslcli.data.transforms import BICUBIC, eval_transform
from sslcli.device import autocast
from sslcli.errors import DataError, UsageError, hint
from sslcli.eval.featurefiles import FeatureCache, FeatureSet, as_cache, data_id
from sslcli.eval.features import extract_features
from sslcli.eval.probe import ProbeFeatures
from sslcli.eval.retrieval import load_gnd
from sslcli.eval.weights import WeightsInfo

RETRIEVAL_DATASETS = ("roxford5k", "rparis6k")
RETRIEVAL_IMSIZE = {"roxford5k": 224, "rparis6k": 512}  # DINO's table
MULTISCALES = (1.0, 1 / math.sqrt(2), 0.5)  # DINO's multi_scale

OnBatch = Callable[[int], None] | None


# --------------------------------------------------------------------------- transforms


def knn_resize(crop: int) -> int:
    """Shorter-side resize of the k-NN protocol: round(crop * 256 / 224)."""
    return round(crop * 256 / 224)


def fewshot_resize(crop: int) -> int:
    """Square resize of the few-shot protocol: round(crop * 257 / 224)."""
    return round(crop * 257 / 224)


def fewshot_transform(crop: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL -> [3, crop, crop]: resize to R x R (R = fewshot_resize(crop), aspect not kept, bicubic),
    center-crop crop, ToTensor, Normalize(mean, std)."""
    size = fewshot_resize(crop)
    return T.Compose([T.Resize((size, size), interpolation=BICUBIC), T.CenterCrop(crop),
                      T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


# --------------------------------------------------------------------------- k-NN and few-shot


def index_fingerprint(ds: ImageDataset) -> str:
    """sha1 hex of the dataset's image count, relative paths and labels (its identity for the cache)."""
    h = hashlib.sha1(f"{len(ds)}\n".encode())
    h.update("\n".join(ds.paths).encode())
    h.update(np.ascontiguousarray(ds.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _crop_size(image_size: int | None, info: WeightsInfo) -> int:
    """image_size, else the weights' training crop; UsageError unless a positive integer."""
    crop = image_size or info.image_size
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 1:
        raise UsageError(f"--image-size must be a positive number of pixels, got {crop!r}")
    return crop


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _classify_features(protocol: str, backbone: nn.Module, info: WeightsInfo, data: str,
                       device: torch.device | str, cache, crop: int, transform: Callable,
                       preprocessing: dict, batch_size: int, workers: int,
                       on_batch: OnBatch) -> FeatureSet:
    """Shared body of knn_features / fewshot_features: open, key, extract (or read the cache)."""
    cache = as_cache(cache)
    ds = open_dataset(data, cache_dir=cache.dir)
    if len(ds) == 0:
        raise DataError(f"dataset '{data}' has no images")
    preprocessing = {"protocol": protocol, "crop": crop, "mean": list(info.mean), "std": list(info.std),
                     "feature": "global", **preprocessing, "index": index_fingerprint(ds)}

    def compute() -> FeatureSet:
        feats, labels = extract_features(backbone, ds, transform, _as_device(device), batch_size,
                                         workers, on_batch)
        meta = {"protocol": protocol, "data": data_id(data), "crop": str(crop),
                "weights": str(info.path), "which": info.which, "arch": info.arch}
        return FeatureSet(feats, labels if ds.num_classes else None, torch.arange(len(ds)), meta)

    fs = cache.features(info, data, preprocessing, compute)
    if ds.num_classes:  # outside the cached meta, so entries written before this key have it too
        fs.meta = {**fs.meta, "classes": json.dumps(list(ds.classes))}
    return fs


def knn_features(backbone: nn.Module, info: WeightsInfo, data: str, device: torch.device | str,
                 cache: FeatureCache | Path | None = None, image_size: int | None = None,
                 batch_size: int = 256, workers: int = 4, on_batch: OnBatch = None,
                 feature: str = "global") -> FeatureSet:
    """k-NN features of every image of `data` (folder or builtin spec) -> FeatureSet.

    Preprocessing: shorter side resized to knn_resize(crop) (bicubic), center-crop crop x crop,
    normalised with info.mean / info.std; crop = image_size or info.image_size. features [N, D]
    float32 (raw CLS / pooled, not normalised), labels [N] int64 (None for an unlabeled folder),
    ids = arange(N), meta {"protocol": "knn", "data", "crop", "weights", "which", "arch"}.
    `feature` names what `backbone` returns when it is not the global feature (part of the cache
    key, e.g. the audit's pooled patch grid).
    """
    crop = _crop_size(image_size, info)
    transform = eval_transform(crop, knn_resize(crop), info.mean, info.std)
    prep = {"resize": f"shorter side {knn_resize(crop)}", "interpolation": "bicubic", "feature": feature}
    return _classify_features("knn", backbone, info, data, device, cache, crop, transform, prep,
                              batch_size, workers, on_batch)


def fewshot_features(backbone: nn.Module, info: WeightsInfo, data: str, device: torch.device | str,
                     cache: FeatureCache | Path | None = None, image_size: int | None = None,
                     batch_size: int = 256, workers: int = 4, on_batch: OnBatch = None) -> FeatureSet:
    """Few-shot features of every image of `data` -> FeatureSet (raw: no L2, no centering).

    Preprocessing: fewshot_transform (square resize to fewshot_resize(crop), aspect not kept,
    bicubic; center-crop crop; normalise with info.mean / info.std); crop = image_size or
    info.image_size. Same outputs as knn_features, meta["protocol"] = "fewshot".
    """
    crop = _crop_size(image_size, info)
    transform = fewshot_transform(crop, info.mean, info.std)
    prep = {"resize": f"square {fewshot_resize(crop)}", "interpolation": "bicubic"}
    return _classify_features("fewshot", backbone, info, data, device, cache, crop, transform, prep,
                              batch_size, workers, on_batch)


def linear_features(backbone: nn.Module, info: WeightsInfo, data: str, device: torch.device | str,
                    n_last_blocks: int, avgpool: bool, cache: FeatureCache | Path | None = None,
                    image_size: int | None = None, batch_size: int = 256, workers: int = 4,
                    on_batch: OnBatch = None) -> FeatureSet:
    """Linear-probe features (logreg protocol) of every image of `data` -> FeatureSet.

    The k-NN preprocessing (the linear probe's evaluation transform), then probe_features with
    (n_last_blocks, avgpool) as resolved by sslcli.eval.probe.resolve_probe: features [N, F]
    float32 with F = D x (n + avgpool) for ViTs, D for CNNs; meta["protocol"] = "linear".
    """
    crop = _crop_size(image_size, info)
    transform = eval_transform(crop, knn_resize(crop), info.mean, info.std)
    prep = {"resize": f"shorter side {knn_resize(crop)}", "interpolation": "bicubic",
            "feature": f"probe n_last_blocks={n_last_blocks} avgpool={avgpool}"}
    # the wrapper takes the backbone's mode, which extract_features restores on both afterwards
    features = ProbeFeatures(backbone, n_last_blocks, avgpool).train(backbone.training)
    return _classify_features("linear", features, info, data, device, cache, crop, transform, prep,
                              batch_size, workers, on_batch)


# --------------------------------------------------------------------------- retrieval


def resize_long_side(img: Image.Image, size: int) -> Image.Image:
    """`img` resized (bicubic, aspect kept) so its long side is `size` px, short side
    round(short * size / long) >= 1. Enlarges images smaller than `size` too."""
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def crop_box(img: Image.Image, bbx: Sequence[float], path: Path) -> Image.Image:
    """`img` cropped to bbx = [x1, y1, x2, y2] (zero-based pixels, PIL's box convention: x2 / y2
    exclusive, coordinates rounded), clipped to the image; DataError if nothing is left."""
    w, h = img.size
    x1, y1, x2, y2 = (round(v) for v in bbx)
    box = (max(0, x1), max(0, y1), min(w, x2), min(h, y2))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DataError(f"query box {list(bbx)} lies outside {path} ({w}x{h})")
    return img.crop(box)


class RetrievalImages(Dataset):
    """Item i -> (normalised tensor [3, H, W] at its own size, or None, error message or "").

    Image i is read from paths[i] (RGB), cropped to boxes[i] when not None, resized so its long
    side is `imsize` (resize_long_side) and normalised. Errors are returned, not raised, so the
    caller reports them as one-line DataErrors (exceptions from loader workers carry tracebacks).
    """

    def __init__(self, paths: Sequence[Path], boxes: Sequence | None, imsize: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.paths, self.boxes, self.imsize = list(paths), boxes, imsize
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor | None, str]:
        path = self.paths[i]
        try:
            with Image.open(path) as f:
                img = to_rgb(f)  # as training reads images (16-bit greyscale scaled, not clipped)
            if self.boxes is not None:
                img = crop_box(img, self.boxes[i], path)
        except DataError as e:
            return None, str(e)
        except Exception as e:  # PIL raises many types for unreadable images
            return None, f"cannot read image {path}: {type(e).__name__}: {e}"
        return self.normalize(resize_long_side(img, self.imsize)), ""


def _first(batch: list):
    """collate_fn of batch size 1: the single item, unchanged (variable image sizes)."""
    return batch[0]


def _rescale(x: Tensor, scale: float, min_side: int) -> Tensor:
    """x [1, 3, H, W] scaled by `scale` as DINO's multi_scale does (bilinear, align_corners False,
    scale_factor given), but never below min_side px per side (then resized to that size)."""
    h, w = x.shape[-2:]
    out = (math.floor(h * scale), math.floor(w * scale))
    if min(out) >= min_side:
        return x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="bilinear",
                                                  align_corners=False)
    size = (max(out[0], min_side), max(out[1], min_side))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _trim(x: Tensor, patch: int) -> Tensor:
    """x [1, 3, H, W] without the last H % patch rows and W % patch columns: what DINO's patch
    convolution ignores (timm refuses sizes that are not multiples of the patch)."""
    h, w = x.shape[-2:]
    return x[..., : h - h % patch, : w - w % patch]


@torch.no_grad()
def _global_feature(backbone: nn.Module, x: Tensor, scales: Sequence[float]) -> Tensor:
    """L2-normalised mean over `scales` of backbone(x rescaled) -> [D] float32.

    Sides are kept >= the backbone's patch size (CNNs: total stride); ViT inputs are trimmed to
    multiples of the patch size.
    """
    patch = int(getattr(backbone, "patch_size", 1))
    is_vit = bool(getattr(backbone, "is_vit", False))
    total = 0
    for s in scales:
        xs = _rescale(x, s, patch)
        xs = _trim(xs, patch) if is_vit else xs
        with autocast(x.device):
            total = total + backbone(xs)[0].float()
    return F.normalize(total / len(scales), dim=0)


def extract_one_by_one(backbone: nn.Module, images: RetrievalImages, device: torch.device,
                       scales: Sequence[float], workers: int = 4, on_batch: OnBatch = None) -> Tensor:
    """Features of every image, one at a time at its own size -> [N, D] float32 CPU, unit norm.

    Decoding runs in `workers` DataLoader workers (batch size 1). The backbone is in eval mode
    during the call (restored afterwards). on_batch(1) after each image.
    """
    loader = DataLoader(images, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_first,
                        pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()
    feats = []
    try:
        for x, error in loader:
            if x is None:
                raise DataError(error)
            feats.append(_global_feature(backbone, x[None].to(device), scales).cpu())
            if on_batch is not None:
                on_batch(1)
    finally:
        backbone.train(was_training)
    return torch.stack(feats)


def _check_dataset(dataset: str) -> None:
    if dataset not in RETRIEVAL_DATASETS:
        near = hint(dataset, RETRIEVAL_DATASETS) or f" (expected one of: {', '.join(RETRIEVAL_DATASETS)})"
        raise UsageError(f"unknown retrieval dataset '{dataset}'{near}")


def _image_paths(jpg: Path, names: Sequence[str]) -> list[Path]:
    """jpg/<name>.jpg for each name; DataError naming the first missing file (and the count)."""
    paths = [jpg / f"{name}.jpg" for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"retrieval image not found: {missing[0]}{more}")
    return paths


def _query_boxes(gnd: dict, gnd_path: Path) -> list[list[float]]:
    """Per query its bbx; DataError if one has none (use query_crop=False / --no-query-crop)."""
    for i, entry in enumerate(gnd["gnd"]):
        if "bbx" not in entry:
            raise DataError(f"{gnd_path}: gnd[{i}] has no 'bbx' to crop the query to "
                            "(use --no-query-crop)")
    return [entry["bbx"] for entry in gnd["gnd"]]


def retrieval_features(backbone: nn.Module, info: WeightsInfo, root: Path, dataset: str,
                       device: torch.device | str, imsize: int | None = None, multiscale: bool = False,
                       query_crop: bool = True, cache: FeatureCache | Path | None = None,
                       on_batch: OnBatch = None, workers: int = 4
                       ) -> tuple[FeatureSet, FeatureSet, dict]:
    """(query features, database features, gnd) for revisited Oxford / Paris.

    Layout ROOT/<dataset>/gnd_<dataset>.pkl (read by load_gnd; returned as its whole dict
    {"imlist", "qimlist", "gnd"}: pass gnd["gnd"] to evaluate_retrieval) and
    ROOT/<dataset>/jpg/<name>.jpg. dataset: roxford5k or rparis6k (UsageError otherwise).
    Per image: RGB; queries cropped to their bbx unless query_crop is False (crop_box); long side
    resized to imsize (default 224 Oxford, 512 Paris), aspect kept, bicubic (resize_long_side);
    normalised with info.mean / info.std; run alone at its own size (ViT position embeddings are
    interpolated). multiscale: mean of the features over scales 1, 1/sqrt(2), 1/2 of that tensor
    (DINO's multi_scale: bilinear F.interpolate of the normalised tensor, floor sizes). Features
    L2-normalised, [nq, D] / [ndb, D] float32; ids = position in qimlist / imlist; no labels.

    Choices: the resize also enlarges crops / images smaller than imsize (DINO and cirtorch use
    PIL thumbnail, which only shrinks, with Lanczos); boxes are rounded and clipped to the image;
    a side that would fall below the patch size is brought up to it; ViT inputs are trimmed to
    multiples of the patch size (the right / bottom remainder, which DINO's patch convolution
    ignores too).
    """
    _check_dataset(dataset)
    imsize = int(imsize or RETRIEVAL_IMSIZE[dataset])
    if imsize < 1:
        raise UsageError(f"--imsize must be a positive number of pixels, got {imsize}")
    folder = Path(root) / dataset
    gnd_path = folder / f"gnd_{dataset}.pkl"
    gnd = load_gnd(gnd_path)
    queries = _image_paths(folder / "jpg", gnd["qimlist"])
    database = _image_paths(folder / "jpg", gnd["imlist"])
    boxes = _query_boxes(gnd, gnd_path) if query_crop else None
    scales = MULTISCALES if multiscale else (1.0,)
    base = {"protocol": "retrieval", "imsize": imsize, "scales": list(scales), "resize": "long side",
            "interpolation": "bicubic", "mean": list(info.mean), "std": list(info.std),
            "gnd_sha1": hashlib.sha1(gnd_path.read_bytes()).hexdigest()}
    cache, device = as_cache(cache), _as_device(device)

    def part(name: str, paths: list[Path], part_boxes) -> FeatureSet:
        if not paths:
            raise DataError(f"{gnd_path}: no {name} images")
        prep = {**base, "part": name, "query_crop": part_boxes is not None}

        def compute() -> FeatureSet:
            images = RetrievalImages(paths, part_boxes, imsize, info.mean, info.std)
            feats = extract_one_by_one(backbone, images, device, scales, workers, on_batch)
            meta = {"protocol": "retrieval", "data": str(folder.resolve()), "part": name,
                    "imsize": str(imsize), "multiscale": str(multiscale).lower(),
                    "query_crop": str(part_boxes is not None).lower(), "weights": str(info.path),
                    "which": info.which, "arch": info.arch}
            return FeatureSet(feats, None, torch.arange(len(paths)), meta)

        return cache.features(info, str(folder), prep, compute)

    return part("queries", queries, boxes), part("database", database, None), gnd
