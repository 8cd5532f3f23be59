"""Pure-PyTorch adder backend: the reference every other backend is tested against.

Memory stays within a small multiple of the unfolded input: the forward uses ``torch.cdist(p=1)``
(a distance primitive that never builds the ``N × O × K × P`` difference tensor); the input
gradient walks the output channels in chunks sized so the temporary is at most ``_CHUNK_FACTOR``
unfolded inputs; the weight gradient is two matrix products, because
``Σ G·(X − W) = G·Xᵀ − W·ΣG``. The integer engine's element-wise ops (requantisation, clamped
quantisation) are here too, as plain int64 tensor formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import conv_output_size

_CHUNK_FACTOR = 4  # temporaries stay within this many copies of the unfolded input
INT64_LIMIT = 2**62  # |v·M| must stay below this in requantisation (headroom for the rounding add)


def check_int64_range(v: torch.Tensor, m: int, what: str) -> None:
    """Raise OverflowError when some ``|v|·m`` would exceed ``INT64_LIMIT`` (int64 products wrap silently)."""
    if m and v.numel():
        lo, hi = torch.aminmax(v)
        if max(-int(lo), int(hi)) > INT64_LIMIT // m:
            raise OverflowError(f"{what}: |value| {max(-int(lo), int(hi))} times multiplier {m} leaves int64")


def _unfold(x, kernel, stride, padding, dilation):
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, K, P)


def out_hw(x, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of an adder layer on ``x`` (N, C, H, W)."""
    return tuple(conv_output_size(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in (0, 1))


class _Reference:
    name = "reference"
    grouped_ops = ("forward", "grad_input", "grad_weight")  # groups (nn.Conv2d's) natively, as a batch dim

    def supports(self, op, *tensors):
        return True

    def forward(self, x, weight, stride, padding, dilation, groups=1):
        n, o, g = x.shape[0], weight.shape[0], groups
        kernel = tuple(weight.shape[2:])
        ho, wo = out_hw(x, kernel, stride, padding, dilation)
        cols = _unfold(x, kernel, stride, padding, dilation).transpose(1, 2)  # (N, P, K), K in (c, i, j) order
        w = weight.reshape(o, -1).to(cols.dtype)
        if g == 1:
            dist = torch.cdist(cols.contiguous(), w.unsqueeze(0).expand(n, -1, -1).contiguous(), p=1)
            return dist.neg_().transpose(1, 2).reshape(n, o, ho, wo)
        kg, p = w.shape[1], cols.shape[1]  # group g's columns are [g·kg, (g+1)·kg): channels are outermost
        cols = cols.reshape(n, p, g, kg).transpose(1, 2).reshape(n * g, p, kg)
        wg = w.reshape(1, g, o // g, kg).expand(n, -1, -1, -1).reshape(n * g, o // g, kg)
        dist = torch.cdist(cols.contiguous(), wg.contiguous(), p=1)  # (N·G, P, O/G)
        return dist.neg_().transpose(1, 2).reshape(n, o, ho, wo)

    def grad_input(self, grad_out, x, weight, stride, padding, dilation, groups=1):
        n, o, g = x.shape[0], weight.shape[0], groups
        kernel = tuple(weight.shape[2:])
        cols = _unfold(x, kernel, stride, padding, dilation)  # (N, K, P)
        kg, p = weight[0].numel(), cols.shape[2]
        colsg = cols.reshape(n, g, 1, kg, p)
        gg = grad_out.reshape(n, g, o // g, 1, p).to(cols.dtype)
        w = weight.reshape(g, o // g, kg, 1).to(cols.dtype)
        grad_cols = torch.zeros((n, g, kg, p), dtype=cols.dtype, device=cols.device)
        step = max(1, _CHUNK_FACTOR)
        for start in range(0, o // g, step):
            diff = (w[:, start : start + step].unsqueeze(0) - colsg).clamp_(-1, 1)  # (N, G, c, Kg, P)
            grad_cols += (diff * gg[:, :, start : start + step]).sum(2)
        return F.fold(grad_cols.reshape(n, g * kg, p), x.shape[2:], kernel, dilation=dilation, padding=padding,
                      stride=stride)

    def grad_weight(self, grad_out, x, weight, stride, padding, dilation, groups=1):
        n, o, g = x.shape[0], weight.shape[0], groups
        kernel = tuple(weight.shape[2:])
        cols = _unfold(x, kernel, stride, padding, dilation)  # (N, K, P)
        kg = weight[0].numel()
        gr = grad_out.reshape(n, g, o // g, -1).to(cols.dtype)
        gx = torch.einsum("ngop,ngkp->gok", gr, cols.reshape(n, g, kg, -1)).reshape(o, kg)
        gsum = gr.sum(dim=(0, 3)).reshape(o)
        w = weight.reshape(o, -1).to(cols.dtype)
        return (gx - w * gsum[:, None]).reshape(weight.shape).to(weight.dtype)

    def int_forward(self, x_q, w_q, stride, padding, dilation):
        """Exact: float64 holds every partial sum of int8/uint8/int16 differences exactly."""
        acc = self.forward(x_q.to(torch.float64), w_q.to(torch.float64), stride, padding, dilation)
        return acc.to(torch.int32)

    def fake_quant(self, x, scale, qn, qp):
        """``(s·clamp(round(x/s), q_n, q_p), round(x/s) ∈ [q_n, q_p])``: the fake-quantized values and the
        straight-through mask."""
        codes = torch.round(x / scale)
        inside = (codes >= qn) & (codes <= qp)
        return codes.clamp_(qn, qp).mul_(scale), inside

    def masked_grad(self, g, inside):
        return g * inside

    def requant(self, v, mult, shift, bias, residual, relu):
        """``floor((v·M + 2^(sh−1)) / 2^sh) + B`` per channel (dim 1) in int64, then ``+ residual``, ReLU."""
        check_int64_range(v, int(mult.abs().max()) if mult.numel() else 0, "requant")
        mult, shift, bias = (t.view((1, -1) + (1,) * (v.dim() - 2)) for t in (mult, shift, bias))
        y = v.to(torch.int64) * mult
        y += (torch.ones_like(shift) << shift) >> 1
        y >>= shift
        y += bias
        if residual is not None:
            y += residual
        return y.clamp_min_(0) if relu else y

    def quantize(self, z, thresholds, qmin, dtype):
        """``qmin + #{T ≤ z}``: the clamped rounding of ``z`` read off sorted thresholds."""
        return torch.bucketize(z.contiguous(), thresholds, right=True).add_(qmin).to(dtype)


BACKEND = _Reference()
