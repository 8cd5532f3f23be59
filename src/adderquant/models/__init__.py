"""Model registry: ``create(name, num_classes=..., kind="adder"|"conv")``.

First and last layers are conventional in every model (as in the AdderNet papers); ``kind="conv"``
gives the CNN twin with identical shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..utils import hooked
from .resnet_cifar import CifarResNet
from .resnet_imagenet import ImageNetResNet, _Basic, _Bottleneck
from .vgg_small import VGGSmall


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    dataset: str  # "cifar" or "imagenet": sets input size and default class count
    num_classes: int


REGISTRY: dict[str, ModelSpec] = {
    "resnet20": ModelSpec(lambda c, k, **kw: CifarResNet(20, c, k, **kw), "cifar", 10),
    "resnet32": ModelSpec(lambda c, k, **kw: CifarResNet(32, c, k, **kw), "cifar", 10),
    "resnet56": ModelSpec(lambda c, k, **kw: CifarResNet(56, c, k, **kw), "cifar", 10),
    "vgg_small": ModelSpec(lambda c, k, **kw: VGGSmall(c, k, **kw), "cifar", 10),
    "resnet18": ModelSpec(lambda c, k, **kw: ImageNetResNet(_Basic, (2, 2, 2, 2), c, k, **kw), "imagenet", 1000),
    "resnet50": ModelSpec(lambda c, k, **kw: ImageNetResNet(_Bottleneck, (3, 4, 6, 3), c, k, **kw),
                          "imagenet", 1000),
}


def names() -> list[str]:
    return sorted(REGISTRY)


def create(name: str, num_classes: int | None = None, kind: str = "adder", **options) -> nn.Module:
    """Build a registered model; ``options`` go to the architecture (e.g. ``head="linear"``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {names()}")
    spec = REGISTRY[name]
    return spec.build(num_classes or spec.num_classes, kind, **options)


def input_size(name: str) -> int:
    return 32 if REGISTRY[name].dataset == "cifar" else 224


class AdderShape(NamedTuple):
    """One adder layer's geometry (square kernels and inputs, as in every registry model)."""

    label: str
    c_in: int
    size: int  # input height = width
    c_out: int
    kernel: int
    stride: int
    padding: int


def adder_shapes(name: str) -> list[AdderShape]:
    """The distinct adder-layer geometries of a registry model, in execution order: what the kernel
    benchmarks time, read off the model itself (forward hooks on one image) rather than typed in."""
    from ..nn import AdderConv2d

    model, seen = create(name).eval(), {}

    def record(_name, mod, args):
        c, h = args[0].shape[1], args[0].shape[2]
        o, k, s, p = mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0]
        label = f"{c}->{o} {k}x{k}" + (f" s{s}" if s > 1 else "") + f" @{h}x{h}"
        seen.setdefault((c, h, o, k, s, p), AdderShape(label, c, h, o, k, s, p))

    adders = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
    with hooked(model, adders, record), torch.no_grad():
        model(torch.zeros(1, 3, input_size(name), input_size(name)))
    return list(seen.values())


__all__ = ["REGISTRY", "AdderShape", "ModelSpec", "adder_shapes", "create", "names", "input_size"]
