"""Integer-only inference: exact arithmetic, the converter, the .aqz format and the torch-free runtime.

The claims (docs/format.md): the NumPy runtime's logits equal the PyTorch integer engine's exactly;
every adder accumulator equals the fake-quant layer's ``x̄ ⊕ w̄`` exactly and the requantised output
is within one LSB of the fixed-point grid; predictions equal the fake-quant model evaluated in
float64 (``adderquant.integer.float64``), and differ from its float32 evaluation only where float32
itself differs from float64.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adderquant import kernels
from adderquant.data import CIFAR_ADDERNET_NORM, calibration_subset, load_dataset, normalize
from adderquant.integer import (
    AQZ,
    IntegerEngine,
    NumpyRuntime,
    convert,
    evaluate_aqz,
    export,
    fixed_multiplier,
    load_aqz,
    runtime_path,
)
from adderquant.integer import engine as torch_ops
from adderquant.integer import runtime_numpy as rt
from adderquant.integer.float64 import _AdderF64, float64_reference
from adderquant.integer.graph import DEFAULT_FRAC_BITS, convert_adder_layer, exact_divisor
from adderquant.models import create
from adderquant.models.resnet_cifar import CifarResNet
from adderquant.quant import QuantAdderConv2d, QuantConfig, quantize
from adderquant.quant import adder_layer as adder_layer_module
from adderquant.quant.uniform import int_range

NORM = CIFAR_ADDERNET_NORM
F = DEFAULT_FRAC_BITS


# ----------------------------------------------------------------------------------- int adder kernel


def _brute_adder(x: np.ndarray, w: np.ndarray, stride, padding, dilation) -> np.ndarray:
    """−Σ|x − w| by explicit loops; the zero padding is a real zero activation."""
    x, w = x.astype(np.int64), w.astype(np.int64)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=np.int64)
    xp[:, :, ph : ph + h, pw : pw + wd] = x
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo), dtype=np.int64)
    for a in range(kh):  # one kernel tap at a time, every output position at once
        for b in range(kw):
            patch = xp[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh, b * dw : b * dw + sw * (wo - 1) + 1 : sw]
            out -= np.abs(patch[:, None] - w[None, :, :, a, b, None, None]).sum(2)
    return out


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["int8", "uint8"]), st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(3, 6),
       st.sampled_from([1, 2, 3]), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_int_adder_conv2d_matches_brute_force(dtype, n, c, o, hw, k, stride, pad, dil, seed):
    rng = np.random.default_rng(seed)
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    x = rng.integers(lo, hi + 1, (n, c, hw, hw))
    x.flat[: min(x.size, 2)] = [lo, hi][: min(x.size, 2)]  # the extremes always occur
    w = rng.integers(-128, 128, (o, c, k, k))
    w.flat[0], w.flat[-1] = -128, 127
    x, w = x.astype(dtype), w.astype(np.int8)
    geo = ((stride, stride), (pad, pad), (dil, dil))
    if (hw + 2 * pad - dil * (k - 1) - 1) < 0:
        return
    want = _brute_adder(x, w, *geo)
    for backend in kernels.available_backends():
        with kernels.use_backend(backend):
            got = kernels.int_adder_conv2d(torch.from_numpy(x), torch.from_numpy(w), stride, pad, dil)
        assert got.dtype == torch.int32
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"backend {backend}")
    if dtype == "int8":  # the NumPy runtime's kernel (operands within [-128, 127])
        np.testing.assert_array_equal(rt.adder_int(x, w, *geo, -128, 127), want)


# -------------------------------------------------------------------------------------- arithmetic


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 44), st.sampled_from([1, 49, 64]), st.floats(2**-13, 16.0, width=32), st.integers(2, 8),
       st.lists(st.integers(-(2**60), 2**60), min_size=1, max_size=40), st.integers(-300, 300))
def test_quantization_is_exact_rational_rounding(frac_bits, count, scale, bits, zs, tie_k):
    """``clamp(round(Z·2^-F / count / s))`` with ties to even, exactly — by division and by thresholds."""
    k, d = exact_divisor(frac_bits, count, scale)
    qn, qp = int_range(bits)
    tie = ((2 * tie_k + 1) * d) // 2 ** (k + 1)  # a Z at (or next to) a rounding tie
    zs = np.array([z for z in zs + [tie, tie + 1, tie - 1, 0] if abs(z) < 2 ** (62 - k)], dtype=np.int64)
    ratio = Fraction(1, 2**frac_bits * count) / Fraction(scale)

    def exact(z):
        v = Fraction(int(z)) * ratio
        return int(round(v))  # Fraction rounds half to even

    want = np.array([exact(z) for z in zs], dtype=np.int64)
    np.testing.assert_array_equal(rt.div_round(zs, k, d), want)
    np.testing.assert_array_equal(torch_ops.div_round(torch.from_numpy(zs), k, d).numpy(), want)
    th = rt.quant_thresholds(k, d, qn, qp)
    np.testing.assert_array_equal(rt.quantize_clamped(zs, th, qn), np.clip(want, qn, qp))
    for backend, dtype in itertools.product(kernels.available_backends(), (torch.int8, torch.int16)):
        with kernels.use_backend(backend):
            got = kernels.int_quantize(torch.from_numpy(zs), torch.from_numpy(th), qn, dtype)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.numpy(), np.clip(want, qn, qp), err_msg=f"backend {backend}, {dtype}")


@settings(max_examples=60, deadline=None)
@given(st.floats(-1e6, 1e6).filter(lambda v: abs(v) > 1e-9), st.integers(20, 48),
       st.lists(st.integers(-(2**13), 2**13), min_size=1, max_size=20))
def test_requant_rounds_the_fixed_point_product(m, bits, vs):
    mult, sh = fixed_multiplier(m, bits)
    assert abs(mult) < 2**bits and 0 <= sh <= 62
    if sh < 62:  # (only a multiplier below 2^-62·2^bits loses precision)
        assert abs(Fraction(mult, 2**sh) - Fraction(m)) <= Fraction(abs(m)) / 2**bits
    v = np.array(vs, dtype=np.int64)
    if abs(mult) * 2**13 >= 2**62:
        return
    want = [math.floor(Fraction(int(x) * mult, 2**sh) + Fraction(1, 2)) + 7 for x in v]  # round half up, + bias
    np.testing.assert_array_equal(rt.requant(v, np.int64(mult), np.int64(sh), np.int64(7)), want)
    per_channel = [torch.tensor([t]) for t in (mult, sh, 7)]
    for backend, dtype in itertools.product(kernels.available_backends(), (torch.int32, torch.int64)):
        with kernels.use_backend(backend):
            got = kernels.int_requant(torch.from_numpy(v).to(dtype).view(1, 1, -1), *per_channel)
        np.testing.assert_array_equal(got.flatten().numpy(), want, err_msg=f"backend {backend}, {dtype}")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7), st.booleans(), st.booleans(),
       st.sampled_from([torch.int32, torch.int64]), st.integers(0, 2**31 - 1))
def test_fused_requant_equals_the_op_chain(n, c, hw, residual, relu, dtype, seed):
    """requant → add → relu in one call equals the three ops done one at a time, for every backend."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-(2**20), 2**20, (n, c, hw), generator=g).to(dtype)
    mult = torch.randint(-(2**30), 2**30, (c,), generator=g)
    shift = torch.randint(0, 40, (c,), generator=g)
    bias = torch.randint(-(2**40), 2**40, (c,), generator=g)
    res = torch.randint(-(2**40), 2**40, (n, c, hw), generator=g) if residual else None
    want = np.stack([rt.requant(v[:, j].numpy().astype(np.int64), *(t[j].numpy() for t in (mult, shift, bias)))
                     for j in range(c)], 1)
    if residual:
        want = want + res.numpy()
    if relu:
        want = np.maximum(want, 0)
    for backend in kernels.available_backends():
        with kernels.use_backend(backend):
            got = kernels.int_requant(v, mult, shift, bias, res, relu=relu)
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"backend {backend}")


