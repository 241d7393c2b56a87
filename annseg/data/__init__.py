"""Datasets: image + mask files -> {"image", "mask", "name"} items of train ids, one class per dataset.

``DATASETS`` holds the file datasets (root, split); ``Synthetic`` is the built-in generated one.
"""

from annseg.data.base import IGNORE_INDEX, DataError, SegmentationDataset, read_image, read_mask
from annseg.data.datasets import ADE20K, Cityscapes, FolderDataset, PascalContext, cityscapes_label_ids, read_classes
from annseg.data.meta import CITYSCAPES_TRAIN_TO_LABEL_ID, generated_palette
from annseg.data.synthetic import Synthetic

DATASETS: dict[str, type[SegmentationDataset]] = {
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "pascal_context": PascalContext,
    "folder": FolderDataset,
}

__all__ = [
    "ADE20K",
    "CITYSCAPES_TRAIN_TO_LABEL_ID",
    "DATASETS",
    "IGNORE_INDEX",
    "Cityscapes",
    "DataError",
    "FolderDataset",
    "PascalContext",
    "SegmentationDataset",
    "Synthetic",
    "cityscapes_label_ids",
    "generated_palette",
    "read_classes",
    "read_image",
    "read_mask",
]
