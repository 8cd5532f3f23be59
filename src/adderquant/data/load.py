"""``load_dataset``: one entry point that recognises the layouts the project meets, so scripts take
a single ``--data`` path.

Recognised, in this order: a ``.npz`` file; a directory with ``meta.json`` (npz shards); a CIFAR-10/100
python-pickle directory; an ImageFolder tree (``train/`` and ``test/``). Any other directory is
searched one level down: a single dataset directory found there is used even when ``.npz`` files lie
beside it, because such files are normally subsets cut from it (``shared/data`` holds ``cifar10/``
and ``cifar10-subset.npz``); without one, a single ``.npz`` is used. Anything else is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..utils import DATA_ENV as ENV
from . import cifar_pickle, image_folder, npz, shards
from .dataset import Dataset


def load_dataset(path: str | os.PathLike | None = None, *, verify: bool = False) -> Dataset:
    """Read the data set at ``path`` (default: ``$ADDERQUANT_DATA``). ``verify`` checks the SHA-256
    pixel digests of a ``meta.json`` shard directory (the only format that carries them)."""
    origin = ""
    if path is None:
        path, origin = os.environ.get(ENV), f" (from {ENV})"
        if not path:
            raise FileNotFoundError(f"no data set given: pass --data PATH or set {ENV}")
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"data set path {root}{origin} does not exist")
    kind = _kind(root)
    if kind:
        return _load(root, kind, verify)
    if root.is_file():
        raise ValueError(f"{root}: a data set file must be a .npz")
    inner = sorted(p for p in root.iterdir() if p.is_dir() and _kind(p))
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix == ".npz")
    if len(inner) > 1 or (not inner and len(files) > 1):
        found = ", ".join(p.name for p in inner or files)
        raise ValueError(f"{root} holds several data sets ({found}): pass the one to use")
    if not inner and not files:
        raise ValueError(f"{root}: no data set recognised (expected a .npz, a directory with meta.json, "
                         "CIFAR python pickles, or train/ and test/ image folders, here or one level down)")
    chosen = (inner or files)[0]
    ds = _load(chosen, _kind(chosen), verify)
    ignored = f"; ignored {', '.join(p.name for p in files)}" if inner and files else ""
    ds.source += f" (found in {root}{ignored})"
    return ds


def _kind(p: Path) -> str | None:
    if p.is_file():
        return "npz" if p.suffix == ".npz" else None
    if (p / "meta.json").is_file():
        return "shards"
    if cifar_pickle.layout(p):
        return "cifar"
    return "folder" if image_folder.is_image_folder(p) else None


def _load(p: Path, kind: str, verify: bool) -> Dataset:
    if kind == "shards":
        return shards.load(p, verify)
    return {"npz": npz.load, "cifar": cifar_pickle.load, "folder": image_folder.load}[kind](p)
