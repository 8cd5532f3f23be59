"""One ``.npz`` with ``x_train, y_train, x_test, y_test`` (uint8 HWC): the compact form for subsets
such as ``cifar10-subset.npz``. An optional ``classes`` string array names the classes."""

from __future__ import annotations

import contextlib
import pickle
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .dataset import CIFAR10_CLASSES, Dataset, make

KEYS = ("x_train", "y_train", "x_test", "y_test")


@contextlib.contextmanager
def open_npz(path: Path) -> Iterator:
    """``np.load(path)`` whose failures on a damaged file — truncated, not a zip, a corrupt member,
    a pickled object — are one ``ValueError`` naming the file (reads of members included)."""
    damaged = (zipfile.BadZipFile, zlib.error, EOFError, OSError, pickle.UnpicklingError)
    try:
        f = np.load(path, allow_pickle=False)
    except (*damaged, ValueError) as err:  # ValueError: neither zip nor .npy (numpy would unpickle it)
        raise ValueError(f"{path} is damaged or not a .npz file ({type(err).__name__}: {err})") from None
    with f:
        try:
            yield f
        except damaged as err:  # a member cut short or corrupt, found when it is read
            raise ValueError(f"{path} is damaged: {type(err).__name__}: {err}") from None
        except ValueError as err:
            if "allow_pickle" not in str(err):
                raise
            raise ValueError(f"{path} holds object arrays, which are not loaded (only plain arrays)") from None


def load(path: Path) -> Dataset:
    with open_npz(path) as f:
        missing = [k for k in KEYS if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing} (has {f.files}); expected {list(KEYS)}")
        arrays = {k: f[k] for k in KEYS}
        classes = [str(c) for c in f["classes"]] if "classes" in f.files else None
    if classes is None:
        classes = _default_classes(arrays["y_train"], arrays["y_test"])
    return make(path.stem, (arrays["x_train"], arrays["y_train"], f"{path} [x_train, y_train]"),
                (arrays["x_test"], arrays["y_test"], f"{path} [x_test, y_test]"), classes, f"{path} [npz]")


def _default_classes(*ys: np.ndarray) -> list[str]:
    """Without names, 10 classes are taken to be CIFAR-10's (the only 10-class set here)."""
    k = max((int(np.max(y)) + 1 for y in ys if np.size(y) and np.issubdtype(y.dtype, np.integer)), default=0)
    return list(CIFAR10_CLASSES) if k == 10 else [str(i) for i in range(k)]
