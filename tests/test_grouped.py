"""Grouped and depthwise adder layers (``groups`` as in ``nn.Conv2d``) everywhere.

Against a float64 brute force written with explicit loops (no unfold): the forward ``−Σ|X − W|`` and
both AdderNet gradients, ``∂W = Σ G·(X − W)`` and ``∂X = Σ G·HardTanh(W − X)``, for groups ∈ {1, 2, C}
on the reference and C backends (every instruction set), through the dispatch's per-group slicing
(what backends without native groups, the Triton one, get) and through autograd; the int8 kernel;
the fake-quantized layer against the quantized arithmetic written out per output channel; the integer
engine and the NumPy runtime against the float64 fake-quant model; the ``.aqz`` version; op counts.
"""

from __future__ import annotations

import contextlib
import itertools
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import adderquant
from adderquant import kernels
from adderquant.analysis.counting import count_model
from adderquant.analysis.energy import tally
from adderquant.integer import AQZ, IntegerEngine, NumpyRuntime, convert, export, load_aqz
from adderquant.integer import runtime_numpy as rt
from adderquant.integer.float64 import _AdderF64, float64_reference
from adderquant.integer.graph import DEFAULT_FRAC_BITS, convert_adder_layer
from adderquant.kernels import cpu, reference
from adderquant.nn import AdderConv2d, adderize
from adderquant.nn.functional import adder_conv2d
from adderquant.quant import QuantAdderConv2d, QuantConfig

# (N, C, H, W, O, k, stride, padding, dilation); groups: 1, 2 and C (depthwise; O a multiple of C)
CASES = [
    (2, 4, 7, 6, 8, 3, 1, 1, 1),
    (1, 6, 9, 8, 12, 3, 2, 1, 1),
    (3, 8, 5, 5, 8, 1, 1, 0, 1),
    (1, 4, 8, 9, 4, 3, 1, 2, 2),
    (2, 2, 6, 7, 6, 5, 2, 2, 1),
    (1, 4, 6, 6, 20, 3, 1, 1, 1),  # 10 or 5 output channels per group: several and partial channel panels
]
GROUPS = ["1", "2", "C"]


def _groups(spec: str, c: int) -> int:
    return c if spec == "C" else int(spec)


def brute(x, w, grad, groups, stride, padding, dilation):
    """Forward, ∂X and ∂W of a grouped adder layer by explicit loops, float64."""
    x, w, grad = (t.double() for t in (x, w, grad))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // groups
    xp = torch.zeros(n, c, h + 2 * padding, wd + 2 * padding, dtype=torch.float64)
    xp[:, :, padding : padding + h, padding : padding + wd] = x
    gxp = torch.zeros_like(xp)
    ho, wo = grad.shape[2:]
    y = torch.zeros(n, o, ho, wo, dtype=torch.float64)
    gw = torch.zeros_like(w)
    for g in range(groups):
        cs, os_ = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for i, j, a, b in itertools.product(range(ho), range(wo), range(kh), range(kw)):
            r, q = i * stride + a * dilation, j * stride + b * dilation
            patch = xp[:, cs, r, q]  # (n, cg)
            diff = patch[:, None, :] - w[None, os_, :, a, b]  # (n, og, cg): X − W
            y[:, os_, i, j] -= diff.abs().sum(2)
            gg = grad[:, os_, i, j][:, :, None]  # (n, og, 1)
            gw[os_, :, a, b] += (gg * diff).sum(0)
            gxp[:, cs, r, q] += (gg * (-diff).clamp(-1, 1)).sum(1)
    return y, gxp[:, :, padding : padding + h, padding : padding + wd], gw


