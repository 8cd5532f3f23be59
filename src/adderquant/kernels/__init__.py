"""The single dispatch point for adder arithmetic.

Every adder computation in the package goes through the functions below. A backend is an
object with a ``name``, ``supports(op, *tensors) -> bool`` and any of the methods ``forward``,
``grad_input``, ``grad_weight``, ``int_forward`` (same signatures as the functions here, geometry
already normalised to pairs), ``requant`` and ``quantize`` (the integer engine's element-wise ops)
and ``fake_quant``/``masked_grad`` (QAT's activation quantiser and its backward).
The pure-PyTorch ``reference`` backend implements all of them and is what every faster backend is
tested against.

Grouped layers (``groups`` as in ``nn.Conv2d``: weight (O, C/groups, kh, kw), output channel block g
reads input channel block g only): a backend that lists an op in ``grouped_ops`` takes a ``groups=``
keyword for it; for any other backend (the Triton one) and for ``int_forward`` the dispatch calls the
dense op once per group on the channel slices and concatenates the results. ``groups=1`` calls every
backend exactly as before.

Selection: the first registered backend (fastest first) that supports the call, unless
``ADDERQUANT_BACKEND`` or :func:`use_backend` names one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import reference

Pair = tuple[int, int]
_BACKENDS: list = []
_forced: str | None = None


def register(backend, first: bool = True) -> None:
    """Add a backend; ``first`` puts it ahead of those already registered (faster ones go first)."""
    global _BACKENDS
    _BACKENDS = [b for b in _BACKENDS if b.name != backend.name]
    _BACKENDS.insert(0 if first else len(_BACKENDS), backend)


def available_backends() -> list[str]:
    return [b.name for b in _BACKENDS]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force one backend inside the block (``None`` restores automatic choice)."""
    global _forced
    if name is not None and name not in available_backends():
        raise ValueError(f"unknown adder backend {name!r}; available: {available_backends()}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _choose(op: str, *tensors: torch.Tensor):
    wanted = _forced or os.environ.get("ADDERQUANT_BACKEND") or None
    if wanted == "auto":
        wanted = None
    for backend in _BACKENDS:
        if wanted is not None and backend.name != wanted:
            continue
        if hasattr(backend, op) and backend.supports(op, *tensors):
            return backend
    return reference.BACKEND  # a forced backend that cannot take the call falls back too


def _pick(op: str, *tensors: torch.Tensor):
    return getattr(_choose(op, *tensors), op)


def backend_name(op: str, *tensors: torch.Tensor) -> str:
    """The name of the backend that would serve ``op`` (``"forward"``, ``"int_forward"``, ...) on these
    tensors now, honouring :func:`use_backend` and ``ADDERQUANT_BACKEND``."""
    return _choose(op, *tensors).name


def _pair(v) -> Pair:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _check_groups(groups: int, x: torch.Tensor, weight: torch.Tensor) -> int:
    groups = int(groups)
    if groups < 1 or weight.shape[0] % groups or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"adder kernels: groups={groups} does not fit input channels {x.shape[1]}, weight "
                         f"{tuple(weight.shape)} (need C = groups·weight.shape[1] and O divisible by groups)")
    return groups


def _run(op: str, groups: int, grad_out, x, weight, geometry) -> torch.Tensor:
    """One backend call, or one per group on channel slices when the backend has no grouped ``op``."""
    tensors = (x, weight) if grad_out is None else (grad_out, x, weight)
    if groups == 1:
        return _pick(op, *tensors)(*tensors, *geometry)
    backend = _choose(op, *tensors)
    if op in getattr(backend, "grouped_ops", ()):
        return getattr(backend, op)(*tensors, *geometry, groups=groups)
    cg, og = x.shape[1] // groups, weight.shape[0] // groups
    parts = []
    for g in range(groups):  # the backend is chosen for the slices (the dense int8 kernels take those)
        xs, ws = x[:, g * cg : (g + 1) * cg], weight[g * og : (g + 1) * og]
        sliced = (xs, ws) if grad_out is None else (grad_out[:, g * og : (g + 1) * og], xs, ws)
        parts.append(_pick(op, *sliced)(*sliced, *geometry))
    return torch.cat(parts, dim=0 if op == "grad_weight" else 1)


