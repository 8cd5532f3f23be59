"""The fake-quantized model evaluated in float64 with exactly the float32 model's constants.

A 4-bit AdderNet is chaotic under rounding noise: one activation that lands on the other side of a
rounding boundary changes its layer's accumulators by ±1, which moves many values of the next layer
by a sizeable fraction of a quantization step, and so on. Float32 rounding inside the fake-quant
model (``acc·s``, the BatchNorm affine, residual adds, ``x / s``) is enough to flip predictions this
way, so the float32 model is one noisy realisation of the quantized network. This float64 copy is a
far more accurate one — same integer weights, same float32 scales and clamp biases, same
first-layer decisions (the image is quantized in float32 as in the float32 model) — and it is what
the integer engine is held to exactly; ``docs/results/integer_exactness.md`` reports both.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import int_adder_conv2d
from ..quant.adder_layer import QuantAdderConv2d
from ..quant.first_last import QuantFirstLast
from ..quant.uniform import quantize_int
from ..utils import set_submodule


class _Conv8F64(nn.Module):
    """``QuantFirstLast`` in float64: ``s_x·s_w·(x̄ ∗ w̄) + bias`` with the float32 model's x̄ rule."""

    def __init__(self, m: QuantFirstLast, first: bool):
        super().__init__()
        layer = m.layer
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        self.layer, self.bits, self.first = layer, m.bits, first
        self.register_buffer("w_int", quantize_int(layer.weight.detach().float(), m.w_scale.view(shape), m.bits)
                             .double())
        self.register_buffer("x_scale32", m.x_scale.detach().float().clone())
        self.register_buffer("scale", (m.x_scale.double() * m.w_scale.double()))
        self.register_buffer("bias", layer.bias.detach().double() if layer.bias is not None else None)

    def forward(self, x):
        if self.first:  # the float32 model's decisions on its float32 input, exactly
            xi = quantize_int(x.float(), self.x_scale32, self.bits).double()
        else:
            xi = quantize_int(x.double(), self.x_scale32.double(), self.bits)
        if isinstance(self.layer, nn.Linear):
            y = F.linear(xi, self.w_int) * self.scale
        else:
            c = self.layer
            y = F.conv2d(xi, self.w_int, None, c.stride, c.padding, c.dilation, c.groups) * self.scale.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + (self.bias if y.dim() == 2 else self.bias.view(1, -1, 1, 1))
        return y


class _AdderF64(nn.Module):
    """``QuantAdderConv2d.forward`` (eval) in float64, operation for operation, except that the integer
    accumulator ``x̄ ⊕ w̄`` comes from ``int_adder_conv2d`` (exact) instead of a float64 ``cdist``
    (exact as well, but slow): the result is bitwise the module's own float64 forward (tested)."""

    def __init__(self, m: QuantAdderConv2d):
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        if getattr(m, "grid", "uniform") != "uniform":
            raise NotImplementedError("APoT-grid adder layers have no integer accumulator")
        x = x.double()
        qn, qp = m.int_bounds()
        wn, wp = m.acc_weight_bounds()  # the double-step grid's 2·w_q reaches −2^b
        dtype = torch.int8 if -128 <= min(qn, wn) and max(qp, wp) <= 127 else torch.int16
        w_int = m.acc_weight().to(dtype)
        out = None
        geometry = (m.stride, m.padding, m.dilation)
        for s, idx in m.scale_sets():
            s = s.to(x.dtype)
            x_wide = torch.round(x / s)
            acc = int_adder_conv2d(x_wide.clamp(qn, qp).to(dtype), w_int[m.call_rows(idx)], *geometry,
                                   groups=m.conv_groups)
            y = acc.to(x.dtype) * s
            if m.lossless_act_clamp:
                y = y - m.window_excess(m.excess(x_wide), geometry) * s
            if out is None:
                out = x.new_empty(x.shape[0], m.out_channels, y.shape[2], y.shape[3])
            out[:, idx] = m.call_outputs(y, idx)
        return out + m.clamp_bias.to(x.dtype).view(1, -1, 1, 1)


def float64_reference(qmodel: nn.Module) -> nn.Module:
    """A float64 evaluation copy of a fake-quantized model (inputs: the float32 normalised images)."""
    m = copy.deepcopy(qmodel).eval()
    names = [n for n, mod in m.named_modules() if isinstance(mod, QuantFirstLast)]
    for i, name in enumerate(names):
        set_submodule(m, name, _Conv8F64(m.get_submodule(name), i == 0))
    for name in [n for n, mod in m.named_modules() if isinstance(mod, QuantAdderConv2d)]:
        set_submodule(m, name, _AdderF64(m.get_submodule(name)))
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.double()
        elif isinstance(mod, nn.Conv2d | nn.Linear | nn.modules.conv._ConvNd) and not any(
                isinstance(p, _Conv8F64) and p.layer is mod for p in m.modules()):
            raise NotImplementedError(f"unquantized {type(mod).__name__} in the model")
    # The adder layers keep their float32 parameters: scales and integer weights are computed in float32
    # exactly as in the float32 model and only then cast to float64.
    return m
