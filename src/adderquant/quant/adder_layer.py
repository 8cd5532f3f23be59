"""``QuantAdderConv2d``: the fake-quantized adder layer of the paper (Eq. 13 with Sec. 3.2 clamps).

For group j with shared scale ``s_j = 2·r_j/(2^b−1)`` and channels ``I_j``::

    x̄_j = clamp(round(X / s_j), q_n, q_p)          w̄ = clamp(round(W'[I_j] / s_j), q_n, q_p)
    Y[:, I_j] = s_j · (x̄_j ⊕ w̄) + b_clamp[I_j]      (⊕: -Σ|·−·| over the window)

where ``W'`` is W clamped to [-r_x, r_x] and ``b_clamp = -Σ max(|W_c| − r_x, 0)`` (Theorem 1) when the
weight clamp is on. With ``lossless_act_clamp`` the unclamped ``x̃ = round(X/s_j)`` also feeds the
exact compensation ``−Σ_window (max(x̃ − q_p, 0) + max(q_n − x̃, 0))`` — valid because every w̄ lies
in [q_n, q_p], so ``|x̃ − w̄| = |clamp(x̃) − w̄| + excess(x̃)``.

With ``signed=False`` (beyond the paper, for inputs known to be ≥ 0, e.g. after ReLU) both operands
use the unsigned grid ``[0, 2^b − 1]`` with ``s_j = r_j/(2^b − 1)``: twice the resolution, and
Theorem 1 still holds because every activation lies in the clamp interval ``[0, q_p·s_j]``.

With ``grid="apot"`` (a research option, not the paper's) both operands are projected onto the
APoT level set scaled by the group range, ``r_j·Q(b)`` for non-negative inputs or ``r_j·(±Q(b−1))``;
the accumulator is then no longer an integer, so such layers are fake-quant only.

In evaluation the accumulator ``x̄ ⊕ w̄`` is computed on integer-valued tensors, so it equals the
integer engine's int32 accumulator exactly. In training (QAT) the same function is computed on
de-quantized values so that the AdderNet backward sees real-scale differences; rounding uses the
straight-through estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.functional import adaptive_scale, adder_conv2d
from .uniform import int_range, quantize_int, scale_for_range


def window_sum(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Σ over each receptive field and every input channel: a channel sum, then an all-ones box filter
    (additions only in hardware)."""
    ones = torch.ones(1, 1, *kernel, dtype=x.dtype, device=x.device)
    return F.conv2d(x.sum(1, keepdim=True), ones, stride=stride, padding=padding, dilation=dilation)