def adder_forward(x, weight, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``Y[n,o,p] = -Σ_k |X_unf[n,k,p] - W[o,k]|`` (no bias, no validation: see nn.functional); with
    ``groups``, k runs over output channel o's group of input channels only."""
    geometry = (_pair(stride), _pair(padding), _pair(dilation))
    return _run("forward", _check_groups(groups, x, weight), None, x, weight, geometry)


def adder_grad_input(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``dX_unf[n,k,p] = Σ_o G[n,o,p] · HardTanh(W[o,k] - X_unf[n,k,p])``, folded back to X's shape
    (o over the output channels of k's group)."""
    geometry = (_pair(stride), _pair(padding), _pair(dilation))
    return _run("grad_input", _check_groups(groups, x, weight), grad_out, x, weight, geometry)


def adder_grad_weight(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``dW[o,k] = Σ_{n,p} G[n,o,p] · (X_unf[n,k,p] - W[o,k])`` — the full-precision AdderNet gradient."""
    geometry = (_pair(stride), _pair(padding), _pair(dilation))
    return _run("grad_weight", _check_groups(groups, x, weight), grad_out, x, weight, geometry)


def int_adder_conv2d(x_q, w_q, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """Integer adder layer: ``acc[n,o,p] = -Σ_k |x_q - w_q|`` in int32; padding is a real zero input.

    ``x_q`` is int8 or uint8 (N, C, H, W), ``w_q`` int8 (O, C/groups, kh, kw); the result is exact. Grouped
    layers run the dense integer kernel once per group on channel slices.
    """
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if t.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32):
            raise TypeError(f"int_adder_conv2d: {name} must be an integer tensor, got {t.dtype}")
    geometry = (_pair(stride), _pair(padding), _pair(dilation))
    return _run("int_forward", _check_groups(groups, x_q, w_q), None, x_q, w_q, geometry)


def int_requant(v, mult, shift, bias, residual=None, relu=False) -> torch.Tensor:
    """Requantise an integer accumulator ``v`` (N, C, …) to int64 fixed point, in one pass where fused:

    ``floor((v·M_c + 2^(sh_c−1)) / 2^sh_c) + B_c``, plus ``residual`` (int64, v's shape), then ReLU.
    ``mult``, ``shift``, ``bias`` are int64 per channel. Raises OverflowError when some ``|v|·max|M|``
    exceeds 2^62."""
    if v.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"int_requant: v must be int32 or int64, got {v.dtype}")
    return _pick("requant", v, mult, shift, bias)(v, mult, shift, bias, residual, relu)


def int_quantize(z, thresholds, qmin: int, dtype: torch.dtype) -> torch.Tensor:
    """``qmin + #{t ∈ thresholds : t ≤ z}`` as ``dtype``: clamped rounding of int64 ``z`` to a grid,
    read off the sorted thresholds that ``integer.runtime_numpy.quant_thresholds`` computes."""
    if z.dtype != torch.int64 or thresholds.dtype != torch.int64:
        raise TypeError(f"int_quantize: z and thresholds must be int64, got {z.dtype}, {thresholds.dtype}")
    return _pick("quantize", z, thresholds)(z, thresholds, qmin, dtype)


def fake_quant(x, scale, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·clamp(round(x/s), q_n, q_p), mask)`` with ``mask = q_n ≤ round(x/s) ≤ q_p`` (bool): QAT's
    fake quantisation and its straight-through mask in one pass where a backend fuses it; the values
    equal the PyTorch expression bit for bit (IEEE division, round half to even)."""
    return _pick("fake_quant", x, scale)(x, scale, qn, qp)


def masked_grad(g, inside) -> torch.Tensor:
    """``g`` where ``inside`` (bool, g's shape), else 0: the straight-through backward of :func:`fake_quant`."""
    return _pick("masked_grad", g, inside)(g, inside)


register(reference.BACKEND)
from . import cpu as _cpu  # noqa: E402, I001  (C extension; BACKEND is None when not built)
if _cpu.BACKEND is not None: register(_cpu.BACKEND)  # noqa: E701
from . import triton_adder as _triton  # noqa: E402, I001  (optional: BACKEND is None without triton)
if _triton.BACKEND is not None: register(_triton.BACKEND)  # noqa: E701
