"""The in-memory data set every reader returns, and the checks shared by the readers so that bad
files fail with the file name and the problem instead of a shape error deep in training."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Dataset:
    """Images are uint8 NCHW (normalisation and augmentation happen on device), labels int64."""

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    classes: list[str]
    source: str


def images(x: np.ndarray, where: str) -> torch.Tensor:
    """uint8 (N, H, W, 3) HWC array -> uint8 (N, 3, H, W) tensor."""
    if x.dtype != np.uint8:
        raise ValueError(f"{where}: images have dtype {x.dtype}, expected uint8")
    if x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"{where}: images have shape {x.shape}, expected (N, H, W, 3)")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def labels(y, n: int, num_classes: int, where: str) -> torch.Tensor:
    """Integer labels in [0, num_classes), one per image -> int64 tensor."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels have shape {y.shape} and dtype {y.dtype}, expected (N,) integers")
    if len(y) != n:
        raise ValueError(f"{where}: {len(y)} labels for {n} images")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{where}: labels span [{y.min()}, {y.max()}], expected [0, {num_classes})")
    return torch.from_numpy(y.astype(np.int64))


def make(name: str, train: tuple, test: tuple, classes: list[str], source: str) -> Dataset:
    """``train``/``test`` are (HWC uint8 images, labels, where) triples."""
    splits = []
    for x, y, where in (train, test):
        splits += [images(x, where), labels(y, len(x), len(classes), where)]
    if splits[0].shape[1:] != splits[2].shape[1:]:
        raise ValueError(f"{source}: train images are {tuple(splits[0].shape[1:])} but test images are "
                         f"{tuple(splits[2].shape[1:])}")
    return Dataset(name, *splits, classes=list(classes), source=source)
