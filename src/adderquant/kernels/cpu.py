"""The ``cpu`` adder backend: a small C extension (``adderquant._adder_cpu``) reached through ctypes.

It serves the float32 forward and input gradient (AVX2 / AVX-512 register-blocked kernels of
``acc += |x - w|``), the weight gradient (through torch's conv2d weight gradient, see
``grad_weight``), the integer forward (``vpsadbw`` sums of absolute differences, exact int32) and
the integer engine's fused element-wise ops (requantise + residual + ReLU; threshold quantisation)
for contiguous-able CPU tensors; everything else — float64 (the tests' reference precision), other
devices and dtypes — is left to the next backend by ``supports()`` returning False or the method being absent.
The integer forward takes int8/uint8 inputs and int8/int16 weights (csrc/int_net.c, the same kernels as the
integer engine's network runner, whose ``aq_plan_*`` entry points are declared here and driven by
``adderquant.integer.cpu_plan``).

The extension is optional: when it was not built (no compiler at install time) ``BACKEND`` is
``None`` and nothing is registered. Threads follow ``torch.get_num_threads()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
from collections.abc import Iterator

import torch

from . import reference

ISA_NAMES = ("scalar", "avx2", "avx512")
_INT_X = (torch.int8, torch.uint8)
_QUANT_OUT = {torch.int8: 1, torch.uint8: 1, torch.int16: 2}


def _load() -> ctypes.CDLL | None:
    try:
        spec = importlib.util.find_spec("adderquant._adder_cpu")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    p, i64p, i = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int
    for fname, args in (
        ("aq_forward_f32", [p, p, p, i64p, i]),
        ("aq_grad_input_f32", [p, p, p, p, i64p, i]),
        ("aq_forward_f32_g", [p, p, p, i64p, ctypes.c_int64, i]),
        ("aq_grad_input_f32_g", [p, p, p, p, i64p, ctypes.c_int64, i]),
        ("aq_int_forward", [p, i, p, i, p, i64p, i]),
        ("aq_requant", [p, i, p, p, p, p, i, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, p, i]),
        ("aq_quantize", [p, ctypes.c_int64, p, ctypes.c_int64, ctypes.c_int64, i, p, i]),
        ("aq_fake_quant_f32", [p, ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_float, p, p, i]),
        ("aq_mask_f32", [p, p, ctypes.c_int64, p, i]),
        ("aq_set_isa", [i]),
        ("aq_isa", []),
        ("aq_isa_max", []),
        ("aq_has_openmp", []),
    ):
        fn = getattr(lib, fname)
        fn.argtypes, fn.restype = args, ctypes.c_int
    i64, d, dp = ctypes.c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_double)
    for fname, args, res in (  # the integer network runner (csrc/int_net.c; adderquant.integer.cpu_plan)
        ("aq_plan_new", [i64, i64, i64], p),
        ("aq_plan_free", [p], None),
        ("aq_plan_codebuf", [p, i64, i64, i64, i64, i64, i64], i),
        ("aq_plan_zbuf", [p, i64, i64, i64], i),
        ("aq_plan_buf_bytes", [p, i], i64),
        ("aq_plan_place", [p, i, i64], i),
        ("aq_plan_stem", [p, i64p, p, p], i),
        ("aq_plan_adder", [p, i64p, i, p, p, i64, p], i),
        ("aq_plan_epilogue", [p, i, p, p, p, i, i, i, i], i),
        ("aq_plan_codeout", [p, i, i, i64, i64, p, i64, d, d, dp, dp, dp], i),
        ("aq_plan_codeout_tables", [p, i, p, p, i, i], i),
        ("aq_plan_tail", [p, i, p, i64, i64, i64, p, p, p, p, i], i),
        ("aq_plan_finalize", [p, i64], i),
        ("aq_plan_run", [p, p, i64, p, i], i),
        ("aq_plan_run_op", [p, i, i64, p, p, i], i),
        ("aq_plan_num_ops", [p], i),
    ):
        fn = getattr(lib, fname)
        fn.argtypes, fn.restype = args, res
    return lib


_LIB = _load()


def isa() -> str:
    """The instruction set the kernels use now: ``scalar``, ``avx2`` or ``avx512``."""
    if _LIB is None:
        raise RuntimeError("adderquant._adder_cpu is not built")
    return ISA_NAMES[_LIB.aq_isa()]


def isa_max() -> str:
    """The best instruction set this CPU (and OS) supports."""
    if _LIB is None:
        raise RuntimeError("adderquant._adder_cpu is not built")
    return ISA_NAMES[_LIB.aq_isa_max()]


@contextlib.contextmanager
def force_isa(name: str) -> Iterator[str]:
    """Use at most the instruction set ``name`` inside the block (to test every code path)."""
    if _LIB is None:
        raise RuntimeError("adderquant._adder_cpu is not built")
    previous = _LIB.aq_isa()
    try:
        yield ISA_NAMES[_LIB.aq_set_isa(ISA_NAMES.index(name))]
    finally:
        _LIB.aq_set_isa(previous)


def _geometry(x, w, stride, padding, dilation):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = reference.out_hw(x, (kh, kw), stride, padding, dilation)
    vals = (n, c, h, wd, o, kh, kw, *stride, *padding, *dilation, ho, wo)
    return (ctypes.c_int64 * 15)(*vals), ho, wo


def _degenerate(x, w, ho, wo) -> bool:
    return min(x.shape[0], x.shape[1], w.shape[0], ho, wo) <= 0


def _cpu4(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() == 4


def _check(rc: int) -> None:
    if rc == 2:
        raise ValueError("adderquant._adder_cpu: groups do not divide the channel counts")
    if rc != 0:
        raise MemoryError("adderquant._adder_cpu: out of memory")


class _Cpu:
    name = "cpu"
    grouped_ops = ("forward", "grad_input", "grad_weight")  # groups as nn.Conv2d, in the C loops

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib

    def supports(self, op, *tensors):
        if op in ("forward", "grad_input", "grad_weight"):
            return (
                len(tensors) >= 2
                and all(_cpu4(t) and t.dtype == torch.float32 for t in tensors)
                and tensors[-1].shape[1] > 0
                and tensors[-2].shape[1] % tensors[-1].shape[1] == 0  # groups = the quotient
            )
        if op == "int_forward":
            x, w = tensors[:2]
            return (_cpu4(x) and _cpu4(w) and x.dtype in _INT_X and w.dtype in (torch.int8, torch.int16)
                    and x.shape[1] == w.shape[1])
        if op in ("requant", "quantize"):
            return all(t.device.type == "cpu" for t in tensors)
        if op == "fake_quant":
            x, scale = tensors
            return x.device.type == scale.device.type == "cpu" and x.dtype == torch.float32 and scale.numel() == 1
        if op == "masked_grad":
            g, inside = tensors
            return g.device.type == "cpu" and g.dtype == torch.float32 and g.shape == inside.shape
        return False

    def forward(self, x, weight, stride, padding, dilation, groups=1):
        geom, ho, wo = _geometry(x, weight, stride, padding, dilation)
        if _degenerate(x, weight, ho, wo):
            return reference.BACKEND.forward(x, weight, stride, padding, dilation, groups)
        x, weight = x.contiguous(), weight.contiguous()
        y = torch.empty((x.shape[0], weight.shape[0], ho, wo), dtype=torch.float32)
        _check(self._lib.aq_forward_f32_g(x.data_ptr(), weight.data_ptr(), y.data_ptr(), geom, groups,
                                          torch.get_num_threads()))
        return y

    def grad_input(self, grad_out, x, weight, stride, padding, dilation, groups=1):
        geom, ho, wo = _geometry(x, weight, stride, padding, dilation)
        if _degenerate(x, weight, ho, wo):
            return reference.BACKEND.grad_input(grad_out, x, weight, stride, padding, dilation, groups)
        grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
        if tuple(grad_out.shape) != (x.shape[0], weight.shape[0], ho, wo):
            raise ValueError(
                f"adder grad_input: grad_out has shape {tuple(grad_out.shape)}, "
                f"expected {(x.shape[0], weight.shape[0], ho, wo)}"
            )
        gx = torch.empty(x.shape, dtype=torch.float32)
        _check(
            self._lib.aq_grad_input_f32_g(
                grad_out.data_ptr(), x.data_ptr(), weight.data_ptr(), gx.data_ptr(), geom, groups,
                torch.get_num_threads(),
            )
        )
        return gx

    def grad_weight(self, grad_out, x, weight, stride, padding, dilation, groups=1):
        """``Σ G·X_unf − W·ΣG``: the first term is exactly conv2d's weight gradient, which oneDNN computes
        without materialising the unfolded input (1.2–13× faster than the reference's unfold + einsum
        on ResNet-20 shapes, ``benchmarks/bench_cpu.py --grad``; float32 on the CPU, where no TF32
        shortcut applies; grouped layers: conv2d's grouped weight gradient)."""
        gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, stride=stride, padding=padding, dilation=dilation,
                                         groups=groups)
        return gw - weight * grad_out.sum((0, 2, 3)).view(-1, 1, 1, 1)

    def fake_quant(self, x, scale, qn, qp):
        x = x.contiguous()
        y, inside = torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool)
        _check(self._lib.aq_fake_quant_f32(x.data_ptr(), x.numel(), float(scale), float(qn), float(qp), y.data_ptr(),
                                           inside.data_ptr(), torch.get_num_threads()))
        return y, inside

    def masked_grad(self, g, inside):
        g, inside = g.contiguous(), inside.contiguous()
        y = torch.empty_like(g)
        _check(self._lib.aq_mask_f32(g.data_ptr(), inside.data_ptr(), g.numel(), y.data_ptr(), torch.get_num_threads()))
        return y

    def int_forward(self, x_q, w_q, stride, padding, dilation):
        geom, ho, wo = _geometry(x_q, w_q, stride, padding, dilation)
        if _degenerate(x_q, w_q, ho, wo):
            return reference.BACKEND.int_forward(x_q, w_q, stride, padding, dilation)
        x_q, w_q = x_q.contiguous(), w_q.contiguous()
        y = torch.empty((x_q.shape[0], w_q.shape[0], ho, wo), dtype=torch.int32)
        rc = self._lib.aq_int_forward(x_q.data_ptr(), int(x_q.dtype == torch.uint8), w_q.data_ptr(),
                                      int(w_q.dtype == torch.int16), y.data_ptr(), geom, torch.get_num_threads())
        if rc == 3:
            raise OverflowError("int_adder_conv2d: the accumulator would leave int32")
        _check(rc)
        return y

    def requant(self, v, mult, shift, bias, residual, relu):
        n, c = v.shape[:2]
        v = v.contiguous()
        mult, shift, bias = (t.to(torch.int64).contiguous() for t in (mult, shift, bias))
        if residual is not None:
            residual = residual.to(torch.int64).contiguous()
            if residual.shape != v.shape:
                raise ValueError(f"int_requant: residual of shape {tuple(residual.shape)}, v {tuple(v.shape)}")
        if not mult.numel() == shift.numel() == bias.numel() == c:
            raise ValueError(f"int_requant: per-channel parameters must have {c} entries")
        if int(shift.min()) < 0 or int(shift.max()) > 62:
            raise ValueError("int_requant: shifts must lie in [0, 62]")
        y = torch.empty(v.shape, dtype=torch.int64)
        rc = self._lib.aq_requant(
            v.data_ptr(), int(v.dtype == torch.int64), mult.data_ptr(), shift.data_ptr(), bias.data_ptr(),
            None if residual is None else residual.data_ptr(), int(relu), n, c, v[0, 0].numel() if n and c else 0,
            y.data_ptr(), torch.get_num_threads(),
        )
        if rc == 2:  # the C loop checks the same bound; this names the value
            reference.check_int64_range(v, int(mult.abs().max()), "requant")
            raise OverflowError("requant: a value times its multiplier leaves int64")
        return y

    def quantize(self, z, thresholds, qmin, dtype):
        if dtype not in _QUANT_OUT:
            return reference.BACKEND.quantize(z, thresholds, qmin, dtype)
        z, thresholds = z.contiguous(), thresholds.contiguous()
        q = torch.empty(z.shape, dtype=dtype)
        self._lib.aq_quantize(z.data_ptr(), z.numel(), thresholds.data_ptr(), thresholds.numel(), qmin,
                              _QUANT_OUT[dtype], q.data_ptr(), torch.get_num_threads())
        return q


BACKEND = _Cpu(_LIB) if _LIB is not None else None
