"""Datasets, transforms, samplers and loaders."""

from acon.data.build import (
    build_datasets,
    build_eval_loader,
    build_train_loader,
    build_val_dataset,
    resolve_root,
)
from acon.data.folder import BadImageError, ImageFolderDataset, open_image
from acon.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ToRGB, train_transform, val_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageError",
    "ImageFolderDataset",
    "ToRGB",
    "build_datasets",
    "build_eval_loader",
    "build_train_loader",
    "build_val_dataset",
    "open_image",
    "resolve_root",
    "train_transform",
    "val_transform",
]
