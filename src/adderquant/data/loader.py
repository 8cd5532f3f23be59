"""Batches straight from in-memory tensors: CIFAR fits in memory, and indexing a tensor is faster and
more reproducible than a multi-worker DataLoader for it."""

from __future__ import annotations

import torch

from .dataset import Dataset


class Batches:
    """Iterable of (uint8 images, labels) on ``device``; each pass reshuffles when ``shuffle``, drawing
    from ``generator`` (default: a fresh one seeded 0, so a run is reproducible epoch by epoch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 generator: torch.Generator | None = None, drop_last: bool = False, device=None):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y, self.batch_size, self.shuffle, self.drop_last = x, y, batch_size, shuffle, drop_last
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.device = device

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = None
        if self.shuffle:
            order = torch.randperm(len(self.x), generator=self.generator, device=self.generator.device)
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl].to(self.x.device) if order is not None else sl
            xb, yb = self.x[idx], self.y[idx]
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
            generator: torch.Generator | None = None, drop_last: bool = False, device=None) -> Batches:
    """Batches of ``(x, y)``; ``len()`` is the number of batches."""
    return Batches(x, y, batch_size, shuffle, generator, drop_last, device)


def calibration_indices(dataset: Dataset, n: int = 1024, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` training images, the same ones for the same ``seed``."""
    total = len(dataset.x_train)
    if not 0 < n <= total:
        raise ValueError(f"calibration_subset: n={n} but the training set has {total} images")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def calibration_subset(dataset: Dataset, n: int = 1024, seed: int = 0) -> torch.Tensor:
    """``n`` training images (uint8), the same ones for the same ``seed``: PTQ results stay comparable."""
    return dataset.x_train[calibration_indices(dataset, n, seed)]


def tensor_batches(calib, batch_size: int = 256, limit: int | None = None, device=None):
    """Image batches of ``calib``: a tensor cut into ``batch_size`` pieces, or any iterable of tensors
    or ``(x, y)`` pairs (a ``DataLoader``) taken as it comes; at most ``limit`` batches, each moved to
    ``device`` when given. What calibration, BN re-estimation and threshold fits iterate over."""
    if isinstance(calib, torch.Tensor):
        source = (calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size))
    else:
        source = (item[0] if isinstance(item, (tuple, list)) else item for item in calib)
    for i, xb in enumerate(source):
        if limit is not None and i >= limit:
            return
        yield xb if device is None or not isinstance(xb, torch.Tensor) else xb.to(device)  # others: the caller refuses


def calibration_tensor(calib, limit: int | None = None) -> torch.Tensor:
    """The calibration images as one tensor: ``calib`` itself (its first ``limit`` images) when it is a
    tensor, else its batches concatenated, reading no further than ``limit`` images."""
    if isinstance(calib, torch.Tensor):
        return calib if limit is None else calib[:limit]
    taken, count = [], 0
    for xb in tensor_batches(calib):
        taken.append(xb)
        count += len(xb)
        if limit is not None and count >= limit:
            break
    if not taken:
        raise ValueError("no calibration images: the iterable yielded no batch")
    images = torch.cat(taken)
    return images if limit is None else images[:limit]
