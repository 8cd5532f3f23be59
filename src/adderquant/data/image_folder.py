"""ImageFolder trees, ``train/<class>/*.png|jpg|jpeg`` and ``test/<class>/…``: the layout most image
sets are exported to. Classes are the sorted ``train`` subdirectories, images are read in sorted file
order and converted to RGB, and all must share one size because the readers return one tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import Dataset, make

EXTENSIONS = {".png", ".jpg", ".jpeg"}


def is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def load(root: Path) -> Dataset:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading an ImageFolder tree needs Pillow (pip install pillow)") from e
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    splits, size = [], None
    for split in ("train", "test"):
        xs, ys = [], []
        for d in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            if d.name not in classes:
                raise ValueError(f"{d}: class {d.name!r} is not among the train classes {classes}")
            for f in sorted(p for p in d.iterdir() if p.suffix.lower() in EXTENSIONS):
                with Image.open(f) as im:
                    x = np.asarray(im.convert("RGB"))
                size = size or x.shape
                if x.shape != size:
                    raise ValueError(f"{f}: image is {x.shape[1]}x{x.shape[0]} (WxH), "
                                     f"the others are {size[1]}x{size[0]}")
                xs.append(x)
                ys.append(classes.index(d.name))
        if not xs:
            raise ValueError(f"{root / split}: no .png/.jpg/.jpeg images in class subdirectories")
        splits.append((np.stack(xs), np.array(ys, dtype=np.int64), f"{root / split}"))
    return make(root.name, *splits, classes=classes, source=f"{root} [image folder]")
