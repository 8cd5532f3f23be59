"""The CIFAR-10/100 "python version" downloads: pickled dicts with bytes keys, ``data`` (N, 3072)
uint8 holding the R, G and B planes of each 32x32 image, and labels as lists.

CIFAR-10: ``data_batch_1`` … ``data_batch_5``, ``test_batch``, ``batches.meta`` (``label_names``).
CIFAR-100: ``train``, ``test``, ``meta`` (``fine_label_names``); the fine labels are used.
The pickles come from Python 2, hence ``encoding="bytes"``. Unpickling runs code named in the file,
so only what a numpy array needs is allowed.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from .dataset import Dataset, make

CIFAR10 = {"name": "CIFAR-10", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
           "meta": "batches.meta", "labels": b"labels", "names": b"label_names"}
CIFAR100 = {"name": "CIFAR-100", "train": ["train"], "test": ["test"], "meta": "meta",
            "labels": b"fine_labels", "names": b"fine_label_names"}

_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SAFE = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
         ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
         ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
         ("_codecs", "encode"): codecs.encode}  # bytes in protocol-2 pickles written by Python 3


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR pickle")
        return _SAFE[(module, name)]


def layout(root: Path) -> dict | None:
    """The CIFAR variant whose files ``root`` holds, else None."""
    for spec in (CIFAR10, CIFAR100):
        if (root / spec["train"][0]).is_file() and (root / spec["meta"]).is_file():
            return spec
    return None


def load(root: Path) -> Dataset:
    spec = layout(root)
    names = _read(root / spec["meta"], [spec["names"]])[spec["names"]]
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    splits = []
    for split in ("train", "test"):
        parts = [_read(root / f, [b"data", spec["labels"]]) for f in spec[split]]
        data = np.concatenate([np.asarray(p[b"data"]) for p in parts])
        where = f"{root} [{', '.join(spec[split])}]"
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{where}: data has shape {data.shape}, expected (N, 3072)")
        x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate([np.asarray(p[spec["labels"]]) for p in parts])
        splits.append((x, y, where))
    return make(spec["name"], *splits, classes=classes, source=f"{root} [{spec['name']} python pickles]")


def _read(path: Path, keys: list[bytes]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the CIFAR python layout")
    try:
        with open(path, "rb") as f:
            d = _NumpyOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: not a CIFAR pickle ({e})") from None
    if not isinstance(d, dict) or any(k not in d for k in keys):
        found = list(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: expected a dict with keys {keys}, found {found}")
    return d