class QuantAdderConv2d(nn.Module):
    """Fake-quantized adder layer with group-shared scales; built by :func:`adderquant.quantize`."""

    def __init__(self, weight: torch.Tensor, stride, padding, dilation, *, bits: int, group_of: torch.Tensor,
                 ranges: torch.Tensor, clamp_bias: torch.Tensor | None, lossless_act_clamp: bool = False,
                 eta: float | None = 0.2, signed: bool = True, grid: str = "uniform"):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.kernel_size = tuple(weight.shape[2:])
        self.in_channels, self.out_channels = weight.shape[1], weight.shape[0]
        self.bits, self.eta, self.lossless_act_clamp, self.signed = bits, eta, lossless_act_clamp, signed
        if grid not in ("uniform", "apot"):
            raise ValueError(f"grid must be 'uniform' or 'apot', got {grid!r}")
        self.grid = grid
        if grid == "apot":
            from .apot import levels

            self.register_buffer("levels", levels(bits, "apot", signed=signed), persistent=False)
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("group_of", group_of.to(torch.long))
        self.register_buffer("ranges", ranges.to(torch.float32))  # r_j, one per group
        self.register_buffer("clamp_bias", torch.zeros(weight.shape[0]) if clamp_bias is None else clamp_bias.float())

    @property
    def groups(self) -> int:
        return int(self.ranges.numel())

    def int_bounds(self) -> tuple[int, int]:
        """``(q_n, q_p)`` of the integer grid shared by weights and activations."""
        return int_range(self.bits, self.signed)

    def scales(self) -> torch.Tensor:
        return scale_for_range(self.ranges, self.bits, self.signed)

    def channel_scales(self) -> torch.Tensor:
        return self.scales()[self.group_of]

    def int_weight(self) -> torch.Tensor:
        """w̄ per channel with its group's scale, as integer-valued float (STE in training)."""
        return quantize_int(self.weight, self.channel_scales().view(-1, 1, 1, 1), self.bits, self.signed)

    def excess(self, x_wide: torch.Tensor) -> torch.Tensor:
        qn, qp = self.int_bounds()
        return (x_wide - qp).clamp_min(0) + (qn - x_wide).clamp_min(0)

    def scale_sets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(s, channels)`` per distinct scale: groups that share a scale share one adder call."""
        scales = self.scales()
        per_channel = scales[self.group_of]
        return [(s, (per_channel == s).nonzero().flatten()) for s in torch.unique(scales)]

    def _apot_project(self, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``r · Π(clamp(v / r))`` onto the APoT levels, straight-through in training."""
        from .apot import project

        t = (v / r).clamp(-1.0 if self.signed else 0.0, 1.0)
        return v + (r * project(t, self.levels) - v).detach()

    def _forward_apot(self, x: torch.Tensor) -> torch.Tensor:
        geometry = (self.stride, self.padding, self.dilation)
        r_c = self.ranges[self.group_of].view(-1, 1, 1, 1).to(x.dtype)
        w_q = self._apot_project(self.weight, r_c)
        out = None
        for r in torch.unique(self.ranges):
            idx = (self.ranges[self.group_of] == r).nonzero().flatten()
            r = r.to(x.dtype)
            y = adder_conv2d(self._apot_project(x, r), w_q[idx], None, *geometry)
            if self.lossless_act_clamp:
                lo = -r if self.signed else torch.zeros_like(r)
                excess = ((x - r).clamp_min(0) + (lo - x).clamp_min(0)).detach()
                y = y - window_sum(excess, self.kernel_size, *geometry)
            if out is None:
                out = x.new_empty(x.shape[0], self.out_channels, y.shape[2], y.shape[3])
            out[:, idx] = y
        return out + self.clamp_bias.to(x.dtype).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid == "apot":
            return self._forward_apot(x)
        w_int = self.int_weight().to(x.dtype)
        train = self.training and torch.is_grad_enabled()
        if train:  # de-quantized weights; the AdderNet η rescaling applies to the whole layer once
            w_full = w_int * self.channel_scales().view(-1, 1, 1, 1).to(x.dtype)
            if w_full.requires_grad and self.eta is not None:
                w_full.register_hook(lambda g: adaptive_scale(g, self.eta))
        qn, qp = self.int_bounds()
        geometry = (self.stride, self.padding, self.dilation)
        out = None
        for s, idx in self.scale_sets():
            s = s.to(x.dtype)
            if train:
                x_int = quantize_int(x, s, self.bits, self.signed)
                y = adder_conv2d(x_int * s, w_full[idx], None, *geometry)
            else:  # integer-valued operands: the accumulator is exact, as in the integer engine
                x_wide = torch.round(x / s)
                y = adder_conv2d(x_wide.clamp(qn, qp), w_int[idx], None, *geometry) * s
            if self.lossless_act_clamp:
                excess = self.excess(torch.round(x / s).detach() if train else x_wide)
                y = y - window_sum(excess, self.kernel_size, *geometry) * s
            if out is None:
                out = x.new_empty(x.shape[0], self.out_channels, y.shape[2], y.shape[3])
            out[:, idx] = y
        return out + self.clamp_bias.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bits={self.bits}, "
                f"groups={self.groups}, signed={self.signed}, grid={self.grid}, "
                f"lossless_act_clamp={self.lossless_act_clamp}")
