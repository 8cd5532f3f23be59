"""APoT — Additive Powers-of-Two quantization (Li, Dong & Wang, ICLR 2020): level sets, projection,
and the quantizer with the paper's reparameterised clipping-threshold gradient.

Level sets (the authors' ``build_power_value``): a B-bit APoT level set is the set of sums
``a + b (+ c)`` with one term from each of k additive power-of-two bases (each base contains 0), the
bases' exponents interleaved so that every sum is distinct; the set is normalised to a largest level
of 1. B = 2: one base {0, 2^-1, 2^-2, 2^-3}; B = 3: {0, 2^-1, 2^-2, 2^-4} + {0, 2^-3}; B = 4:
{0, 2^-1, 2^-3, 2^-5} + {0, 2^-2, 2^-4, 2^-6}; B = 5 and B = 6 add a third base. ``levels(B)``
reproduces ``reference/apot-levels.json`` exactly (float64 build, normalised by division).

Which level set a b-bit tensor uses (the authors' CIFAR code):

- activations (non-negative, after ReLU): Q(b) — ``act_levels(b)``;
- weights: sign + Q(b − 1); at b = 2 the magnitude set is uniform {0, 1} — ``weight_levels(b)``.

``levels(bits, signed=True)`` gives the full signed set a b-bit weight can take (sign bit included).

Projection ``project(x, lv)``: nearest level by ``torch.searchsorted`` on the midpoints of the sorted
levels (memory O(numel), never numel × levels); the midpoints are nudged by an ulp where rounding
demands (``tie_boundaries``) so that the result equals the authors' ``argmin |x − level|`` bit for bit,
ties included: argmin takes the first minimum, i.e. on an exact tie the LOWER level. (Signed tensors
are projected as ``sign(x) · project(|x|)`` like the authors, so there a tie goes toward zero.)
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

from ..utils import check_bits

KINDS = ("apot", "pot", "uniform")
# Supported (unsigned) level-set sizes B per kind. "apot": the authors' bases exist for B = 2..6.
# "pot": the authors' non-additive set {0} ∪ {2^-i} (2^B − 1 powers); B ≤ 6 keeps 2^-(2^B-2) ≥ 2^-62.
BIT_RANGE = {"apot": (2, 6), "pot": (2, 6), "uniform": (2, 8)}


def _bases(bits: int) -> list[list[float]]:
    """The authors' additive bases for Q(bits) (``build_power_value(B, additive=True)``)."""
    a, b, c = [0.0], [0.0], [0.0]
    for i in range(3):
        if bits == 2:
            a.append(2.0 ** (-i - 1))
        elif bits == 3:
            if i < 2:
                a.append(2.0 ** (-i - 1))
            else:
                b.append(2.0 ** (-i - 1))
                a.append(2.0 ** (-i - 2))
        elif bits == 4:
            a.append(2.0 ** (-2 * i - 1))
            b.append(2.0 ** (-2 * i - 2))
        elif bits == 5:
            if i < 2:
                a.append(2.0 ** (-2 * i - 1))
                b.append(2.0 ** (-2 * i - 2))
            else:
                c.append(2.0 ** (-2 * i - 1))
                a.append(2.0 ** (-2 * i - 2))
                b.append(2.0 ** (-2 * i - 3))
        elif bits == 6:
            a.append(2.0 ** (-3 * i - 1))
            b.append(2.0 ** (-3 * i - 2))
            c.append(2.0 ** (-3 * i - 3))
    return [base for base in (a, b, c) if len(base) > 1]


def _check_bits(bits, kind: str, signed: bool) -> int:
    if kind not in KINDS:
        raise ValueError(f"level-set kind must be one of {KINDS}, got {kind!r}")
    lo, hi = BIT_RANGE[kind]
    if signed:  # sign bit + a (bits − 1)-bit magnitude set; 2-bit signed is {−1, 0, 1} for every kind
        lo, hi = 2, hi + 1
    return check_bits(bits, lo, hi, f"{kind} {'signed (sign + magnitude) ' if signed else ''}bits")


