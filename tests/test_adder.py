"""The adder layer against float64 brute-force loops and the AdderNet gradient formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adderquant import kernels
from adderquant.nn import AdderConv2d
from adderquant.nn.functional import adaptive_scale, adder_conv2d

F64 = torch.float64


def brute_forward(x, w, stride, padding, dilation):
    """Literal Eq. 2: −Σ|X − W| over each receptive field, one output element at a time."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = F.pad(x, (pw, pw, ph, ph))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = torch.zeros(n, o, ho, wo, dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            y[:, :, i, j] = -(patch[:, None] - w[None]).abs().sum((2, 3, 4))
    return y


def brute_grads(x, w, g, stride, padding, dilation):
    """AdderNet backward by the definitions: dW = Σ G·(X − W), dX = Σ G·HardTanh(W − X)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = w.shape[2:]
    xp = F.pad(x, (pw, pw, ph, ph))
    gxp = torch.zeros_like(xp)
    gw = torch.zeros_like(w)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            rows = slice(i * sh, i * sh + dh * (kh - 1) + 1, dh)
            cols = slice(j * sw, j * sw + dw * (kw - 1) + 1, dw)
            patch = xp[:, :, rows, cols]  # (N, C, kh, kw)
            gij = g[:, :, i, j][:, :, None, None, None]  # (N, O, 1, 1, 1)
            gw += (gij * (patch[:, None] - w[None])).sum(0)
            gxp[:, :, rows, cols] += (gij * (w[None] - patch[:, None]).clamp(-1, 1)).sum(1)
    h, wd = x.shape[2:]
    return gxp[:, :, ph : ph + h, pw : pw + wd], gw


CASES = [  # (n, c, o, h, w, k, stride, padding, dilation, bias)
    (2, 3, 4, 7, 7, 3, 1, 1, 1, False),
    (1, 2, 3, 8, 6, 3, 2, 1, 1, True),
    (2, 4, 5, 6, 6, 1, 1, 0, 1, False),
    (1, 3, 2, 9, 9, 3, 2, 0, 2, True),
    (3, 1, 1, 5, 5, 5, 1, 2, 1, False),
    (1, 2, 3, 7, 5, (3, 1), (1, 2), (1, 0), (2, 1), False),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_brute_force(case):
    n, c, o, h, wd, k, stride, padding, dilation, use_bias = case
    g = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    x = torch.randn(n, c, h, wd, dtype=F64, generator=g, requires_grad=True)
    kh, kw = (k, k) if isinstance(k, int) else k
    w = torch.randn(o, c, kh, kw, dtype=F64, generator=g, requires_grad=True)
    b = torch.randn(o, dtype=F64, generator=g) if use_bias else None
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    y = adder_conv2d(x, w, b, stride, padding, dilation)
    ref = brute_forward(x.detach(), w.detach(), pair(stride), pair(padding), pair(dilation))
    if b is not None:
        ref = ref + b.view(1, -1, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert y.shape == F.conv2d(x.detach(), w.detach(), None, stride, padding, dilation).shape
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    gx, gw = brute_grads(x.detach(), w.detach(), grad_out, pair(stride), pair(padding), pair(dilation))
    torch.testing.assert_close(x.grad, gx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.grad, gw, rtol=1e-10, atol=1e-10)


def test_adaptive_learning_rate_scaling():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    w = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    adder_conv2d(x, w, padding=1, eta=0.2).pow(2).sum().backward()
    assert w.grad.norm().item() == pytest.approx(0.2 * math.sqrt(w.numel()), rel=1e-12)
    raw = w.grad.clone()
    w.grad = None
    adder_conv2d(x, w, padding=1, eta=None).pow(2).sum().backward()
    torch.testing.assert_close(adaptive_scale(w.grad, 0.2), raw)  # same direction, rescaled norm


def test_input_gradient_is_the_true_derivative_where_hardtanh_saturates():
    """gradcheck applies to X when every |W − X| ≥ 1: HardTanh(W − X) = sign(W − X) = −∂|X−W|/∂X."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 2, 5, 5, dtype=F64, generator=g, requires_grad=True)  # X in [0, 1)
    w = 3 + torch.rand(3, 2, 3, 3, dtype=F64, generator=g)  # W in [3, 4): W − X ≥ 2, padding zeros too
    assert torch.autograd.gradcheck(lambda t: adder_conv2d(t, w, padding=1), (x,), eps=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_shapes_and_values_property(n, c, o, h, wd, k, stride, padding, dilation, seed):
    span = dilation * (k - 1) + 1
    if span > min(h, wd) + 2 * padding:
        with pytest.raises(ValueError, match="kernel spans"):
            adder_conv2d(torch.randn(n, c, h, wd), torch.randn(o, c, k, k), None, stride, padding, dilation)
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, wd, dtype=F64, generator=g)
    w = torch.randn(o, c, k, k, dtype=F64, generator=g)
    y = adder_conv2d(x, w, None, stride, padding, dilation)
    assert y.shape == F.conv2d(x, w, None, stride, padding, dilation).shape
    ref = brute_forward(x, w, (stride, stride), (padding, padding), (dilation, dilation))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.all(y <= 0)