def test_requant_overflow_is_detected():
    v = np.array([2**40], dtype=np.int64)
    with pytest.raises(OverflowError):
        rt.requant(v, np.int64(2**30), np.int64(0), np.int64(0))
    for backend in kernels.available_backends():
        with kernels.use_backend(backend), pytest.raises(OverflowError):
            kernels.int_requant(torch.from_numpy(v).view(1, 1, 1), *(torch.tensor([t]) for t in (2**30, 0, 0)))


def test_engine_fuses_only_chains_nothing_else_reads():
    def node(op, out, *inputs):
        return {"op": op, "name": out, "output": out, "inputs": list(inputs)}

    chain = [node("requant", "r1", "a"), node("relu", "y1", "r1"),
             node("requant", "r2", "b"), node("add", "s2", "r2", "y1"), node("relu", "y2", "s2"),
             node("requant", "r3", "c"), node("add", "s3", "y2", "r3"),
             node("requant", "r4", "d"), node("relu", "y4", "r4"), node("add", "s4", "r4", "y4")]
    steps = {s["name"]: s for s in torch_ops._fuse(chain)}
    assert set(steps) == {"r1", "r2", "r3", "r4", "relu", "y4", "s4"} - {"relu"}
    assert steps["r1"]["relu"] and steps["r1"]["output"] == "y1" and not steps["r1"]["residual"]
    assert steps["r2"]["inputs"] == ["b", "y1"] and steps["r2"]["output"] == "y2" and steps["r2"]["relu"]
    assert steps["r3"]["inputs"] == ["c", "y2"] and steps["r3"]["output"] == "s3" and not steps["r3"]["relu"]
    assert steps["r4"]["output"] == "r4" and not steps["r4"]["relu"]  # r4 is read twice: left alone


