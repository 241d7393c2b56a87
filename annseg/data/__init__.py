"""Datasets: image + mask files -> {"image", "mask", "name"} items of train ids, one class per dataset."""

from annseg.data.base import IGNORE_INDEX, DataError, SegmentationDataset, read_image, read_mask
from annseg.data.meta import CITYSCAPES_TRAIN_TO_LABEL_ID, generated_palette

__all__ = [
    "CITYSCAPES_TRAIN_TO_LABEL_ID",
    "IGNORE_INDEX",
    "DataError",
    "SegmentationDataset",
    "generated_palette",
    "read_image",
    "read_mask",
]