def _inputs(case, spec, seed=0):
    n, c, h, wd, o, k, s, p, d = case
    groups = _groups(spec, c)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, wd, generator=gen, dtype=torch.float64)
    w = torch.randn(o, c // groups, k, k, generator=gen, dtype=torch.float64)
    ho, wo = ((h + 2 * p - d * (k - 1) - 1) // s + 1), ((wd + 2 * p - d * (k - 1) - 1) // s + 1)
    grad = torch.randn(n, o, ho, wo, generator=gen, dtype=torch.float64)
    return 0.6 * x, 0.6 * w, grad, groups, (s, p, d)  # 0.6: W − X on both sides of the HardTanh clip


def _float_backends():
    """(backend, instruction set or None, dtype, tolerance) for every float path here."""
    out = [("reference", None, torch.float64, 1e-12)]
    if "cpu" in kernels.available_backends():
        for isa in cpu.ISA_NAMES[: cpu.ISA_NAMES.index(cpu.isa_max()) + 1]:
            out.append(("cpu", isa, torch.float32, 2e-5))
    return out


def _rel(got, want) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("spec", GROUPS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}_{}x{}_o{}_k{}_s{}p{}d{}".format(*c))
def test_kernels_match_the_brute_force(case, spec):
    x, w, grad, groups, geo = _inputs(case, spec)
    y0, gx0, gw0 = brute(x, w, grad, groups, *geo)
    threads_before = torch.get_num_threads()
    for backend, isa, dtype, tol in _float_backends():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with kernels.use_backend(backend), cpu.force_isa(isa) if isa else contextlib.nullcontext():
                assert kernels.backend_name("forward", x.to(dtype), w.to(dtype)) == backend
                xd, wd, gd = x.to(dtype), w.to(dtype), grad.to(dtype)
                got = (kernels.adder_forward(xd, wd, *geo, groups=groups),
                       kernels.adder_grad_input(gd, xd, wd, *geo, groups=groups),
                       kernels.adder_grad_weight(gd, xd, wd, *geo, groups=groups))
            for what, g, want in zip(("forward", "grad_input", "grad_weight"), got, (y0, gx0, gw0), strict=True):
                assert g.dtype == dtype and g.shape == want.shape, (backend, what)
                assert _rel(g, want) < tol, (backend, isa, threads, what, _rel(g, want))
    torch.set_num_threads(threads_before)


@pytest.mark.parametrize("spec", ["2", "C"])
def test_per_group_slicing_of_backends_without_native_groups(spec):
    """The dispatch's fallback (the Triton backend's path): the dense op once per group on channel slices."""
    x, w, grad, groups, geo = _inputs(CASES[1], spec, seed=1)
    y0, gx0, gw0 = brute(x, w, grad, groups, *geo)
    calls = []
    real = reference.BACKEND.forward

    def spy(xs, ws, *a, **kw):
        calls.append((xs.shape[1], ws.shape[0], kw))
        return real(xs, ws, *a, **kw)

    with kernels.use_backend("reference"), mock.patch.object(reference.BACKEND, "grouped_ops", ()), \
            mock.patch.object(reference.BACKEND, "forward", spy):
        y = kernels.adder_forward(x, w, *geo, groups=groups)
        gx = kernels.adder_grad_input(grad, x, w, *geo, groups=groups)
        gw = kernels.adder_grad_weight(grad, x, w, *geo, groups=groups)
    assert calls == [(x.shape[1] // groups, w.shape[0] // groups, {})] * groups  # dense calls on slices
    for got, want in ((y, y0), (gx, gx0), (gw, gw0)):
        assert _rel(got, want) < 1e-12


@pytest.mark.parametrize("spec", GROUPS)
def test_autograd_and_module(spec):
    x, w, grad, groups, geo = _inputs(CASES[0], spec, seed=2)
    y0, gx0, gw0 = brute(x, w, grad, groups, *geo)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        xa, wa = (t.detach().to(dtype).clone().requires_grad_(True) for t in (x, w))
        y = adder_conv2d(xa, wa, None, *geo, groups=groups)  # eta=None: the plain AdderNet gradient
        y.backward(grad.to(dtype))
        assert _rel(y.detach(), y0) < tol and _rel(xa.grad, gx0) < tol and _rel(wa.grad, gw0) < tol
    n, c, h, wd, o, k, s, p, d = CASES[0]
    m = AdderConv2d(c, o, k, s, p, d, bias=True, groups=groups)
    assert m.weight.shape == (o, c // groups, k, k) and (f"groups={groups}" in repr(m)) == (groups > 1)
    torch.testing.assert_close(m(x.float()), adder_conv2d(x.float(), m.weight, m.bias, s, p, d, groups=groups))


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="groups=3"):
        AdderConv2d(4, 8, 3, groups=3)
    with pytest.raises(ValueError, match="expects 8 .*4 groups of 2"):
        adder_conv2d(torch.randn(1, 6, 5, 5), torch.randn(8, 2, 3, 3), groups=4)
    with pytest.raises(ValueError, match="not divisible by groups=4"):
        adder_conv2d(torch.randn(1, 8, 5, 5), torch.randn(6, 2, 3, 3), groups=4)
    with pytest.raises(ValueError, match="groups"):
        kernels.adder_forward(torch.randn(1, 6, 5, 5), torch.randn(8, 2, 3, 3), groups=4)


@pytest.mark.parametrize("spec", GROUPS)
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_int_kernel_groups(spec, dtype):
    n, c, h, wd, o, k, s, p, d = CASES[1]
    groups = _groups(spec, c)
    gen = torch.Generator().manual_seed(3)
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    xq = torch.randint(lo, hi + 1, (n, c, h, wd), generator=gen).to(getattr(torch, dtype))
    wq = torch.randint(-128, 128, (o, c // groups, k, k), generator=gen).to(torch.int8)
    y0, _, _ = brute(xq, wq, torch.zeros(n, o, 5, 4), groups, s, p, d)
    for backend in kernels.available_backends():
        with kernels.use_backend(backend):
            got = kernels.int_adder_conv2d(xq, wq, s, p, d, groups=groups)
        assert got.dtype == torch.int32 and torch.equal(got.double(), y0), backend


# ---------------------------------------------------------------------------------- quantized layers


def _quant_layer(rng, bits, conv_groups, scale_groups, lossless, signed, cin=8, cout=8, k=3, stride=1):
    group_of = torch.from_numpy(rng.permutation(np.arange(cout) % scale_groups))
    ranges = torch.tensor(rng.uniform(0.5, 1.5, scale_groups), dtype=torch.float32)
    weight = torch.from_numpy(rng.normal(0, 1, (cout, cin // conv_groups, k, k))).float()
    clamp_bias = torch.from_numpy(rng.normal(0, 3, cout)).float()
    return QuantAdderConv2d(weight, (stride, stride), (k // 2, k // 2), (1, 1), bits=bits, group_of=group_of,
                            ranges=ranges, clamp_bias=clamp_bias, lossless_act_clamp=lossless, signed=signed,
                            conv_groups=conv_groups).eval()


@pytest.mark.parametrize("conv_groups", [2, 8])
@pytest.mark.parametrize("lossless", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_quant_layer_equals_its_arithmetic_and_the_integer_runtimes(conv_groups, lossless, signed):
    """Per output channel o of conv group g, with its scale group's s: ``s·(−Σ|clamp(round(X_g/s)) − w̄_o|
    − Σ excess(X_g)) + b_o`` over g's input channels only — fake-quant, engine and NumPy runtime."""
    rng = np.random.default_rng(conv_groups + 2 * lossless + 4 * signed)
    layer = _quant_layer(rng, 4, conv_groups, 3, lossless, signed)
    x = torch.from_numpy(rng.normal(0, 1.5, (2, 8, 6, 6))).float()
    x = x.abs() if not signed else x
    x[x.abs() < 2**-16] = 0  # on the 2^-40 grid
    with torch.no_grad():
        y = layer(x.double())
    qn, qp = layer.int_bounds()
    w_int = layer.acc_weight().double()
    scales = layer.channel_scales().double()
    cg, og = 8 // conv_groups, 8 // conv_groups
    want = torch.empty_like(y)
    for o in range(8):
        g, s = o // og, scales[o]
        xg = x.double()[:, g * cg : (g + 1) * cg]
        wide = torch.round(xg / s.float().double())
        acc, _, _ = brute(wide.clamp(qn, qp), w_int[o : o + 1], torch.zeros(2, 1, 6, 6), 1, 1, 1, 1)
        if lossless:
            ex = layer.excess(wide).sum(1, keepdim=True)
            acc = acc - brute(ex, torch.zeros(1, 1, 3, 3, dtype=torch.float64), torch.zeros(2, 1, 6, 6), 1, 1, 1, 1)[
                0].neg()
        want[:, o : o + 1] = acc * layer.scales()[layer.group_of[o]].double() + layer.clamp_bias[o].double()
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.equal(_AdderF64(layer)(x.double()), y)  # the float64 reference's wrapper
    z = (x.double() * 2**DEFAULT_FRAC_BITS).to(torch.int64)
    graph = convert_adder_layer(layer)
    assert graph.nodes[0]["attrs"]["groups"] == conv_groups
    out = IntegerEngine(graph)(z)
    assert float(((out.double() * 2.0**-DEFAULT_FRAC_BITS - y).abs() - 2.0**-DEFAULT_FRAC_BITS).max()) <= 1e-9
    np.testing.assert_array_equal(NumpyRuntime(AQZ(graph.to_json(), graph.tensors)).logits(z.numpy()), out.numpy())


@pytest.mark.parametrize("latent", [False, True])
def test_quant_layer_trains_with_the_adder_backward(latent):
    """QAT: the grouped fake-quant layer in training mode (also with latent weights) computes the eval
    function and passes finite gradients to its weights and input."""
    layer = _quant_layer(np.random.default_rng(0), 4, 4, 2, False, True)
    if latent:
        layer.unfold(layer.weight.detach().clone())
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.no_grad():
        y_eval = layer.eval()(x)
    y = layer.train()(x)
    torch.testing.assert_close(y, y_eval, rtol=1e-5, atol=1e-4)
    y.square().mean().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _grouped_cnn() -> nn.Module:
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(16),
                        nn.Conv2d(16, 16, 1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return adderize(cnn)


NORM = ((0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("config", [
    QuantConfig.paper(4, quantize_first_last=True),
    QuantConfig.ours_fast(4, quantize_first_last=True),
    QuantConfig.paper(3, quantize_first_last=True, unsigned_activations=True, lossless_act_clamp=True),
    QuantConfig.authors(4, quantize_first_last=True, bn_recalibration=10),  # its double-step weight grid
    QuantConfig.ours_fast(4, quantize_first_last=True, learned_rounding=4),
], ids=["paper", "ours", "unsigned+lossless", "authors", "learned-rounding"])
def test_grouped_model_fake_quant_engine_and_numpy_agree(config, tmp_path):
    torch.manual_seed(0)
    model = _grouped_cnn()
    x = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    xn = (x.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        model.train()(xn)  # BatchNorm statistics of these images
    result = adderquant.quantize(model.eval(), xn, config)
    q = result.model
    assert [m.conv_groups for m in q.modules() if isinstance(m, QuantAdderConv2d)] == [8, 2, 4]
    path = export(result, tmp_path / "grouped.aqz", name="grouped", normalization=NORM, input_shape=(3, 12, 12))
    logits = IntegerEngine(path, chunk=4)(x)
    with torch.no_grad():
        ref64 = float64_reference(q)(xn)
        fake32 = q(xn)
    assert torch.equal(logits.argmax(1), ref64.argmax(1))
    assert float((logits.double() * 2.0**-DEFAULT_FRAC_BITS - ref64).abs().max()) < 1e-6
    assert float((fake32.double() - ref64).abs().max()) < 1e-3  # float32 vs float64 of the same model
    np.testing.assert_array_equal(NumpyRuntime(path).logits(x.numpy()), logits.numpy())
    with kernels.use_backend("reference"):
        assert torch.equal(IntegerEngine(path)(x), logits)


# ----------------------------------------------------------------------------------------- .aqz format


def test_aqz_version_two_only_for_grouped_layers(tmp_path):
    torch.manual_seed(1)
    model = _grouped_cnn()
    xn = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        model.train()(xn)
    q = adderquant.quantize(model.eval(), xn, QuantConfig.paper(4, quantize_first_last=True)).model
    graph = convert(q, NORM, input_shape=(3, 12, 12))
    grouped = tmp_path / "grouped.aqz"
    from adderquant.integer import write_aqz

    write_aqz(graph, grouped)
    data = grouped.read_bytes()
    assert rt.HEADER.unpack_from(data, 0)[1] == 2
    assert sorted(n["attrs"]["groups"] for n in load_aqz(grouped).graph["nodes"] if "groups" in n["attrs"]) == [2, 4, 8]
    v1 = tmp_path / "v1.aqz"  # the same payload under a version-1 header: a v1 reader would ignore groups
    v1.write_bytes(data[:8] + (1).to_bytes(4, "little") + data[12:])
    with pytest.raises(ValueError, match="grouped layers .* need version 2"):
        load_aqz(v1)
    # without grouped nodes the same writer says version 1, so version-1 runtimes keep reading such files
    dense = [dict(n, attrs={k: v for k, v in n["attrs"].items() if k != "groups"}) for n in graph.nodes]
    assert rt.required_version({"nodes": dense}) == 1 and rt.required_version(graph.to_json()) == 2


# ------------------------------------------------------------------------------------------ op counts


def test_counts_of_grouped_layers():
    model = nn.Sequential(AdderConv2d(16, 32, 3, padding=1, groups=4), AdderConv2d(32, 32, 3, padding=1, groups=32),
                          AdderConv2d(32, 8, 1))
    counts = count_model(model, (1, 16, 8, 8), mark_first_last=False)
    g4, dw, dense = counts.weight_layers()
    assert (g4.fan_in, g4.conv_groups, g4.out_channels) == (4 * 9, 4, 32)  # C/groups inputs per output
    assert g4.macs == 4 * 9 * 32 * 64 and g4.weight_elems == 32 * 4 * 9
    assert (dw.fan_in, dw.conv_groups, dw.macs) == (9, 32, 9 * 32 * 64)
    assert (dense.fan_in, dense.conv_groups) == (32, 1)
    ops = tally(counts, 4, groups=4)["ops"]["scales"]["fp32_mult"]
    # activation quantization: per input element, one per scale it meets — g4: min(4, 32/4) = 4 scales,
    # depthwise: 1 (its one output channel), dense: 4; plus one rescale per output element
    assert ops == (4 * g4.in_elems + g4.out_elems) + (1 * dw.in_elems + dw.out_elems) + (4 * dense.in_elems
                                                                                          + dense.out_elems)


def test_grouped_8bit_first_layer():
    """A grouped stem stays a conventional (8-bit) convolution: the ``conv`` node carries the groups."""
    torch.manual_seed(2)
    model = adderize(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.ReLU(),
                                   nn.Conv2d(6, 12, 3, padding=1, groups=3, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10)))
    x = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    xn = (x.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        model.train()(xn)
    q = adderquant.quantize(model.eval(), xn, QuantConfig.ours_fast(4, quantize_first_last=True)).model
    graph = convert(q, NORM, input_shape=(3, 10, 10))
    assert [n["attrs"].get("groups") for n in graph.nodes if n["op"] in ("conv", "adder")] == [3, 3]
    logits = IntegerEngine(graph)(x)
    with torch.no_grad():
        ref64 = float64_reference(q)(xn)
    assert torch.equal(logits.argmax(1), ref64.argmax(1))
    assert float((logits.double() * 2.0**-DEFAULT_FRAC_BITS - ref64).abs().max()) < 1e-6
    np.testing.assert_array_equal(NumpyRuntime(AQZ(graph.to_json(), graph.tensors)).logits(x.numpy()),
                                  logits.numpy())
