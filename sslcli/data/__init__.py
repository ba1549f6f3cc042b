"""sslcli.data: datasets with stable global ids, folder indexing, multi-crop transforms, loaders.

Modules: builtin (procedural `builtin:shapes`), folder (ImageFolder-order index + cache),
datasets (ImageDataset, open_dataset), transforms (MultiCropTransform, eval_transform),
loader (TrainSet, EpochBatchSampler, collate_views, build_train_loader), batch (Batch: what the
training engine receives), photometric (the colour chain on the device), decode (`data.decode_on:
device`: JPEG decoding and cropping on the device), masking (block masks for masked image
modelling, MaskPlan: the masks of the training batches).
"""

from sslcli.data.batch import Batch
from sslcli.data.builtin import make_shapes
from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.data.folder import ImageIndex, scan_image_folder
from sslcli.data.loader import EpochBatchSampler, TrainSet, build_train_loader, collate_views
from sslcli.data.transforms import MultiCropTransform, eval_transform

__all__ = [
    "Batch", "EpochBatchSampler", "ImageDataset", "ImageIndex", "MultiCropTransform", "TrainSet",
    "build_train_loader", "collate_views", "eval_transform", "make_shapes", "open_dataset",
    "scan_image_folder",
]
