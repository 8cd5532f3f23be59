"""CIFAR training augmentation (zero-pad, random crop, horizontal flip) on whole batches, so it runs
where the batch is (GPU included) instead of per image in PIL. Apply it to uint8 images before
``normalize`` so the padding is black, as with torchvision's ``RandomCrop(32, padding=4)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip_params(n: int, padding: int, flip: bool = True, generator: torch.Generator | None = None,
                     device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image row offsets, column offsets (both in [0, 2*padding]) and flip flags; drawn on the
    generator's device when one is given."""
    kw = {"generator": generator, "device": generator.device if generator is not None else device}
    dy = torch.randint(0, 2 * padding + 1, (n,), **kw)
    dx = torch.randint(0, 2 * padding + 1, (n,), **kw)
    flips = torch.randint(0, 2, (n,), **kw).bool() if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, flips


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor,
              padding: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image of ``x`` (N, C, H, W) padded by ``padding`` at (dy, dx), mirrored where
    ``flips``: one gather for the batch. The padding is 0, or ``fill`` per channel (shape (C,)): on
    normalised images, the normalised value of black reproduces a crop of the raw image."""
    n, c, h, w = x.shape
    dev = x.device
    if fill is None:
        padded = F.pad(x, (padding,) * 4)
    else:
        padded = fill.to(dev, x.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
    rows = dy.to(dev)[:, None] + torch.arange(h, device=dev)
    cols = dx.to(dev)[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    channel = torch.arange(c, device=dev)[:, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None,
                     flip: bool = True, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Random ``padding``-pad crop and (if ``flip``) random horizontal flip of a batch (N, C, H, W) of
    any dtype; ``generator`` makes it reproducible (its device is where the offsets are drawn);
    ``fill``: the padding's value per channel (default 0)."""
    return crop_flip(x, *crop_flip_params(len(x), padding, flip, generator, x.device), padding, fill)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images -> float32 ``(x / 255 - mean) / std`` per channel. Only uint8 is accepted: a float
    input could already be scaled, and scaling it twice fails silently."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {x.dtype}")
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return (x.float() / 255 - mean) / std


def normalized_black(mean, std) -> torch.Tensor:
    """Per channel, what ``normalize`` makes of a black pixel: the value a crop of a normalised image
    must pad with to equal the normalised crop of the raw image (the training pipeline's padding)."""
    return normalize(torch.zeros(1, len(mean), 1, 1, dtype=torch.uint8), mean, std).flatten()
