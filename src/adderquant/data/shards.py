"""A directory of ``.npz`` shards described by ``meta.json`` (the layout of ``shared/data/cifar10``):
each shard holds ``x`` (N, H, W, 3) uint8 and ``y`` (N,) int64; ``meta.json`` lists ``classes``, the
``train`` and ``test`` shards in order, and optionally ``sha256_pixels``: per split, the SHA-256 of
the split's pixel bytes concatenated in shard order. Verification is opt-in: it is one more pass over
every pixel (about 0.2 s for CIFAR-10, whose decompression takes about 2 s), which repeated training
runs of an unchanged copy do not need."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .dataset import Dataset, make
from .npz import open_npz


def load(root: Path, verify: bool = False) -> Dataset:
    meta_path = root / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    missing = [k for k in ("classes", "train", "test") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing keys {missing}")
    digests = meta.get("sha256_pixels")
    if verify and not digests:
        raise ValueError(f"{meta_path}: verify=True but it holds no sha256_pixels")
    splits = []
    for split in ("train", "test"):
        files = meta[split]
        if not files:
            raise ValueError(f"{meta_path}: no {split} shards listed")
        xs, ys = zip(*(_shard(root / name) for name in files), strict=True)
        if len({x.shape[1:] for x in xs}) > 1:
            raise ValueError(f"{root}: {split} shards differ in image size: "
                             + ", ".join(f"{n} {x.shape[1:3]}" for n, x in zip(files, xs, strict=True)))
        if verify:
            _check_digest(xs, digests.get(split), f"{meta_path} ({split}: {', '.join(files)})")
        where = f"{root} [{split}: {', '.join(files)}]"
        splits.append((np.concatenate(xs), np.concatenate(ys), where))
    return make(meta.get("name", root.name), *splits, classes=meta["classes"], source=f"{root} [npz shards]")


def _shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in meta.json does not exist")
    with open_npz(path) as f:
        if "x" not in f.files or "y" not in f.files:
            raise ValueError(f"{path}: expected keys x and y, found {f.files}")
        x, y = f["x"], f["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"{path}: x is {x.dtype} {x.shape}, expected uint8 (N, H, W, 3)")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{path}: y has shape {y.shape} for {len(x)} images")
    return x, y


def _check_digest(xs, expected: str | None, where: str) -> None:
    if expected is None:
        raise ValueError(f"{where}: meta.json holds no sha256_pixels for this split")
    h = hashlib.sha256()
    for x in xs:
        h.update(np.ascontiguousarray(x))
    if h.hexdigest() != expected:
        raise ValueError(f"{where}: SHA-256 of the pixels is {h.hexdigest()}, meta.json says {expected}")