# ------------------------------------------------------------------------------- single adder layers


def _random_layer(rng: np.random.Generator, bits, groups, lossless, signed, cin, cout, k, stride, r_scale):
    groups = min(groups, cout)
    group_of = torch.from_numpy(rng.permutation(np.concatenate([np.arange(groups),
                                                                rng.integers(0, groups, cout - groups)])))
    ranges = torch.tensor(r_scale * rng.uniform(0.5, 1.5, groups), dtype=torch.float32)
    weight = torch.from_numpy(rng.normal(0, 1, (cout, cin, k, k)) * r_scale).float()
    clamp_bias = torch.from_numpy(rng.normal(0, 3, cout)).float()
    return QuantAdderConv2d(weight, (stride, stride), (k // 2, k // 2), (1, 1), bits=bits, group_of=group_of,
                            ranges=ranges, clamp_bias=clamp_bias, lossless_act_clamp=lossless, signed=signed).eval()


def _per_channel(calls, index_sets, shape):
    """Accumulators and x̄ of per-scale (or per-group) adder calls, keyed by output channel."""
    acc, xbar = torch.zeros(shape, dtype=torch.float64), {}
    for (xi, out), idx in zip(calls, index_sets, strict=True):
        acc[:, idx] = out.double()
        xbar.update({int(c): xi.double() for c in idx})
    return acc, xbar


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 3), st.booleans(), st.booleans(), st.integers(1, 4), st.integers(1, 6),
       st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.floats(0.05, 4.0), st.integers(0, 2**31 - 1))
