"""Functional adder convolution with the AdderNet backward.

Forward (Chen et al., CVPR 2020, Eq. 2), per output position::

    Y[n, o, p] = -Σ_{c,i,j} |X[n, c, p·s + i·d] - W[o, c, i, j]|      (+ bias[o])

Backward (the AdderNet rules, not the true derivative of |·|)::

    ∂L/∂W[o,k]   = Σ_{n,p} G[n,o,p] · (X_unf[n,k,p] - W[o,k])          full-precision difference
    ∂L/∂X_unf    = Σ_o     G[n,o,p] · HardTanh(W[o,k] - X_unf[n,k,p])   clipped, then folded to X
    adaptive lr:   ∂L/∂W ← η · sqrt(numel(W)) · ∂L/∂W / ‖∂L/∂W‖₂        (skipped when η is None)

Grouped layers (``groups`` as in ``nn.Conv2d``; depthwise: groups = C): weight (O, C/groups, kh, kw),
and output channel o sums over the C/groups input channels of its group only — in the forward and in
both gradients (∂X gathers only the output channels of its own group). η rescales the whole layer's
gradient once, as for a dense layer.

All arithmetic is done by :mod:`adderquant.kernels`, the single dispatch point for backends.
"""

from __future__ import annotations

import math

import torch

from .. import kernels

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    try:
        a, b = (int(t) for t in v)
    except (TypeError, ValueError):
        raise TypeError(f"adder_conv2d: {name} must be an int or a pair of ints, got {v!r}") from None
    return a, b


def _check(input, weight, bias, stride, padding, dilation, groups=1):
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"adder_conv2d: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"adder_conv2d: {name} must be floating point, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"adder_conv2d: {name} must be 4-D, got shape {tuple(t.shape)}")
    s, p, d = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"adder_conv2d: need stride ≥ 1, dilation ≥ 1, padding ≥ 0; got {s}, {d}, {p}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"adder_conv2d: groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups:
        raise ValueError(f"adder_conv2d: {weight.shape[0]} output channels are not divisible by groups={groups}")
    if input.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"adder_conv2d: input has {input.shape[1]} channels but weight expects {weight.shape[1] * groups}"
            + (f" ({groups} groups of {weight.shape[1]})" if groups > 1 else "")
        )
    for axis in (0, 1):
        span = d[axis] * (weight.shape[2 + axis] - 1) + 1
        padded = input.shape[2 + axis] + 2 * p[axis]
        if span > padded:
            raise ValueError(
                f"adder_conv2d: kernel spans {span} pixels but the padded input is only {padded} "
                f"({'height' if axis == 0 else 'width'})"
            )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"adder_conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return s, p, d


def adaptive_scale(grad_w: torch.Tensor, eta: float | None) -> torch.Tensor:
    """AdderNet's per-layer adaptive learning rate: rescale the gradient to norm η·sqrt(numel)."""
    if eta is None:
        return grad_w
    norm = grad_w.norm(p=2).clamp_min(1e-12)
    return grad_w * (eta * math.sqrt(grad_w.numel()) / norm)


class _AdderFunction(torch.autograd.Function):
    """Forward with ``weight``; backward by the AdderNet rules on ``latent`` when given (its gradient
    then goes to ``latent``, unscaled), else on ``weight`` with the η scaling."""

    @staticmethod
    def forward(ctx, x, weight, latent, stride, padding, dilation, eta, groups):
        ctx.latent = latent is not None
        ctx.save_for_backward(x, latent if ctx.latent else weight)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.eta = None if ctx.latent else eta
        return kernels.adder_forward(x, weight, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = kernels.adder_grad_input(grad_out, x, weight, *ctx.geometry)
        if ctx.needs_input_grad[2 if ctx.latent else 1]:
            grad_w = adaptive_scale(kernels.adder_grad_weight(grad_out, x, weight, *ctx.geometry), ctx.eta)
        grads = (None, grad_w) if ctx.latent else (grad_w, None)
        return (grad_x, *grads, None, None, None, None, None)


def adder_conv2d_latent(input, weight, latent, stride=1, padding=0, dilation=1, groups: int = 1):
    """``-Σ|X − weight|`` whose backward applies the AdderNet rules to ``latent`` instead of ``weight``.

    For a quantized layer whose ``weight`` is the clamped, rounded image of ``latent`` (the fold of
    Theorem 1 keeps the function): the straight-through estimator through clamp and rounding, with the
    input gradient ``HardTanh(latent − X)`` of the full-precision layer. The gradient reaches ``latent``
    only (no η scaling here: the caller scales the whole layer once)."""
    s, p, d = _check(input, weight, None, stride, padding, dilation, groups)
    if latent.shape != weight.shape:
        raise ValueError(f"adder_conv2d_latent: latent {tuple(latent.shape)} and weight {tuple(weight.shape)} differ")
    compute = torch.float64 if torch.float64 in (input.dtype, weight.dtype, latent.dtype) else torch.float32
    return _AdderFunction.apply(input.to(compute), weight.to(compute), latent.to(compute), s, p, d, None, groups)


def adder_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, eta: float | None = None,
                 groups: int = 1):
    """Adder convolution ``-Σ|X - W|``; shapes follow ``torch.nn.functional.conv2d``, ``groups`` included
    (weight (O, C/groups, kh, kw); it comes after ``eta`` here, so pass it by name).

    ``eta`` sets the AdderNet adaptive weight-gradient scale (``None``: plain AdderNet gradient).
    Half-precision inputs are computed in float32 and returned in their own dtype.
    """
    s, p, d = _check(input, weight, bias, stride, padding, dilation, groups)
    dtype = input.dtype
    compute = torch.float64 if torch.float64 in (input.dtype, weight.dtype) else torch.float32
    y = _AdderFunction.apply(input.to(compute), weight.to(compute), None, s, p, d, eta, groups)
    if bias is not None:
        y = y + bias.to(compute).view(1, -1, 1, 1)
    return y.to(dtype) if dtype in (torch.float16, torch.bfloat16) else y
