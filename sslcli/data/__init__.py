"""sslcli.data: datasets with stable global ids, folder indexing, multi-crop transforms, loaders.

Modules: builtin (procedural `builtin:shapes`), folder (ImageFolder-order index + cache),
datasets (ImageDataset, open_dataset), transforms (MultiCropTransform, eval_transform),
loader (TrainSet, EpochBatchSampler, collate_crops, build_train_loader).
"""

from sslcli.data.builtin import make_shapes
from sslcli.data.datasets import ImageDataset, open_dataset
from sslcli.data.folder import ImageIndex, scan_image_folder
from sslcli.data.loader import EpochBatchSampler, TrainSet, build_train_loader, collate_crops
from sslcli.data.transforms import MultiCropTransform, eval_transform

__all__ = [
    "EpochBatchSampler", "ImageDataset", "ImageIndex", "MultiCropTransform", "TrainSet",
    "build_train_loader", "collate_crops", "eval_transform", "make_shapes", "open_dataset",
    "scan_image_folder",
]
