"""8-bit fake quantization for the conventional first and last layers (``--quantize-first-last``).

Standard CNN quantization: per-output-channel symmetric weights, one symmetric per-tensor activation
scale from the calibration maximum — multiplications commute with scales, so nothing special.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import check_bits
from .uniform import fake_quantize


class QuantFirstLast(nn.Module):
    """Wraps an ``nn.Conv2d`` or ``nn.Linear`` with b-bit weights and activations (8 by default)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, act_range: float, bits: int = 8):
        super().__init__()
        self.layer, self.bits = layer, check_bits(bits, 2, 16)
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        w_range = w.abs().amax(1).clamp_min(1e-12)
        self.register_buffer("w_scale", 2 * w_range / (2**bits - 1))
        self.register_buffer("x_scale", torch.tensor(2 * max(act_range, 1e-12) / (2**bits - 1)))

    def forward(self, x):
        shape = (-1,) + (1,) * (self.layer.weight.dim() - 1)
        w = fake_quantize(self.layer.weight, self.w_scale.view(shape), self.bits)
        xq = fake_quantize(x, self.x_scale, self.bits)
        if isinstance(self.layer, nn.Linear):
            return F.linear(xq, w, self.layer.bias)
        c = self.layer
        return F.conv2d(xq, w, c.bias, c.stride, c.padding, c.dilation, c.groups)
