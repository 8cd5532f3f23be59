"""Shared fixtures: where the real data and the authors' checkpoints are, skipping when absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def _data_root() -> Path | None:
    root = os.environ.get("ADDERQUANT_DATA")
    return Path(root) if root and Path(root).exists() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared data directory (``ADDERQUANT_DATA``): CI points it at ../shared/data."""
    root = _data_root()
    if root is None:
        pytest.skip("real data absent: set ADDERQUANT_DATA to the directory holding cifar10/ and cifar10-subset.npz")
    return root


@pytest.fixture(scope="session")
def cifar_subset(data_root) -> Path:
    path = data_root / "cifar10-subset.npz"
    if not path.exists():
        pytest.skip(f"{path} absent")
    return path


@pytest.fixture(scope="session")
def checkpoints_root() -> Path:
    """The authors' published checkpoints: ``ADDERQUANT_CHECKPOINTS`` or ../shared/checkpoints beside data."""
    env = os.environ.get("ADDERQUANT_CHECKPOINTS")
    candidates = [Path(env)] if env else []
    if _data_root() is not None:
        candidates.append(_data_root().parent / "checkpoints")
    for c in candidates:
        if c.exists():
            return c
    pytest.skip("authors' checkpoints absent: set ADDERQUANT_CHECKPOINTS (CI: ../shared/checkpoints)")


@pytest.fixture(scope="session")
def official_addernet(checkpoints_root) -> Path:
    path = checkpoints_root / "addernet-resnet20-cifar10.pth"
    if not path.exists():
        pytest.skip(f"{path} absent")
    return path


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), y_train=np.arange(16) % 10,
             x_test=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), y_test=np.arange(10) % 10)
    return path
