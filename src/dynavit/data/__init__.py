"""Datasets on disk, evaluation transforms and metrics."""

from dynavit.data.datasets import (
    ADE20K_CLASSES,
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    LAYOUTS,
    ADE20KDataset,
    CamVidDataset,
    CityscapesDataset,
    ClassFoldersDataset,
    ClassificationDataset,
    ImageDataset,
    ImageNetFlatDataset,
    SegmentationDataset,
    detect_layout,
    open_dataset,
    read_image,
)
from dynavit.data.metrics import (
    ClassificationMeter,
    SegmentationMeter,
    confusion_matrix,
    segmentation_scores,
    topk_correct,
)
from dynavit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationTransform,
    SegmentationTransform,
)

__all__ = [
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYOUTS",
    "ADE20KDataset",
    "CamVidDataset",
    "CityscapesDataset",
    "ClassFoldersDataset",
    "ClassificationDataset",
    "ClassificationMeter",
    "ClassificationTransform",
    "ImageDataset",
    "ImageNetFlatDataset",
    "SegmentationDataset",
    "SegmentationMeter",
    "SegmentationTransform",
    "confusion_matrix",
    "detect_layout",
    "open_dataset",
    "read_image",
    "segmentation_scores",
    "topk_correct",
]
