"""Symmetric uniform quantization (paper Eq. 3–4) with a straight-through estimator."""

from __future__ import annotations

import torch


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


def fake_quantize(v: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """``s · clamp(round(v / s), q_n, q_p)`` (Eq. 4)."""
    return quantize_int(v, scale, bits, signed) * scale
