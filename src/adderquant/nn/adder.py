"""``AdderConv2d``: the drop-in module for ``nn.Conv2d`` that computes ``-Σ|X - W|``."""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import _pair, adder_conv2d


class AdderConv2d(nn.Module):
    """Adder layer with the AdderNet backward and adaptive learning-rate scaling (``eta``).

    ``groups`` as in ``nn.Conv2d`` (``groups=in_channels``: depthwise): weight (O, C/groups, kh, kw),
    each output channel measures its distance to its own group's input channels only."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = False, eta: float | None = 0.2, groups: int = 1):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"AdderConv2d: channel counts must be positive, got {in_channels}, {out_channels}")
        if not isinstance(groups, int) or groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"AdderConv2d: groups={groups!r} must be a positive int dividing in_channels "
                             f"({in_channels}) and out_channels ({out_channels})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.stride = _pair("stride", stride)
        self.padding = _pair("padding", padding)
        self.dilation = _pair("dilation", dilation)
        self.eta = eta
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The authors initialise like nn.Conv2d's default; AdderNets train from that fine.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adder_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.eta,
                            groups=getattr(self, "groups", 1))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                + (f"groups={self.groups}, " if getattr(self, "groups", 1) != 1 else "")
                + f"bias={self.bias is not None}, eta={self.eta}")
