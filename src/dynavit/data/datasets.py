"""Image datasets on disk (the names every caller imports; the code lives by concept).

``files`` finds and decodes images and labels, ``base`` holds the dataset base classes and
``layouts`` the layouts on disk and ``open_dataset``.
"""

from dynavit.data.base import ClassificationDataset, ImageDataset, SegmentationDataset
from dynavit.data.files import (
    IMAGE_EXTENSIONS,
    SYNSET_FILES,
    file_sha1,
    is_image_file,
    list_images,
    read_image,
    read_label,
    read_synset_file,
)
from dynavit.data.layouts import (
    ADE20K_CLASSES,
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    LAYOUTS,
    ADE20KDataset,
    CamVidDataset,
    CityscapesDataset,
    ClassFoldersDataset,
    ImageNetFlatDataset,
    UnlabelledImages,
    detect_layout,
    open_dataset,
)

__all__ = [
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "SYNSET_FILES",
    "ADE20KDataset",
    "CamVidDataset",
    "CityscapesDataset",
    "ClassFoldersDataset",
    "ClassificationDataset",
    "ImageDataset",
    "ImageNetFlatDataset",
    "SegmentationDataset",
    "UnlabelledImages",
    "detect_layout",
    "file_sha1",
    "is_image_file",
    "list_images",
    "open_dataset",
    "read_image",
    "read_label",
    "read_synset_file",
]