def test_adder_layer_accumulator_exact_and_output_within_one_lsb(bits, groups, lossless, signed, cin, cout, k,
                                                                 stride, r_scale, seed):
    rng = np.random.default_rng(seed)
    layer = _random_layer(rng, bits, groups, lossless, signed, cin, cout, k, stride, r_scale)
    x = torch.from_numpy(rng.normal(0, 2 * r_scale, (2, cin, 6, 6))).float()
    if not signed:
        x = x.abs()  # an unsigned layer's input follows a ReLU
    x[x.abs() < 2**-16] = 0  # every other float32 lies on the 2^-40 grid
    z = x.double() * 2**F
    assert torch.equal(z, z.round())
    z = z.to(torch.int64)

    fake_calls, int_calls = [], []
    real_fake, real_int = adder_layer_module.adder_conv2d, torch_ops.int_adder_conv2d

    def spy_fake(xi, w, *a, **kw):
        out = real_fake(xi, w, *a, **kw)
        fake_calls.append((xi, out))
        return out

    def spy_int(xq, w, *a, **kw):
        out = real_int(xq, w, *a, **kw)
        int_calls.append((xq, out))
        return out

    with torch.no_grad(), mock.patch.object(adder_layer_module, "adder_conv2d", spy_fake):
        y = layer(x.double())  # the fake-quant layer, evaluated in float64 on the same input
    graph = convert_adder_layer(layer)
    with mock.patch.object(torch_ops, "int_adder_conv2d", spy_int):
        out = IntegerEngine(graph)(z)
    scale_sets = [idx for _, idx in layer.scale_sets()]
    fake_acc, fake_x = _per_channel(fake_calls, scale_sets, out.shape)
    # the engine makes one call per distinct scale too, in the order of each set's first channel
    int_acc, int_x = _per_channel(int_calls, sorted(scale_sets, key=lambda idx: int(idx.min())), out.shape)
    assert torch.equal(fake_acc, int_acc)  # x̄ ⊕ w̄, exactly
    assert all(torch.equal(fake_x[c], int_x[c]) for c in range(cout))  # x̄
    # requantised output: within one LSB of the 2^-F grid (plus float64's own rounding of y)
    err = (out.double() * 2.0**-F - y).abs()
    assert float((err - 2.0**-F - 4 * torch.finfo(torch.float64).eps * y.abs()).max()) <= 0
    np.testing.assert_array_equal(NumpyRuntime(AQZ(graph.to_json(), graph.tensors)).logits(z.numpy()), out.numpy())
    # the float64 wrapper the model-level reference uses is bitwise the layer's own float64 forward
    with torch.no_grad():
        assert torch.equal(_AdderF64(layer)(x.double()), y)


# ------------------------------------------------------------------------------------- whole models