def test_float32_and_half_inputs():
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    y32 = adder_conv2d(x, w, padding=1)
    assert y32.dtype == torch.float32
    y16 = adder_conv2d(x.half(), w.half(), padding=1)
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), adder_conv2d(x.half().float(), w.half().float(), padding=1),
                               rtol=2e-3, atol=0.1)


@pytest.mark.parametrize("x_shape,w_shape,kwargs,err,match", [
    ((3, 6, 6), (4, 3, 3, 3), {}, ValueError, "4-D"),
    ((1, 3, 6, 6), (4, 3, 3), {}, ValueError, "4-D"),
    ((1, 2, 6, 6), (4, 3, 3, 3), {}, ValueError, "channels"),
    ((1, 3, 2, 2), (4, 3, 3, 3), {}, ValueError, "kernel spans"),
    ((1, 3, 6, 6), (4, 3, 3, 3), {"stride": 0}, ValueError, "stride"),
    ((1, 3, 6, 6), (4, 3, 3, 3), {"padding": "same"}, TypeError, "padding"),
])
def test_bad_input_raises_clear_errors(x_shape, w_shape, kwargs, err, match):
    with pytest.raises(err, match=match):
        adder_conv2d(torch.randn(*x_shape), torch.randn(*w_shape), **kwargs)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="floating point"):
        adder_conv2d(torch.ones(1, 3, 6, 6, dtype=torch.int64), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="bias"):
        adder_conv2d(torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3), bias=torch.zeros(3))


def test_module_matches_functional_and_has_a_weight_parameter():
    m = AdderConv2d(3, 5, 3, stride=2, padding=1, bias=True, eta=None)
    assert dict(m.named_parameters()).keys() == {"weight", "bias"}
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(m(x), adder_conv2d(x, m.weight, m.bias, 2, 1))
    assert "eta=None" in repr(m)


def test_int_adder_conv2d_reference_exact():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-128, 128, (2, 3, 6, 6), generator=g, dtype=torch.int8)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -128, 127
    w = torch.randint(-128, 128, (4, 3, 3, 3), generator=g, dtype=torch.int8)
    with kernels.use_backend("reference"):
        acc = kernels.int_adder_conv2d(x, w, padding=1)
    assert acc.dtype == torch.int32
    ref = brute_forward(x.to(F64), w.to(F64), (1, 1), (1, 1), (1, 1))
    assert torch.equal(acc, ref.to(torch.int32))
    with pytest.raises(TypeError, match="integer"):
        kernels.int_adder_conv2d(x.float(), w)


def test_reference_memory_stays_near_the_unfolded_input():
    """The reference never builds the N×O×K×P difference tensor: peak extra memory during the input
    gradient is bounded by a few unfolded inputs (measured by the largest tensor it allocates)."""
    from adderquant.kernels import reference

    n, c, o, hw = 4, 16, 64, 16
    x, w = torch.randn(n, c, hw, hw), torch.randn(o, c, 3, 3)
    unfolded = n * c * 9 * hw * hw
    biggest = 0

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                biggest = max(biggest, out.numel())
            return out

    with Watch():
        reference.BACKEND.grad_input(torch.randn(n, o, hw, hw), x, w, (1, 1), (1, 1), (1, 1))
        reference.BACKEND.forward(x, w, (1, 1), (1, 1), (1, 1))
    assert biggest <= (reference._CHUNK_FACTOR + 1) * unfolded < o * unfolded