@cache
def _unsigned_table(bits: int, kind: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """(sorted normalised levels, number of non-zero power-of-two terms of each) in float64."""
    if kind == "uniform":
        n = 2**bits - 1
        return tuple(k / n for k in range(n + 1)), tuple(bin(k).count("1") for k in range(n + 1))
    if kind == "pot":
        raw = {0.0: 0} | {2.0 ** (-i - 1): 1 for i in range(2**bits - 1)}
    else:
        raw: dict[float, int] = {}
        for combo in itertools.product(*_bases(bits)):
            value = sum(combo)
            terms = sum(1 for t in combo if t != 0.0)
            raw[value] = min(terms, raw.get(value, terms))
    top = max(raw)
    items = sorted((v / top, t) for v, t in raw.items())
    return tuple(v for v, _ in items), tuple(t for _, t in items)


def _signed_table(bits: int, kind: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    mag, terms = _unsigned_table(1, "uniform") if bits == 2 else _unsigned_table(bits - 1, kind)
    return (tuple(-v for v in reversed(mag[1:])) + mag, tuple(reversed(terms[1:])) + terms)


def levels(bits: int, kind: str = "apot", signed: bool = False, *, dtype: torch.dtype = torch.float32,
           device=None) -> torch.Tensor:
    """Sorted normalised level set (largest level 1).

    ``signed=False``: the B-bit set Q(B) (``kind="apot"``, B = 2..6, as ``apot-levels.json``), the
    power-of-two set {0, 2^0, 2^-1, …, 2^-(2^B − 2)} (``"pot"``, B = 2..6) or the uniform set
    {k / (2^B − 1)} (``"uniform"``, B = 2..8). ``signed=True``: the levels of a ``bits``-bit signed
    tensor, ±(magnitude set of ``bits − 1`` bits) — uniform {0, 1} at 2 bits, as the authors' weights.
    """
    _check_bits(bits, kind, signed)
    values, _ = _signed_table(bits, kind) if signed else _unsigned_table(bits, kind)
    return torch.tensor(values, dtype=torch.float64).to(dtype=dtype, device=device)


def terms_per_level(bits: int, kind: str = "apot", signed: bool = False) -> torch.Tensor:
    """Number of non-zero power-of-two terms of each level of ``levels(bits, kind, signed)`` (int64,
    aligned with it). Multiplying by a level with t terms costs t shifts and t − 1 adds (plus the sign);
    for ``"uniform"`` this is the popcount of the integer code (shift-add multiplication)."""
    _check_bits(bits, kind, signed)
    _, terms = _signed_table(bits, kind) if signed else _unsigned_table(bits, kind)
    return torch.tensor(terms, dtype=torch.int64)


def act_levels(bits: int, kind: str = "apot", **kw) -> torch.Tensor:
    """Level set of b-bit (non-negative) activations: Q(b)."""
    return levels(bits, kind, **kw)


def weight_levels(bits: int, kind: str = "apot", **kw) -> torch.Tensor:
    """MAGNITUDE level set of b-bit weights: Q(b − 1); uniform {0, 1} at b = 2 (the authors')."""
    _check_bits(bits, kind, signed=True)
    if bits == 2:
        return torch.tensor([0.0, 1.0], dtype=kw.get("dtype", torch.float32), device=kw.get("device"))
    return levels(bits - 1, kind, **kw)


def tie_boundaries(lv: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between adjacent sorted levels, exact in ``lv``'s dtype: ``b_i`` is the LARGEST
    x with ``|x − l_i| <= |x − l_{i+1}|`` (computed in that dtype), so ``x <= b_i`` ⇔ argmin keeps l_i.

    Starts at the rounded midpoint and walks a few ulps (the predicate is monotone in x; rounding moves
    the true boundary by at most an ulp or two). No host synchronisation: fixed iteration counts.
    """
    lo, hi = lv[:-1], lv[1:]

    def keeps_lower(x):
        return (x - lo).abs() <= (x - hi).abs()

    b = (lo + hi) / 2
    up, down = torch.full_like(b, float("inf")), torch.full_like(b, float("-inf"))
    for _ in range(4):
        b = torch.where(keeps_lower(b), b, torch.nextafter(b, down))
    for _ in range(4):
        nxt = torch.nextafter(b, up)
        b = torch.where(keeps_lower(nxt), nxt, b)
    return b


def project(x: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """Nearest level of the sorted 1-D ``lv`` for every element of ``x``; exact ties → the lower level
    (the first minimum of ``argmin |x − lv|``, as the authors' code). One ``torch.searchsorted`` on the
    midpoints (made exact by :func:`tie_boundaries`) and one gather: O(numel) memory. ``lv`` must be
    strictly increasing in ``x``'s dtype (fp16/bf16 can merge the finest levels of Q(6) or PoT sets)."""
    if not x.is_floating_point():
        raise TypeError(f"project: x must be a floating-point tensor, got {x.dtype}")
    if lv.dim() != 1 or lv.numel() < 1:
        raise ValueError(f"project: levels must be a non-empty 1-D tensor, got shape {tuple(lv.shape)}")
    lv = lv.to(dtype=x.dtype, device=x.device)
    if lv.numel() == 1:
        return lv.expand_as(x).clone()
    # right=False: an element equal to a boundary (a tie) goes to the lower level.
    idx = torch.searchsorted(tie_boundaries(lv), x.reshape(-1))
    return lv[idx].view_as(x)


def _check_alpha(alpha) -> torch.Tensor:
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.tensor(float(alpha))
    if not alpha.is_floating_point():
        raise TypeError(f"clipping threshold must be floating point, got {alpha.dtype}")
    bad = ~(alpha.detach() > 0)  # catches NaN too
    if bool(bad.any()):
        raise ValueError(f"clipping threshold must be positive, got {alpha.detach().flatten()[:4].tolist()}")
    return alpha


class APoTQuantize(torch.autograd.Function):
    """``x_q = α · Π(clip(x / α))`` with the straight-through estimator and the paper's gradient for α.

    With ``t = x / α``, ``clip`` = clamp to [−1, 1] (``signed``: Π applied to |t|, sign restored) or
    clamp above at 1 (unsigned, activations), and ``q = Π(clip(t))`` the projected level:

    - ``∂x_q/∂x = 1`` inside the clip range, ``0`` outside (``clip_input_grad=False`` passes 1 everywhere,
      as the authors' weight quantizer does);
    - ``∂x_q/∂α = sign(t)`` outside the range (``|t| > 1``, resp. ``t > 1``) and ``q − t`` inside — the
      derivative of ``α·(clip(t) + sg[q − clip(t)])``, i.e. Π treated as identity by the STE. Summed
      over the elements (broadcast back to α's shape): the authors' ``Σ g·(sign·out + (q − t)·in)``.
    """

    @staticmethod
    def forward(ctx, x, alpha, lv, signed: bool, clip_input_grad: bool):
        t = x / alpha
        if signed:
            outside = t.abs() > 1
            tc = t.clamp(-1, 1)
            q = project(tc.abs(), lv) * tc.sign()
        else:
            outside = t > 1
            q = project(t.clamp(max=1), lv)
        ctx.save_for_backward(t, q, outside)
        ctx.clip_input_grad = clip_input_grad
        ctx.alpha_shape = alpha.shape
        return q * alpha

    @staticmethod
    def backward(ctx, grad):
        t, q, outside = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.masked_fill(outside, 0) if ctx.clip_input_grad else grad
        if ctx.needs_input_grad[1]:
            d_alpha = torch.where(outside, t.sign(), q - t)
            grad_alpha = (grad * d_alpha).sum_to_size(ctx.alpha_shape)
        return grad_x, grad_alpha, None, None, None


def apot_fake_quant(x: torch.Tensor, alpha, lv: torch.Tensor, *, signed: bool = False,
                    clip_input_grad: bool = True) -> torch.Tensor:
    """Checked entry point of :class:`APoTQuantize` (see there for the forward and the gradients).

    ``lv`` is the magnitude level set (normalised, sorted, from :func:`levels`); ``alpha`` the clipping
    threshold (> 0; a scalar or a tensor broadcastable to ``x``).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"APoT quantization needs a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    alpha = _check_alpha(alpha)
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return APoTQuantize.apply(x, alpha, lv, bool(signed), bool(clip_input_grad))
    return _forward(x, alpha, lv, signed)  # inference: no masks or saved tensors


def _forward(x, alpha, lv, signed):
    t = x / alpha
    if signed:
        tc = t.clamp(-1, 1)
        return project(tc.abs(), lv).mul_(tc.sign()).mul_(alpha)
    return project(t.clamp_(max=1), lv).mul_(alpha)


def normalize_weight(w: torch.Tensor) -> torch.Tensor:
    """``(w − mean(w)) / std(w)`` over the whole tensor, std unbiased (torch's default), the statistics
    detached from the graph (the authors use ``weight.data.mean()``/``.std()``)."""
    if not w.is_floating_point():
        raise TypeError(f"weight normalisation needs a floating-point tensor, got {w.dtype}")
    if w.numel() < 2:
        raise ValueError("weight normalisation needs at least two weights (unbiased std)")
    d = w.detach()
    return (w - d.mean()) / d.std()


__all__ = ["APoTQuantize", "act_levels", "apot_fake_quant", "levels", "normalize_weight", "project",
           "terms_per_level", "tie_boundaries", "weight_levels"]
