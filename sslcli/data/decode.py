"""`data.decode_on: device`: JPEG decoding, cropping and resizing on the training device.

The third stage of the data path. With `decode_on: worker` the loader workers
decode every image with PIL, crop + resize + flip it (MultiCropGeometry) and ship uint8 crops. With
`decode_on: device` (CUDA training with `augment_on: device` only, `decodes_on_device`) they do not
decode: `read_source` reads the file bytes and takes the image size from the JPEG header (PIL's
`Image.open` is lazy), `DecodeGeometry` makes exactly the draws of MultiCropGeometry from that size
(GeometryView.draw: the same random numbers in the same order, so both stages crop the same boxes,
flip the same views and draw the same colour parameters under the same seed) and ships per sample
the encoded bytes (and the second image's for global view 2 under neighbour bootstrapping) plus
per view its crop box and flip (`DecodePlan`). In the main process `decode_views` decodes all JPEGs
of a batch with one batched `torchvision.io.decode_jpeg(..., device=device)` call (nvJPEG on CUDA),
crops + resizes each view with torchvision's `resized_crop` (the configured interpolation,
antialias=True), flips, and stacks the uint8 views that `Batch.colour` consumes.

Images the device path cannot take are decoded in the worker (PIL, as `ImageDataset.load`) and
shipped whole as uint8 [3, H, W], cropped on the device like the JPEGs, so one batch may mix both:
files that do not start with the JPEG marker FF D8, JPEGs that are not RGB or greyscale (CMYK,
YCCK: their RGB conversion is not reliably the same in PIL and nvJPEG), JPEGs that do not end with FF D9 (truncated files
then take PIL's error path and are skipped as unreadable, as with worker decoding), and in-memory
(built-in) datasets. A JPEG that still fails to decode on the device becomes a mid-grey image of
its header size (a warning names its id) and is counted in `Batch.bad`.

On the CPU the decoded pixels equal PIL's and the resampling differs from the worker path's PIL
resize only by rounding, at most 2 grey levels (tests/test_decode_device.py); the draws are
identical. nvJPEG's IDCT and the float resize of uint8 images on CUDA may differ slightly more.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F2

from sslcli.config import DataConfig
from sslcli.data.transforms import INTERPOLATION, Box, MultiCropGeometry

logger = logging.getLogger(__name__)

JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"  # start / end of image markers
DEVICE_MODES = ("RGB", "L")  # JPEG colour spaces that PIL and decode_jpeg(mode=RGB) convert alike
FAILED_GREY = 128  # the value of an image that could not be decoded on the device
_said_ignored = False  # decodes_on_device logs "ignored on CPU" once per process


def decodes_on_device(cfg: DataConfig, device: torch.device | str | None, allow_cpu: bool = False) -> bool:
    """Whether the workers ship JPEG bytes for `Batch.decode` (see module doc).

    True only for `decode_on: device` with `augment_on: device` on a CUDA `device`: on the CPU the
    main process would decode what the workers could decode in parallel, so the workers keep decoding
    (said once at INFO). `allow_cpu`: decode in the main process on any device (benchmarks/loader.py
    measures the path on a CPU).
    """
    global _said_ignored
    if cfg.decode_on != "device" or cfg.augment_on != "device":
        return False
    if allow_cpu or (device is not None and torch.device(device).type == "cuda"):
        return True
    if not _said_ignored:
        _said_ignored = True
        logger.info("data.decode_on=device is ignored on %s: the loader workers decode", device or "cpu")
    return False


@dataclass
class Source:
    """One image as a worker ships it with `decode_on: device`.

    data: uint8 [n] encoded JPEG file bytes (decoded on the device), or uint8 [3, H, W] RGB already
      decoded in the worker (not a JPEG, or not one the device path takes).
    width, height: the image size in pixels (from the JPEG header for bytes).
    """

    data: Tensor
    width: int
    height: int

    @property
    def encoded(self) -> bool:
        return self.data.dim() == 1

    @classmethod
    def from_pil(cls, img: Image.Image) -> Source:
        """Decode (if still lazy) to RGB: uint8 [3, H, W], as ImageDataset.load would."""
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return cls(TF.pil_to_tensor(rgb), *rgb.size)


def device_decodable(data: bytes, img: Image.Image) -> bool:
    """A JPEG (FF D8 ... FF D9) in RGB or greyscale: what the device path decodes (module doc)."""
    return (data[:2] == JPEG_SOI and data[-2:] == JPEG_EOI and img.format == "JPEG"
            and img.mode in DEVICE_MODES)


def to_rgb(img: Image.Image) -> Image.Image:
    """`img.convert("RGB")` (decodes fully), except that 16-bit greyscale (modes I;16*) is scaled
    to 8 bits (value >> 8) first, where convert() would clip every value above 255 to white."""
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))  # mode L
    return img.convert("RGB")


def read_source(path: Path) -> Source:
    """The file's bytes when the device can decode them, else the RGB image decoded here by
    `to_rgb`, as ImageDataset.load decodes it. The EXIF orientation is not applied on either path
    (decode_jpeg's default, PIL's too).

    Raises OSError / PIL errors on an unreadable file or header (TrainSet skips the image),
    DecompressionBombError on a header claiming over 2 x Image.MAX_IMAGE_PIXELS pixels.
    """
    data = Path(path).read_bytes()
    img = Image.open(io.BytesIO(data))  # lazy: parses the header only, .size and .mode without decoding
    if device_decodable(data, img):
        return Source(torch.frombuffer(bytearray(data), dtype=torch.uint8), *img.size)  # (n,) uint8
    return Source.from_pil(to_rgb(img))


@dataclass
class DecodePlan:
    """What a worker ships per sample with `decode_on: device` (V views).

    images: the sample's image, then the second image when global view 2 comes from another one
      (neighbour bootstrapping); each a Source.data (uint8 [n] bytes or uint8 [3, H, W]).
    image_sizes: (height, width) per image. source: per view, the index into images it is cut from.
    boxes: per view (top, left, height, width) in pixels of its image. flips: per view.
    crop_sizes: per view, the side S of the square crop; interpolation: bicubic | bilinear.
    """

    images: list[Tensor]
    image_sizes: list[tuple[int, int]]
    source: list[int]
    boxes: list[Box]
    flips: list[bool]
    crop_sizes: list[int]
    interpolation: str


class DecodeGeometry:
    """The worker transform of `decode_on: device`: Source(s) -> (DecodePlan, params per view).

    Makes MultiCropGeometry's draws (same order, same generators) from the image sizes alone; the
    crops are cut on the device by `decode_views`. `reads_sources` tells TrainSet to load
    `ImageDataset.load_source` (bytes + header size) instead of decoded PIL images.
    """

    reads_sources = True

    def __init__(self, cfg: DataConfig):
        self.geometry = MultiCropGeometry(cfg)
        self.interpolation = cfg.interpolation

    def __call__(self, src: Source, second: Source | None = None) -> tuple[DecodePlan, list[dict]]:
        images = [src] if second is None else [src, second]
        draws = self.geometry.draw((src.width, src.height), None if second is None else (second.width, second.height))
        source = [0, len(images) - 1] + [0] * self.geometry.local_crops
        plan = DecodePlan(images=[s.data for s in images], image_sizes=[(s.height, s.width) for s in images],
                          source=source, boxes=[box for box, _, _ in draws], flips=[flip for _, flip, _ in draws],
                          crop_sizes=[view.size for view in self.geometry.views], interpolation=self.interpolation)
        return plan, [params for _, _, params in draws]


@dataclass
class EncodedViews:
    """The views of a batch of B samples before decoding (V views, K <= 2B images).

    data: uint8 [total], the K images back to back (JPEG bytes, or a decoded [3, H, W] flattened):
      one tensor, so that a batch crosses from the worker in one shared-memory block whatever K is;
      it stays on the CPU when the batch moves (decode_jpeg reads CPU bytes). image_shapes: per image
      (n,) for JPEG bytes or (3, H, W); image_sizes, image_ids: (height, width) and dataset id per
      image. source: [V][B] image index per view and sample; boxes: [V][B] (top, left, h, w); flips:
      [V][B]. crop_sizes: S per view; global_views: how many of the V views are global.
    """

    data: Tensor
    image_shapes: list[tuple[int, ...]]
    image_sizes: list[tuple[int, int]]
    image_ids: list[int]
    source: list[list[int]]
    boxes: list[list[Box]]
    flips: list[list[bool]]
    crop_sizes: list[int]
    interpolation: str
    global_views: int

    @property
    def images(self) -> list[Tensor]:
        """The K images as views of `data`: uint8 [n] JPEG bytes or uint8 [3, H, W]."""
        out, offset = [], 0
        for shape in self.image_shapes:
            n = math.prod(shape)
            out.append(self.data[offset:offset + n].view(shape))
            offset += n
        return out

    @classmethod
    def collate(cls, plans: list[DecodePlan], ids: list[tuple[int, int]], global_views: int) -> EncodedViews:
        """One batch from per-sample plans; ids: per sample (its image id, its second image's id)."""
        images, sizes, image_ids, offsets = [], [], [], []
        for plan, pair in zip(plans, ids):
            offsets.append(len(images))
            images.extend(plan.images)
            sizes.extend(plan.image_sizes)
            image_ids.extend(pair[: len(plan.images)])
        views = range(len(plans[0].source))
        return cls(data=torch.cat([t.reshape(-1) for t in images]), image_shapes=[tuple(t.shape) for t in images],
                   image_sizes=sizes, image_ids=image_ids,
                   source=[[o + p.source[v] for o, p in zip(offsets, plans)] for v in views],
                   boxes=[[p.boxes[v] for p in plans] for v in views],
                   flips=[[p.flips[v] for p in plans] for v in views],
                   crop_sizes=plans[0].crop_sizes, interpolation=plans[0].interpolation,
                   global_views=global_views)


def _decode_jpegs(data: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """uint8 [3, H, W] per JPEG on `device`: one batched decode_jpeg call (nvJPEG batches on CUDA);
    when it fails, one call per image, None for those that still fail."""
    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        out: list[Tensor | None] = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                out.append(None)
        return out


def decode_images(enc: EncodedViews, device: torch.device | str) -> tuple[list[Tensor], list[int]]:
    """Every image of the batch as uint8 [3, H, W] on `device`, and the indices of those that could
    not be decoded (mid-grey in their place, with a warning naming the dataset id)."""
    device, stored = torch.device(device), enc.images
    jpegs = [k for k, t in enumerate(stored) if t.dim() == 1]
    images = [t.to(device, non_blocking=True) if t.dim() == 3 else None for t in stored]
    for k, img in zip(jpegs, _decode_jpegs([stored[k] for k in jpegs], device)):
        images[k] = img if img is not None and tuple(img.shape[-2:]) == enc.image_sizes[k] else None
    failed = [k for k, img in enumerate(images) if img is None]
    for k in failed:
        logger.warning("image %d could not be decoded on %s; mid-grey in its place this step", enc.image_ids[k], device)
        images[k] = torch.full((3, *enc.image_sizes[k]), FAILED_GREY, dtype=torch.uint8, device=device)
    return images, failed


def decode_views(enc: EncodedViews, device: torch.device | str) -> tuple[list[Tensor], int]:
    """The V uint8 views [B, 3, S, S] on `device` (global first), and the number of failed images.

    Per view and sample: crop the box and resize it to S x S (resized_crop, the configured
    interpolation, antialias=True: PIL-like downscaling), then flip; B crops stack into one view.
    """
    images, failed = decode_images(enc, device)
    mode = INTERPOLATION[enc.interpolation]
    views = []
    for source, boxes, flips, size in zip(enc.source, enc.boxes, enc.flips, enc.crop_sizes):
        crops = []
        for k, box, flip in zip(source, boxes, flips):
            crop = F2.resized_crop(images[k], *box, [size, size], interpolation=mode, antialias=True)  # (3, S, S)
            crops.append(crop.flip(-1) if flip else crop)
        views.append(torch.stack(crops))  # (B, 3, S, S) uint8
    return views, len(failed)
