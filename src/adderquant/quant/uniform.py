"""Symmetric uniform quantization (paper Eq. 3–4) with a straight-through estimator."""

from __future__ import annotations

import torch

from .. import kernels


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """``[q_n, q_p] = [-2^(b-1), 2^(b-1) - 1]`` (signed) or ``[0, 2^b - 1]`` (unsigned)."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def scale_for_range(r: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """``s = 2·r / (2^b − 1)`` for a signed range ``[-r, r]``; ``r / (2^b − 1)`` for ``[0, r]``."""
    return (2 * r if signed else r) / (2**bits - 1)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity in the backward pass (STE, Bengio et al. 2013)."""
    return _RoundSTE.apply(x)


def quantize_int(v: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """``clamp(round(v / s), q_n, q_p)`` as integer-valued floats, differentiable by STE.

    The clamp passes no gradient outside the range (the usual STE with clipping)."""
    qn, qp = int_range(bits, signed)
    return torch.clamp(round_ste(v / scale), qn, qp)


class _FakeQuantSTE(torch.autograd.Function):
    """``s·clamp(round(v/s), q_n, q_p)`` in one node: the STE passes ``g`` where ``round(v/s)`` lies in
    the grid and 0 outside; the scale, when it learns, gets LSQ's gradient (Esser et al. 2020)
    ``Σ g·(round(v/s) − v/s)`` inside the grid and ``Σ g·q_n`` / ``Σ g·q_p`` outside. The forward is
    :func:`adderquant.kernels.fake_quant` (one pass where fused); it saves a byte mask (plus ``v`` when
    the scale learns: the backward recomputes ``v/s`` and the codes) instead of the chain of divide,
    round, clamp and multiply nodes, each with its own saved input: QAT's activations pass through one
    per layer."""

    @staticmethod
    def forward(ctx, v, scale, qn, qp):
        ctx.learn, ctx.grid = scale.requires_grad, (qn, qp)
        out, inside = kernels.fake_quant(v, scale.detach(), qn, qp)
        ctx.save_for_backward(inside, v if ctx.learn else None, scale if ctx.learn else None)
        return out

    @staticmethod
    def backward(ctx, g):
        inside, v, scale = ctx.saved_tensors
        grad_v = kernels.masked_grad(g, inside) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.learn:
            t = v / scale
            codes = torch.round(t).clamp_(*ctx.grid)
            grad_s = (g * torch.where(inside, codes - t, codes)).sum_to_size(scale.shape)
        return grad_v, grad_s, None, None


def fake_quantize(v: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """``s · clamp(round(v / s), q_n, q_p)`` (Eq. 4): the value of ``quantize_int(v, s)·s``, bit for bit,
    as one autograd node (STE; LSQ's gradient for a scale that requires grad)."""
    qn, qp = int_range(bits, signed)
    scale = torch.as_tensor(scale, dtype=v.dtype, device=v.device)
    return _FakeQuantSTE.apply(v, scale, qn, qp)
