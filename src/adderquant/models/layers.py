"""Layer factory shared by every architecture: one switch turns a CNN into its AdderNet twin."""

from __future__ import annotations

from torch import nn

from ..nn import AdderConv2d

KINDS = ("adder", "conv")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def body_conv(kind: str, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Module:
    """A hidden layer: adder or conventional (no bias; a BatchNorm follows)."""
    if kind == "adder":
        return AdderConv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
