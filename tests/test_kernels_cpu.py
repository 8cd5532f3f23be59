"""The ``cpu`` adder backend (C extension) against the pure-PyTorch reference.

Float ops are compared with the reference computed in float64 (relative tolerance ~1e-5); the
integer forward must be exactly equal. Every instruction-set path this CPU has (scalar, AVX2,
AVX-512) is exercised through ``cpu.force_isa``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adderquant import kernels
from adderquant.kernels import cpu
from adderquant.nn.functional import adder_conv2d

if cpu.BACKEND is None:
    pytest.skip("adderquant._adder_cpu is not built (no compiler at install time)", allow_module_level=True)

ISAS = [name for name in cpu.ISA_NAMES if cpu.ISA_NAMES.index(name) <= cpu.ISA_NAMES.index(cpu.isa_max())]

# (N, C, H, W, O, kernel, stride, padding, dilation)
CASES = [
    (2, 3, 7, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 5, 11, 10, 7, (5, 5), (2, 2), (2, 2), (1, 1)),
    (3, 17, 9, 9, 6, (3, 3), (2, 2), (0, 0), (2, 2)),
    (2, 16, 8, 8, 16, (1, 1), (1, 1), (0, 0), (1, 1)),
    (2, 7, 13, 11, 9, (1, 1), (2, 2), (0, 0), (1, 1)),
    (1, 4, 12, 12, 70, (3, 3), (1, 1), (0, 0), (1, 1)),
    (2, 3, 10, 15, 4, (3, 5), (1, 2), (2, 0), (1, 1)),
    (1, 33, 5, 5, 13, (3, 3), (3, 3), (2, 2), (1, 1)),
    (4, 16, 32, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 32, 8, 8, 64, (3, 3), (2, 2), (1, 1), (1, 1)),
]


def _ids(case):
    n, c, h, w, o, k, s, p, d = case
    return f"n{n}c{c}_{h}x{w}_o{o}_k{k[0]}x{k[1]}_s{s[0]}{s[1]}_p{p[0]}{p[1]}_d{d[0]}"


@pytest.fixture(params=ISAS)
def isa(request):
    with cpu.force_isa(request.param) as used:
        assert used == request.param
        yield used


def _reference(fn, *args):
    with kernels.use_backend("reference"):
        return fn(*args)


def _assert_close(got, want, rtol=1e-5):
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max().item() + 1e-12
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale)


def _tensors(case, seed=0):
    n, c, h, w, o, k, *_ = case
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randn(o, c, *k, generator=g)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_matches_reference(isa, case):
    x, w = _tensors(case)
    s, p, d = case[6:]
    y = kernels.adder_forward(x, w, s, p, d)
    _assert_close(y, _reference(kernels.adder_forward, x.double(), w.double(), s, p, d))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gradients_match_reference(isa, case):
    x, w = _tensors(case, seed=1)
    s, p, d = case[6:]
    # scale so that many differences fall on both sides of the HardTanh clip at ±1
    x, w = x * 0.7, w * 0.7
    g = torch.randn(kernels.adder_forward(x, w, s, p, d).shape)
    gx = kernels.adder_grad_input(g, x, w, s, p, d)
    assert gx.shape == x.shape
    _assert_close(gx, _reference(kernels.adder_grad_input, g.double(), x.double(), w.double(), s, p, d))
    gw = kernels.adder_grad_weight(g, x, w, s, p, d)  # Σ G·X − W·ΣG: cancellation, so a looser bound
    _assert_close(gw, _reference(kernels.adder_grad_weight, g.double(), x.double(), w.double(), s, p, d), rtol=1e-4)


def _int_inputs(case, x_dtype, seed=0):
    n, c, h, w, o, k, *_ = case
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-128, 128) if x_dtype == torch.int8 else (0, 256)
    x = torch.randint(lo, hi, (n, c, h, w), generator=gen, dtype=torch.int16).to(x_dtype)
    wq = torch.randint(-128, 128, (o, c, *k), generator=gen, dtype=torch.int16).to(torch.int8)
    return x, wq


@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_int_forward_exact(isa, case, x_dtype):
    x, w = _int_inputs(case, x_dtype)
    s, p, d = case[6:]
    y = kernels.int_adder_conv2d(x, w, s, p, d)
    assert y.dtype == torch.int32
    assert torch.equal(y, _reference(kernels.int_adder_conv2d, x, w, s, p, d))


@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
def test_int_forward_extremes(isa, x_dtype):
    """Saturated values: |x - w| up to 255 (int8) and 383 (uint8 input, int8 weights); zero padding."""
    lo, hi = (-128, 127) if x_dtype == torch.int8 else (0, 255)
    for xv, wv in ((lo, 127), (hi, -128), (lo, -128), (hi, 127)):
        x = torch.full((2, 37, 6, 7), xv, dtype=torch.int16).to(x_dtype)
        w = torch.full((9, 37, 3, 3), wv, dtype=torch.int8)
        x[0, :, ::2] = hi if xv == lo else lo  # mix the two ends
        y = kernels.int_adder_conv2d(x, w, 1, 1)
        want = _reference(kernels.int_adder_conv2d, x, w, 1, 1)
        assert torch.equal(y, want)
    assert int(-y.min()) <= 37 * 9 * (383 if x_dtype == torch.uint8 else 255)


def test_dispatch(monkeypatch):
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    b = cpu.BACKEND
    assert "cpu" in kernels.available_backends()
    calls = []
    forward = b.forward
    monkeypatch.setattr(b, "forward", lambda *a: calls.append(a[0].dtype) or forward(*a))
    kernels.adder_forward(x, w, 1, 1)
    kernels.adder_forward(x.double(), w.double(), 1, 1)
    assert calls == [torch.float32]  # automatic choice: cpu for float32 CPU tensors, float64 elsewhere
    assert b.supports("forward", x, w) and b.supports("grad_input", torch.randn(1, 4, 4, 4), x, w)
    assert not b.supports("forward", x.double(), w.double())  # float64 stays on the reference
    assert not b.supports("forward", x.half(), w.half())
    assert b.supports("grad_weight", torch.randn(1, 4, 4, 4), x, w)
    assert not b.supports("grad_weight", torch.randn(1, 4, 4, 4).double(), x.double(), w.double())
    xq, wq = torch.zeros(1, 3, 6, 6, dtype=torch.int8), torch.zeros(4, 3, 3, 3, dtype=torch.int8)
    assert b.supports("int_forward", xq, wq) and b.supports("int_forward", xq.to(torch.uint8), wq)
    assert not b.supports("int_forward", xq.to(torch.int16), wq)
    assert not b.supports("int_forward", xq, wq.to(torch.uint8))


def test_non_contiguous_inputs():
    x = torch.randn(2, 6, 9, 9).to(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 6).permute(0, 3, 1, 2)
    assert not x.is_contiguous() and not w.is_contiguous()
    y = kernels.adder_forward(x, w, 1, 1)
    _assert_close(y, _reference(kernels.adder_forward, x.double(), w.double(), 1, 1))


def test_autograd_end_to_end():
    """adder_conv2d in float32 (cpu backend for the forward and both gradients) against float64 (reference)."""
    x = torch.randn(3, 5, 8, 8, requires_grad=True)
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    y = adder_conv2d(x, w, stride=2, padding=1)
    y.sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = adder_conv2d(x64, w64, stride=2, padding=1)
    y64.sum().backward()
    _assert_close(y.detach(), y64.detach())
    _assert_close(x.grad, x64.grad)
    _assert_close(w.grad, w64.grad, rtol=1e-4)


def test_threads_agree():
    x, w = torch.randn(3, 7, 12, 12), torch.randn(5, 7, 3, 3)
    g = torch.randn(3, 5, 12, 12)
    xq, wq = _int_inputs((3, 7, 12, 12, 5, (3, 3)), torch.int8)
    old = torch.get_num_threads()
    out = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            out.append(
                (
                    kernels.adder_forward(x, w, 1, 1),
                    kernels.adder_grad_input(g, x, w, 1, 1),
                    kernels.int_adder_conv2d(xq, wq, 1, 1),
                )
            )
    finally:
        torch.set_num_threads(old)
    for y, gx, yq in out[1:]:
        assert torch.equal(y, out[0][0]) and torch.equal(yq, out[0][2])
        torch.testing.assert_close(gx, out[0][1], rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 20),
    o=st.integers(1, 20),
    h=st.integers(1, 12),
    wd=st.integers(1, 12),
    kh=st.sampled_from([1, 2, 3, 5]),
    kw=st.sampled_from([1, 3, 4]),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    uint8=st.booleans(),
    seed=st.integers(0, 2**16),
    isa_name=st.sampled_from(ISAS),
)
def test_property_all_ops(n, c, o, h, wd, kh, kw, sh, sw, ph, pw, dh, dw, uint8, seed, isa_name):
    if dh * (kh - 1) + 1 > h + 2 * ph or dw * (kw - 1) + 1 > wd + 2 * pw:
        return  # kernel does not fit the padded input
    with cpu.force_isa(isa_name):
        _check_all_ops(n, c, o, h, wd, kh, kw, sh, sw, ph, pw, dh, dw, uint8, seed)


def _check_all_ops(n, c, o, h, wd, kh, kw, sh, sw, ph, pw, dh, dw, uint8, seed):
    case = (n, c, h, wd, o, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    x, w = _tensors(case, seed)
    s, p, d = case[6:]
    y = kernels.adder_forward(x, w, s, p, d)
    _assert_close(y, _reference(kernels.adder_forward, x.double(), w.double(), s, p, d))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    gx = kernels.adder_grad_input(g, x, w, s, p, d)
    _assert_close(gx, _reference(kernels.adder_grad_input, g.double(), x.double(), w.double(), s, p, d))
    gw = kernels.adder_grad_weight(g, x, w, s, p, d)
    _assert_close(gw, _reference(kernels.adder_grad_weight, g.double(), x.double(), w.double(), s, p, d), rtol=1e-4)
    xq, wq = _int_inputs(case, torch.uint8 if uint8 else torch.int8, seed)
    assert torch.equal(kernels.int_adder_conv2d(xq, wq, s, p, d), _reference(kernels.int_adder_conv2d, xq, wq, s, p, d))


# ------------------------------------------------------------------- integer engine element-wise ops


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(0, 3000), dtype=st.sampled_from([torch.int8, torch.uint8, torch.int16]),
       seed=st.integers(0, 2**16), isa_name=st.sampled_from(ISAS))
def test_int_quantize_matches_reference(bits, n, dtype, seed, isa_name):
    """Both C paths (linear AVX2 count up to 64 thresholds, binary search beyond) against bucketize,
    with values on, beside and beyond every threshold."""
    g = torch.Generator().manual_seed(seed)
    qmin = 0 if dtype == torch.uint8 else -(2 ** (bits - 1))
    t = torch.randint(-(2**61), 2**61, (2**bits - 1,), generator=g).sort().values
    z = torch.cat([torch.randint(-(2**62), 2**62, (n,), generator=g), t, t - 1, t + 1])
    z = z[torch.randperm(len(z), generator=g)]
    with cpu.force_isa(isa_name):
        got = kernels.int_quantize(z, t, qmin, dtype)
    want = _reference(kernels.int_quantize, z, t, qmin, torch.int64)
    assert got.dtype == dtype
    assert torch.equal(got.to(torch.int64), want)


def test_int_requant_rejects_bad_parameters():
    v = torch.zeros(1, 2, 3, dtype=torch.int32)
    ok = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="2 entries"):
        cpu.BACKEND.requant(v, ok[:1], ok, ok, None, False)
    with pytest.raises(ValueError, match=r"\[0, 62\]"):
        cpu.BACKEND.requant(v, ok, ok + 63, ok, None, False)
    with pytest.raises(ValueError, match="residual"):
        cpu.BACKEND.requant(v, ok, ok, ok, torch.zeros(1, 2, 4, dtype=torch.int64), False)
    with pytest.raises(TypeError, match="int32 or int64"):
        kernels.int_requant(v.float(), ok, ok, ok)


# ------------------------------------------------------------------- QAT's fake quantiser


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), n=st.integers(0, 40000), seed=st.integers(0, 2**16),
       isa_name=st.sampled_from(ISAS))
def test_fake_quant_is_the_pytorch_expression_bit_for_bit(bits, signed, n, seed, isa_name):
    """Values on every tie of the grid (k + ½)·s, beyond both edges, NaN and ±inf included: the C pass
    equals ``round(x/s).clamp(q_n, q_p)·s`` (IEEE division, half to even) and its mask."""
    g = torch.Generator().manual_seed(seed)
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s = torch.tensor(float(torch.rand((), generator=g)) * 0.5 + 1e-3)
    ties = (torch.arange(qn - 3, qp + 3, dtype=torch.float32) + 0.5) * s
    x = torch.cat([torch.randn(n, generator=g) * (qp - qn) * float(s), ties,
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])])
    x = x[torch.randperm(len(x), generator=g)]
    with cpu.force_isa(isa_name):
        y, inside = kernels.fake_quant(x, s, qn, qp)
        g_in = torch.randn(x.shape, generator=g)
        back = kernels.masked_grad(g_in, inside)
    codes = torch.round(x / s)
    want = codes.clamp(qn, qp) * s
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~want.isnan()], want[~want.isnan()])
    assert torch.equal(inside, (codes >= qn) & (codes <= qp))
    assert torch.equal(back, torch.where(inside, g_in, torch.zeros(())))