def _bn_calibrated(model, u8):
    """Random weights, but BatchNorm statistics and affine terms such that activations stay O(1)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.weight.data = torch.rand(m.weight.shape, generator=g) * 2 - 0.5
            m.bias.data = torch.rand(m.bias.shape, generator=g) - 0.5
    model.train()
    with torch.no_grad():
        model(normalize(u8, *NORM))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _check_model(q, x, numpy_images: int | None = None):
    g = convert(q, NORM)
    logits = IntegerEngine(g, chunk=4)(x)  # 6 images: a full chunk and a partial one
    with kernels.use_backend("reference"):
        assert torch.equal(IntegerEngine(g)(x), logits)
    with torch.no_grad():
        ref64 = float64_reference(q)(normalize(x, *NORM))
    assert torch.equal(logits.argmax(1), ref64.argmax(1))
    assert float((logits.double() * 2.0**-g.frac_bits - ref64).abs().max()) < 1e-6
    m = len(x) if numpy_images is None else numpy_images
    if m:
        got = NumpyRuntime(AQZ(g.to_json(), g.tensors)).logits(x[:m].numpy())
        np.testing.assert_array_equal(got, logits[:m].numpy())
    return g, logits


@pytest.mark.parametrize("head", ["conv_bn", "linear"])
@pytest.mark.parametrize("variant", ["paper", "unsigned+lossless"])
def test_tiny_resnet_integer_equals_float64_fake_quant_and_numpy(images, head, variant):
    torch.manual_seed(0)
    model = _bn_calibrated(CifarResNet(8, head=head), images)
    extra = {"unsigned_activations": True, "lossless_act_clamp": True} if variant != "paper" else {}
    config = QuantConfig.paper(4, quantize_first_last=True, **extra)
    q = quantize(model, normalize(images, *NORM), config).model
    g, _ = _check_model(q, images, numpy_images=3)
    counts = g.op_counts()
    assert counts["adder"] == 3 * 2 + 2 and counts["lut"] == 1 and counts["add"] == 3
    assert counts["global_sum"] == 1 and (counts.get("conv", 0) + counts.get("linear", 0)) == 2


def test_qssf_and_8bit_models(images):
    torch.manual_seed(1)
    model = _bn_calibrated(CifarResNet(8), images)
    for config in (QuantConfig.qssf("weights", 4, quantize_first_last=True),
                   QuantConfig.paper(8, quantize_first_last=True),
                   QuantConfig.paper(8, quantize_first_last=True, unsigned_activations=True, lossless_act_clamp=True)):
        q = quantize(model, normalize(images, *NORM), config).model
        _check_model(q, images[:2])


def test_vgg_small_max_pool_on_accumulators(images):
    torch.manual_seed(2)
    model = _bn_calibrated(create("vgg_small"), images[:4])
    q = quantize(model, normalize(images[:4], *NORM), QuantConfig.paper(4, quantize_first_last=True)).model
    g, _ = _check_model(q, images[:2], numpy_images=1)
    assert g.op_counts()["maxpool"] == 3
    # the max-pools follow adder layers directly: they run on the accumulators, before any requant
    producers = {n["output"]: n["op"] for n in g.nodes}
    assert all(producers[n["inputs"][0]] == "adder" for n in g.nodes if n["op"] == "maxpool")


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56"])
@pytest.mark.parametrize("head", ["conv_bn", "linear"])
def test_cifar_resnets_convert(images, name, head):
    torch.manual_seed(3)
    model = _bn_calibrated(create(name, head=head), images[:2])
    q = quantize(model, normalize(images[:2], *NORM), QuantConfig.paper(4, quantize_first_last=True)).model
    if name == "resnet20":  # the deeper ones have the same blocks, only more of them
        g, _ = _check_model(q, images[:1], numpy_images=0)
    else:
        g = convert(q, NORM)
    depth = int(name[len("resnet"):])
    counts = g.op_counts()
    assert counts["adder"] == depth  # 3·2n body layers + 2 down-sampling shortcuts
    assert counts["add"] == (depth - 2) // 2 and counts["lut"] == 1 and counts["global_sum"] == 1
    assert counts.get("linear", 0) == (head == "linear")


def test_unquantized_first_layer_is_rejected(images):
    model = _bn_calibrated(CifarResNet(8), images[:4])
    q = quantize(model, normalize(images[:4], *NORM), QuantConfig.paper(4)).model
    with pytest.raises(NotImplementedError, match="quantize_first_last"):
        convert(q, NORM)


# ------------------------------------------------------------------------------------ .aqz format


@pytest.fixture(scope="module")
def exported(tmp_path_factory, images):
    torch.manual_seed(4)
    model = _bn_calibrated(CifarResNet(8), images)
    result = quantize(model, normalize(images, *NORM), QuantConfig.paper(4, quantize_first_last=True))
    q = result.model
    path = export(result, tmp_path_factory.mktemp("aqz") / "tiny.aqz", name="resnet8", normalization=NORM,
                  meta={"note": "test"})
    return path, q


def test_export_roundtrip(exported, images):
    path, q = exported
    aqz = load_aqz(path)
    assert aqz.meta["name"] == "resnet8" and aqz.meta["note"] == "test"
    assert aqz.meta["normalization"]["mean"] == list(NORM[0])
    assert aqz.meta["quant_config"]["bits"] == 4
    in_memory = IntegerEngine(convert(q, NORM))(images)
    assert torch.equal(IntegerEngine(path)(images), in_memory)
    np.testing.assert_array_equal(NumpyRuntime(path).logits(images.numpy()), in_memory.numpy())


def test_aqz_layout_and_safetensors_interop(exported):
    from safetensors.numpy import load as st_load

    path, _ = exported
    data = path.read_bytes()
    magic, version, flags, length, digest = rt.HEADER.unpack_from(data, 0)
    assert (magic, version, flags, length) == (b"\x89AQZ\r\n\x1a\n", 1, 0, len(data) - 56)
    payload = data[56:]
    graph_len = int.from_bytes(payload[:8], "little")
    graph = json.loads(payload[8 : 8 + graph_len])
    tensors = st_load(payload[8 + graph_len :])  # the reference safetensors reader agrees with ours
    ours = rt.read_safetensors(payload[8 + graph_len :])
    assert set(tensors) == set(ours) == {v for n in graph["nodes"] for v in n["params"].values()}
    for k in tensors:
        np.testing.assert_array_equal(tensors[k], ours[k])


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:], "checksum mismatch"),
    (lambda b: b[:-5] + bytes([b[-5] ^ 0x80]) + b[-4:], "checksum mismatch"),
    (lambda b: b"\x00" + b[1:], "magic"),
    (lambda b: b[:8] + (3).to_bytes(4, "little") + b[12:], "version"),
    (lambda b: b[:11] + bytes([b[11] ^ 0x01]) + b[12:], "corrupted header"),  # a flipped byte, not a version
    (lambda b: b + b"\x00", "length mismatch"),
])
def test_corrupted_or_truncated_files_are_rejected(exported, tmp_path, damage, message):
    path, _ = exported
    bad = tmp_path / "bad.aqz"
    bad.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        load_aqz(bad)
    with pytest.raises(ValueError, match=message):
        IntegerEngine(bad)


def test_evaluate_aqz(exported, images):
    path, q = exported
    y = np.arange(len(images)) % 10
    res = evaluate_aqz(path, images.numpy(), y, batch_size=5, return_predictions=True)
    assert set(res) == {"top1", "top5", "n", "seconds", "predictions"} and res["n"] == len(images)
    preds = IntegerEngine(path).predict(images).numpy()
    np.testing.assert_array_equal(res["predictions"], preds)
    assert res["top1"] == pytest.approx(100.0 * (preds == y).mean())
    assert json.dumps(evaluate_aqz(path, images.numpy(), y))  # JSON-ready without predictions
    by_engine = evaluate_aqz(IntegerEngine(path), images.numpy(), y, return_predictions=True)
    np.testing.assert_array_equal(by_engine["predictions"], preds)


def test_numpy_runtime_runs_without_torch(exported, images, tmp_path):
    path, _ = exported
    want = IntegerEngine(path)(images).numpy()
    np.save(tmp_path / "x.npy", images.numpy())
    np.save(tmp_path / "want.npy", want)
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location("aq_runtime", {str(runtime_path())!r})
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
got = rt.NumpyRuntime({str(path)!r}).logits(np.load({str(tmp_path / 'x.npy')!r}))
assert np.array_equal(got, np.load({str(tmp_path / 'want.npy')!r})), "logits differ"
assert not any(m == "adderquant" or m.startswith("adderquant.") for m in sys.modules), "adderquant imported"
assert sys.modules["torch"] is None
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# --------------------------------------------------------------------------- the official checkpoint


@pytest.mark.data
@pytest.mark.slow
def test_official_resnet20_w4_integer_exactness(official_addernet, cifar_subset):
    from adderquant.checkpoints import load

    ck = load(official_addernet)
    ds = load_dataset(cifar_subset)
    calib = normalize(calibration_subset(ds, 256, seed=0), *ck.normalization)
    q = quantize(ck.model, calib, QuantConfig.paper(4, quantize_first_last=True)).model
    x, y = ds.x_test[:200], ds.y_test[:200]
    g = convert(q, ck.normalization)
    logits = IntegerEngine(g)(x)
    xs = normalize(x, *ck.normalization)
    with torch.no_grad():
        fake32, fake64 = q(xs), float64_reference(q)(xs)
    p_int, p32, p64 = logits.argmax(1), fake32.argmax(1), fake64.argmax(1)
    assert torch.equal(p_int, p64)  # exactly the quantized network's decisions
    # against float32: a prediction differs only where float32 rounding already moved the fake-quant model
    assert bool(((p_int != p32) <= (p64 != p32)).all())
    assert float((p_int == y).double().mean()) > 0.8
    np.testing.assert_array_equal(NumpyRuntime(AQZ(g.to_json(), g.tensors)).logits(x[:16].numpy()),
                                  logits[:16].numpy())
