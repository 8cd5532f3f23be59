"""Model registry: ``create(name, num_classes=..., kind="adder"|"conv")``.

First and last layers are conventional in every model (as in the AdderNet papers); ``kind="conv"``
gives the CNN twin with identical shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

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


__all__ = ["REGISTRY", "ModelSpec", "create", "names", "input_size"]
