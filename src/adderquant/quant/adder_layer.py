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

With ``weight_grid="double_step"`` (the authors' published code) the activations use the unsigned grid
``a_q = clamp(round(X/s_j), 0, 2^b−1)``, ``s_j = r_j/(2^b−1)``, and the weights the signed grid with
twice the step, ``w_q = clamp(round(W'·(2^b−1)/(2·r_j)), −2^(b−1), 2^(b−1)−1)``; the layer computes
``s_j · (a_q ⊕ 2·w_q)``, an integer accumulator with the weight operand ``2·w_q`` (``acc_weight``).
The weight codes are computed by that formula in float64, not as ``W'/(2·s_j)`` with the float32
step: a weight clamped to −r_x sits exactly on the tie −(2^(b−1) − ½), and the float32 step's
rounding would decide it either way (round half to even gives −2^(b−1)).

With ``grid="apot"`` (a research option, not the paper's) both operands are projected onto the
APoT level set scaled by the group range, ``r_j·Q(b)`` for non-negative inputs or ``r_j·(±Q(b−1))``;
the accumulator is then no longer an integer, so such layers are fake-quant only.

In evaluation the accumulator ``x̄ ⊕ w̄`` is computed on integer-valued tensors, so it equals the
integer engine's int32 accumulator exactly. In training (QAT) the same function is computed on
de-quantized values so that the AdderNet backward sees real-scale differences; rounding uses the
straight-through estimator.

**Latent weights (QAT).** After :meth:`QuantAdderConv2d.unfold` the parameter holds the unclamped
full-precision weights; the forward pass clamps them into the fold interval and adds the fold bias
``-Σ|W − clamp(W)|`` computed from them (Theorem 1: the same function), and the backward pass applies
the AdderNet rules to the *unclamped* weights — the straight-through estimator through the fold. The
clamped weights would break the AdderNet input gradient: on the unsigned grid every negative weight
sits at 0, so ``HardTanh(W' − X) = −X`` for ~43 % of the output channels alike instead of ``≈ −1``
for negative and ``≈ +1`` for positive weights; the input gradient then carries the all-channel sum
of the output gradient and grows block by block (``scripts/qat_gradient_norms.py``).
:meth:`QuantAdderConv2d.fold` returns to the clamped form the integer export reads.
:meth:`QuantAdderConv2d.learn_ranges` also lets the shared ranges train (LSQ); the fold interval then
follows them, and ``fold()`` stores the learned ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.functional import adaptive_scale, adder_conv2d, adder_conv2d_latent
from .uniform import fake_quantize, int_range, quantize_int, round_ste, scale_for_range


def window_sum(x: torch.Tensor, kernel, stride, padding, dilation, groups: int = 1) -> torch.Tensor:
    """Σ over each receptive field and every input channel: a channel sum, then an all-ones box filter
    (additions only in hardware). With conv ``groups``, one sum per group of input channels: (N, groups, …)."""
    ones = torch.ones(groups, 1, *kernel, dtype=x.dtype, device=x.device)
    sums = x.sum(1, keepdim=True) if groups == 1 else x.unflatten(1, (groups, -1)).sum(2)
    return F.conv2d(sums, ones, stride=stride, padding=padding, dilation=dilation, groups=groups)


class QuantAdderConv2d(nn.Module):
    """Fake-quantized adder layer with group-shared scales; built by :func:`adderquant.quantize`."""

    def __init__(self, weight: torch.Tensor, stride, padding, dilation, *, bits: int, group_of: torch.Tensor,
                 ranges: torch.Tensor, clamp_bias: torch.Tensor | None, lossless_act_clamp: bool = False,
                 eta: float | None = 0.2, signed: bool = True, grid: str = "uniform", weight_grid: str = "shared",
                 clamp_interval: tuple[torch.Tensor, torch.Tensor] | None = None, conv_groups: int = 1):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.kernel_size = tuple(weight.shape[2:])
        if conv_groups < 1 or weight.shape[0] % conv_groups:
            raise ValueError(f"conv_groups={conv_groups} must divide the {weight.shape[0]} output channels")
        # conv_groups: nn.Conv2d's groups (weight (O, C/conv_groups, kh, kw)); `groups` is the scale groups'
        self.conv_groups = conv_groups
        self.in_channels, self.out_channels = weight.shape[1] * conv_groups, weight.shape[0]
        self.bits, self.eta, self.lossless_act_clamp, self.signed = bits, eta, lossless_act_clamp, signed
        if grid not in ("uniform", "apot"):
            raise ValueError(f"grid must be 'uniform' or 'apot', got {grid!r}")
        self.grid = grid
        if weight_grid not in ("shared", "double_step"):
            raise ValueError(f"weight_grid must be 'shared' or 'double_step', got {weight_grid!r}")
        if weight_grid == "double_step" and (signed or grid != "uniform" or lossless_act_clamp):
            raise ValueError("weight_grid='double_step' needs signed=False (unsigned activations), the uniform "
                             "grid and no lossless activation clamp")
        self.weight_grid = weight_grid
        if grid == "apot":
            from .apot import levels

            self.register_buffer("levels", levels(bits, "apot", signed=signed), persistent=False)
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("group_of", group_of.to(torch.long))
        self.register_buffer("ranges", ranges.to(torch.float32))  # r_j, one per group
        self.register_buffer("clamp_bias", torch.zeros(weight.shape[0]) if clamp_bias is None else clamp_bias.float())
        # The weight clamp's interval per output channel (float64, as the fold was computed); derived from
        # the quantizer's facts, so not saved: a re-quantization rebuilds it.
        lo, hi = clamp_interval if clamp_interval is not None else (None, None)
        self.register_buffer("clamp_lo", None if lo is None else lo.double().reshape(-1, 1, 1, 1), persistent=False)
        self.register_buffer("clamp_hi", None if hi is None else hi.double().reshape(-1, 1, 1, 1), persistent=False)
        self.latent = False

    @property
    def groups(self) -> int:
        return int(self.ranges.numel())

    def int_bounds(self) -> tuple[int, int]:
        """``(q_n, q_p)`` of the integer grid shared by weights and activations."""
        return int_range(self.bits, self.signed)

    @property
    def learns_ranges(self) -> bool:
        return "range_values" in self._parameters

    def current_ranges(self) -> torch.Tensor:
        """``r_j`` per group: the stored buffer, or while the ranges learn (QAT) the parameter's values."""
        if self.learns_ranges:
            return self._learned().detach()[self.range_index]
        return self.ranges

    def _learned(self) -> torch.Tensor:
        """The range parameters, kept ≥ 1e-8 (the calibration's floor): an SGD step may overshoot 0."""
        return self.range_values.clamp_min(1e-8)

    def scales(self) -> torch.Tensor:
        return scale_for_range(self.current_ranges(), self.bits, self.signed)

    def channel_scales(self) -> torch.Tensor:
        return self.scales()[self.group_of]

    @property
    def double_step(self) -> bool:
        return getattr(self, "weight_grid", "shared") == "double_step"

    def _interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fold interval per output channel (float64): as recorded, or while the ranges learn the
        grid's edges ``[q_n·s_j, q_p·s_j]`` of the current ranges (Theorem 1 holds for any ``s_j``)."""
        if not self.learns_ranges or not torch.isfinite(self.clamp_hi).all():
            return self.clamp_lo, self.clamp_hi
        return self._grid_edges()

    def _grid_edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_n·s_j, q_p·s_j)`` per output channel in float64: the interval the quantized activations
        occupy (``clamp_to='representable'``)."""
        qn, qp = self.int_bounds()
        s = self.channel_scales().double().view(-1, 1, 1, 1)
        return qn * s, qp * s

    def _clamped_latent(self) -> torch.Tensor:
        """The latent weights clamped into the fold interval, in float64 (as the PTQ fold computes it)."""
        lo, hi = self._interval()
        return torch.minimum(torch.maximum(self.weight.detach().double(), lo), hi)

    def folded_weight(self) -> torch.Tensor:
        """The weights the grid sees: the parameter itself, or with latent weights their clamp (no gradient:
        the backward pass differentiates the latent weights)."""
        if not self.latent:
            return self.weight
        return self._clamped_latent().to(self.weight.dtype)

    def fold_bias(self) -> torch.Tensor:
        """The bias of the layer: the stored fold bias plus, with latent weights, ``-Σ|W − clamp(W)|``."""
        if not self.latent:
            return self.clamp_bias
        w = self.weight.detach().double()
        return (self.clamp_bias.double() - (w - self._clamped_latent()).abs().flatten(1).sum(1)).float()

    def unfold(self, latent: torch.Tensor) -> None:
        """Hold the unclamped full-precision weights ``latent`` (QAT): same forward function, the AdderNet
        backward on the latent weights. Where a stored code is not the nearest rounding of the clamped
        latent weight (learned rounding chose it), the latent weight is the stored one, so the codes and
        the fold stay as they were. Needs the clamp interval the quantizer recorded."""
        if self.grid != "uniform":
            raise NotImplementedError("latent weights are implemented for the uniform grid only")
        if tuple(latent.shape) != tuple(self.weight.shape):
            raise ValueError(f"latent weights of shape {tuple(latent.shape)} for a layer of {tuple(self.weight.shape)}")
        if self.clamp_lo is None:  # no weight clamp: the latent interval is unbounded
            inf = torch.full((self.out_channels, 1, 1, 1), float("inf"), dtype=torch.float64, device=latent.device)
            self.clamp_lo, self.clamp_hi = -inf, inf
        with torch.no_grad():
            stored, codes = self.weight.detach().clone(), self.int_weight().detach()
            self.weight.copy_(latent)
            self.clamp_bias.zero_()
            self.latent = True
            moved = self.int_weight() != codes  # codes that are not nearest rounding: learned rounding's
            self.weight[moved] = stored[moved]  # inside the interval (never a clamped weight): same function

    def fold(self) -> None:
        """Back to the clamped weights and a stored fold bias (what :func:`adderquant.integer.export` reads);
        learned ranges become the stored ones."""
        if not self.latent:
            return
        bias = self.fold_bias()
        with torch.no_grad():
            self.clamp_lo, self.clamp_hi = self._interval()
            self.weight.copy_(self._clamped_latent().to(self.weight.dtype))
            self.clamp_bias.copy_(bias)
            if self.learns_ranges:
                self.ranges.copy_(self.current_ranges())
                del self.range_values, self.range_index
        self.latent = False

    def learn_ranges(self) -> None:
        """Train the shared ranges (QAT, LSQ on the activation grid, Esser et al. 2020): groups that share
        a range keep sharing one parameter, so the one-shared-scale constraint and the number of adder
        calls stay as calibrated. The fold interval follows the ranges, so this needs latent weights.

        The range's gradient comes from the activation quantizer only (LSQ's rounding residual inside
        the grid, ``q_p`` where activations clip), scaled by ``1/sqrt(q_p·features)``: on the weight side
        the fold keeps the function independent of the range for every clamped weight (Theorem 1), and
        the AdderNet weight gradient is a full-precision proxy that would not respect that."""
        if not self.latent:
            raise ValueError("learnable ranges need latent weights: call unfold() first")
        if self.double_step or self.grid != "uniform" or self.lossless_act_clamp:
            raise NotImplementedError("learnable ranges are implemented for the shared uniform grid without "
                                      "the lossless activation clamp")
        if self.learns_ranges:
            return
        if torch.isfinite(self.clamp_hi).all():
            lo, hi = self._grid_edges()
            if not (torch.allclose(self.clamp_lo, lo) and torch.allclose(self.clamp_hi, hi)):
                raise ValueError("learnable ranges need the weight clamp at the grid's edges "
                                 "(clamp_to='representable'), not the paper's literal interval")
        values, index = torch.unique(self.ranges, return_inverse=True)
        self.range_values = nn.Parameter(values.clone())
        self.register_buffer("range_index", index)

    def int_weight(self) -> torch.Tensor:
        """w̄ per channel with its group's scale, as integer-valued float (STE in training); for the
        double-step grid ``w_q`` on the signed grid with step ``2·s_j``."""
        weight = self.folded_weight()
        if self.double_step:  # the formula in float64: ties (clamped weights at −r_x) go to even, exactly
            qn, qp = int_range(self.bits, True)
            r = self.ranges.double()[self.group_of].view(-1, 1, 1, 1)
            codes = round_ste(weight.double() * (2**self.bits - 1) / (2 * r))
            return torch.clamp(codes, qn, qp).to(weight.dtype)
        return quantize_int(weight, self.channel_scales().view(-1, 1, 1, 1), self.bits, self.signed)

    def acc_weight(self) -> torch.Tensor:
        """The weight operand of the integer accumulator, in units of the activation step ``s_j``:
        ``w̄`` (shared grid) or ``2·w_q`` (double step)."""
        w = self.int_weight()
        return 2 * w if self.double_step else w

    def acc_weight_bounds(self) -> tuple[int, int]:
        """The range ``acc_weight`` can take: ``[q_n, q_p]``, or ``[−2^b, 2^b − 2]`` for the double step."""
        if self.double_step:
            qn, qp = int_range(self.bits, True)
            return 2 * qn, 2 * qp
        return self.int_bounds()

    def excess(self, x_wide: torch.Tensor) -> torch.Tensor:
        qn, qp = self.int_bounds()
        return (x_wide - qp).clamp_min(0) + (qn - x_wide).clamp_min(0)

    def scale_sets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(s, channels)`` per distinct scale: groups that share a scale share one adder call. While the
        ranges learn, one set per range parameter, its ``s`` differentiable."""
        if self.learns_ranges:
            per_channel = self.range_index[self.group_of]
            return [(scale_for_range(r, self.bits, self.signed), (per_channel == k).nonzero().flatten())
                    for k, r in enumerate(self._learned())]
        scales = self.scales()
        per_channel = scales[self.group_of]
        return [(s, (per_channel == s).nonzero().flatten()) for s in torch.unique(scales)]

    def call_rows(self, idx: torch.Tensor):
        """The weight rows the adder call of scale set ``idx`` takes: ``idx`` itself, or every row of a
        grouped layer (``conv_groups > 1``): its output channels read different input channels, so the
        call covers the whole grouped layer on the set's quantized input and :meth:`call_outputs` keeps
        the set's channels (docs/quantization.md, "Grouped layers")."""
        return idx if self.conv_groups == 1 else slice(None)

    def call_outputs(self, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The set's output channels of a :meth:`call_rows` call."""
        return y if self.conv_groups == 1 else y[:, idx]

    def window_excess(self, excess: torch.Tensor, geometry) -> torch.Tensor:
        """``Σ_window Σ_channels excess`` over each output channel's own input channels, broadcastable
        to the output of a :meth:`call_rows` call."""
        g = self.conv_groups
        box = window_sum(excess, self.kernel_size, *geometry, groups=g)
        return box if g == 1 else box.repeat_interleave(self.out_channels // g, 1)

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
            y = adder_conv2d(self._apot_project(x, r), w_q[self.call_rows(idx)], None, *geometry,
                             groups=self.conv_groups)
            if self.lossless_act_clamp:
                lo = -r if self.signed else torch.zeros_like(r)
                excess = ((x - r).clamp_min(0) + (lo - x).clamp_min(0)).detach()
                y = y - self.window_excess(excess, geometry)
            if out is None:
                out = x.new_empty(x.shape[0], self.out_channels, y.shape[2], y.shape[3])
            out[:, idx] = self.call_outputs(y, idx)
        return out + self.clamp_bias.to(x.dtype).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid == "apot":
            return self._forward_apot(x)
        w_int = self.acc_weight().to(x.dtype)
        train = self.training and torch.is_grad_enabled()
        if train:  # de-quantized weights; the AdderNet η rescaling applies to the whole layer once
            w_full = w_int * self.channel_scales().view(-1, 1, 1, 1).to(x.dtype)
            w_grad = self.weight.view_as(self.weight) if self.latent else w_full  # what the backward differentiates
            if w_grad.requires_grad and self.eta is not None:
                w_grad.register_hook(lambda g: adaptive_scale(g, self.eta))
        qn, qp = self.int_bounds()
        geometry = (self.stride, self.padding, self.dilation)
        out, cg = None, self.conv_groups
        sets = self.scale_sets()
        for s, idx in sets:
            s, rows = s.to(x.dtype), self.call_rows(idx)
            if train:
                if self.learns_ranges:  # LSQ's gradient scale: the range's step matches the weights'
                    g = (x[0].numel() * qp) ** -0.5
                    s = s.detach() + (s - s.detach()) * g  # the value exactly s
                x_q = fake_quantize(x, s, self.bits, self.signed)
                if self.latent:
                    y = adder_conv2d_latent(x_q, w_full[rows].detach(), w_grad[rows], *geometry, groups=cg)
                else:
                    y = adder_conv2d(x_q, w_full[rows], None, *geometry, groups=cg)
            else:  # integer-valued operands: the accumulator is exact, as in the integer engine
                x_wide = torch.round(x / s)
                y = adder_conv2d(x_wide.clamp(qn, qp), w_int[rows], None, *geometry, groups=cg) * s
            if self.lossless_act_clamp:
                excess = self.excess(torch.round(x / s).detach() if train else x_wide)
                y = y - self.window_excess(excess, geometry) * s
            if len(sets) == 1:  # every channel in one call: no scatter
                out = self.call_outputs(y, idx)
                break
            if out is None:
                out = x.new_empty(x.shape[0], self.out_channels, y.shape[2], y.shape[3])
            out[:, idx] = self.call_outputs(y, idx)
        bias = self.fold_bias().to(x.dtype).view(1, -1, 1, 1)
        # in place where out is a tensor of its own (not a kernel's view): one activation-sized allocation
        # less per layer, which was a third of QAT's extra cost over a training step (bench_qat.py)
        return out.add_(bias) if out._base is None else out + bias

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bits={self.bits}, "
                f"groups={self.groups}, signed={self.signed}, grid={self.grid}, "
                + (f"conv_groups={self.conv_groups}, " if self.conv_groups != 1 else "")
                + (f"weight_grid={self.weight_grid}, " if self.double_step else "")
                + f"lossless_act_clamp={self.lossless_act_clamp}")
