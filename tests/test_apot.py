"""APoT (ICLR 2020): level sets, projection, quantizer gradients, layers, the authors' checkpoints,
operation counts and the progressive-QAT loop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adderquant import checkpoints
from adderquant.analysis.apot_cost import apot_shift_add_cost, compare_resnet50, layer_macs
from adderquant.data import CIFAR_APOT_NORM
from adderquant.models import create
from adderquant.quant.apot import (
    APoTQuantize,
    apot_fake_quant,
    levels,
    normalize_weight,
    project,
    terms_per_level,
    tie_boundaries,
    weight_levels,
)
from adderquant.quant.apot_layers import (
    FirstLastConv2d,
    FirstLastLinear,
    QuantConv2d,
    QuantLinear,
    apot_quantize,
    max_quantize_weight,
    set_bits,
)

# ---------------------------------------------------------------- level sets


def _reference_json() -> Path | None:
    candidates = []
    if os.environ.get("ADDERQUANT_DATA"):
        candidates.append(Path(os.environ["ADDERQUANT_DATA"]).parent / "reference" / "apot-levels.json")
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "reference" / "apot-levels.json")
    return next((c for c in candidates if c.exists()), None)


@pytest.mark.parametrize("bits", range(2, 7))
def test_levels_equal_the_authors_json(bits):
    path = _reference_json()
    if path is None:
        pytest.skip("reference/apot-levels.json absent")
    ref = json.loads(path.read_text())[str(bits)]
    assert levels(bits, dtype=torch.float64).tolist() == ref  # exact, float64


def test_levels_small_sets_by_hand():
    assert levels(2, dtype=torch.float64).tolist() == [0.0, 0.25, 0.5, 1.0]
    assert levels(3, dtype=torch.float64).tolist() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]
    assert [len(levels(b)) for b in range(2, 7)] == [4, 8, 16, 32, 64]
    assert levels(2, "uniform").tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert levels(2, "pot").tolist() == [0.0, 0.25, 0.5, 1.0]
    assert levels(3, "pot", dtype=torch.float64).tolist() == [0.0] + [2.0**-i for i in range(6, -1, -1)]
    # signed b-bit = sign + Q(b-1); 2-bit weights are uniform {-1, 0, 1}
    assert levels(2, signed=True).tolist() == [-1.0, 0.0, 1.0]
    assert levels(3, signed=True).tolist() == [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    assert weight_levels(2).tolist() == [0.0, 1.0]
    assert torch.equal(weight_levels(4), levels(3))


def test_terms_per_level():
    # Q(3) unnormalised: 0, 1/16, 1/8, 1/8+1/16, 1/4, 1/4+1/8, 1/2, 1/2+1/8
    assert terms_per_level(3).tolist() == [0, 1, 1, 2, 1, 2, 1, 2]
    assert int(terms_per_level(4).max()) == 2 and int(terms_per_level(6).max()) == 3
    assert terms_per_level(3, "uniform").tolist() == [0, 1, 1, 2, 1, 2, 2, 3]  # popcounts
    assert terms_per_level(4, signed=True).tolist() == [2, 1, 2, 1, 2, 1, 1, 0, 1, 1, 2, 1, 2, 1, 2]
    assert len(terms_per_level(5, signed=True)) == len(levels(5, signed=True))


@pytest.mark.parametrize(("call", "match"), [
    (lambda: levels(7), r"apot bits must be in 2\.\.6"),
    (lambda: levels(1), r"bits must be in 2\.\.6"),
    (lambda: levels(9, "uniform"), r"uniform bits must be in 2\.\.8"),
    (lambda: levels(8, signed=True), r"signed .*bits must be in 2\.\.7"),
    (lambda: levels(4.0), r"bits must be an integer"),
    (lambda: levels(4, "log"), "kind must be one of"),
    (lambda: QuantConv2d(3, 3, 3, bits=7), r"APoT layer bits must be in 2\.\.6"),
])
def test_unsupported_bits_and_kinds(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- projection


def test_projection_ties_go_to_the_lower_level():
    lv = levels(2)  # 0, .25, .5, 1: midpoints .125, .375, .75
    x = torch.tensor([0.125, 0.375, 0.75, 0.7500001, 0.1249, -3.0, 5.0])
    assert project(x, lv).tolist() == [0.0, 0.25, 0.5, 1.0, 0.0, 0.0, 1.0]
    lv = levels(3, "uniform")  # k/7: tie at 0.5/7 goes down
    assert project(torch.tensor([0.5 / 7, 1.5 / 7]), lv).tolist() == pytest.approx([0.0, 1 / 7])
    # signed: sign(x)·Π(|x|), so a tie goes toward zero on both sides
    q = apot_fake_quant(torch.tensor([0.375, -0.375, 0.9, -2.0]), 1.0, weight_levels(3), signed=True)
    assert q.tolist() == [0.25, -0.25, 1.0, -1.0]


def test_projection_is_exact_at_every_decision_boundary():
    for dtype in (torch.float32, torch.float64):
        for bits in range(2, 7):
            lv = levels(bits, dtype=dtype)
            b = tie_boundaries(lv)
            near = [b, torch.nextafter(b, torch.ones_like(b)), (lv[1:] + lv[:-1]) / 2]
            x = torch.cat(near + [torch.nextafter(t, -torch.ones_like(t)) for t in near])
            brute = lv[(x[None] - lv[:, None]).abs().argmin(0)]
            assert torch.equal(project(x, lv), brute)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 6), kind=st.sampled_from(["apot", "uniform", "pot"]),
       wide=st.booleans(),
       values=st.lists(st.floats(-1.5, 1.5, allow_nan=False, width=32), min_size=1, max_size=200))
def test_projection_matches_brute_force_argmin(bits, kind, wide, values):
    dtype = torch.float64 if wide else torch.float32
    lv = levels(bits, kind, dtype=dtype)
    x = torch.tensor(values, dtype=dtype)
    x = torch.cat([x, (lv[1:] + lv[:-1]) / 2])  # always include the exact midpoints
    brute = lv[(x[None] - lv[:, None]).abs().argmin(0)]  # the authors' projection (first minimum)
    assert torch.equal(project(x, lv), brute)


def test_projection_keeps_shape_and_memory_is_linear():
    x = torch.rand(3, 5, 7)
    assert project(x, levels(6)).shape == x.shape
    with pytest.raises(TypeError, match="floating-point"):
        project(torch.arange(4), levels(2))


# ---------------------------------------------------------------- quantizer gradients


def _apot_reference(x, alpha, lv, signed):
    """Same forward with the STE written as detach(): ``α·(clip(t) + sg[Π(clip t) − clip t])``."""
    t = x / alpha
    tc = t.clamp(-1, 1) if signed else t.clamp(max=1)
    q = (project(tc.abs(), lv) * tc.sign()) if signed else project(tc, lv)
    return alpha * (tc + (q - tc).detach())


@pytest.mark.parametrize("signed", [False, True])
def test_alpha_gradient_matches_the_reparameterised_formula(signed):
    torch.manual_seed(0)
    lv = levels(4)
    x = (torch.randn(500, dtype=torch.float64) * 2).requires_grad_()
    a = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(500, dtype=torch.float64)
    out = apot_fake_quant(x, a, lv, signed=signed)
    gx, ga = torch.autograd.grad(out, (x, a), g)
    # hand-derived: inside d/dα = Π(t) − t, outside sign(t); d/dx = 1 inside, 0 outside
    t = x.detach() / a.detach()
    outside = t.abs() > 1 if signed else t > 1
    q = out.detach() / a.detach()
    expect_ga = (g * torch.where(outside, t.sign(), q - t)).sum()
    assert torch.allclose(ga, expect_ga, rtol=1e-12, atol=1e-12)
    assert torch.equal(gx, torch.where(outside, 0.0, g))
    # the same gradients from autograd on the detach()-written reference
    x2, a2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    rx, ra = torch.autograd.grad(_apot_reference(x2, a2, lv, signed), (x2, a2), g)
    assert torch.allclose(ga, ra) and torch.allclose(gx, rx)


@pytest.mark.parametrize("signed", [False, True])
def test_gradcheck_on_the_reparameterised_function(signed):
    """gradcheck: the backward is the exact derivative of ``S(x, α) = α·clip(x/α) + α·R`` with the
    projection residual ``R = Π(clip t) − clip t`` frozen at the evaluation point (where S is
    differentiable: away from the clip edges). The forward is shown S's values, the backward ours."""
    torch.manual_seed(1)
    lv = levels(3)
    x0 = torch.cat([torch.linspace(-2.9, -2.1, 5), torch.linspace(-1.7, 1.7, 12),
                    torch.linspace(2.1, 2.9, 5)])
    x = x0.double().requires_grad_()
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        t = x / a
        tc = t.clamp(-1, 1) if signed else t.clamp(max=1)
        residual = ((project(tc.abs(), lv) * tc.sign()) if signed else project(tc, lv)) - tc

    def fn(x, a):
        surrogate = a * ((x / a).clamp(-1, 1) if signed else (x / a).clamp(max=1)) + a * residual
        quant = APoTQuantize.apply(x, a, lv.double(), signed, True)
        return quant + (surrogate - quant).detach()

    assert torch.autograd.gradcheck(fn, (x, a), eps=1e-6, atol=1e-8)


def test_weight_path_passes_gradient_everywhere_activation_path_clips():
    lv = weight_levels(4)
    w = torch.tensor([-5.0, -0.5, 0.2, 4.0], requires_grad=True)
    apot_fake_quant(w, 2.0, lv, signed=True, clip_input_grad=False).sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    x = torch.tensor([-1.0, 0.5, 3.0, 9.0], requires_grad=True)
    apot_fake_quant(x, 2.0, levels(4)).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_bad_quantizer_inputs():
    lv = levels(4)
    with pytest.raises(ValueError, match="positive"):
        apot_fake_quant(torch.rand(3), 0.0, lv)
    with pytest.raises(ValueError, match="positive"):
        apot_fake_quant(torch.rand(3), torch.tensor(-1.0), lv)
    with pytest.raises(ValueError, match="positive"):
        apot_fake_quant(torch.rand(3), float("nan"), lv)
    with pytest.raises(TypeError, match="floating-point"):
        apot_fake_quant(torch.arange(3), 1.0, lv)
    with pytest.raises(TypeError, match="floating-point"):
        normalize_weight(torch.arange(3))


def test_weight_normalisation_uses_unbiased_std_and_detached_stats():
    w = torch.tensor([1.0, 2.0, 3.0, 6.0], requires_grad=True)
    wn = normalize_weight(w)
    assert torch.allclose(wn, (w - 3.0) / torch.tensor([1.0, 2.0, 3.0, 6.0]).std(unbiased=True))
    wn.sum().backward()
    assert torch.allclose(w.grad, torch.full((4,), 1 / w.detach().std()))


# ---------------------------------------------------------------- layers


def test_quant_conv_matches_the_authors_formulas():
    torch.manual_seed(0)
    conv = QuantConv2d(4, 5, 3, padding=1, bits=4)
    with torch.no_grad():
        conv.act_alpha.fill_(1.3)
        conv.weight_quant.wgt_alpha.fill_(2.1)
    x = torch.relu(torch.randn(2, 4, 6, 6))
    w = conv.weight.detach()
    wn = (w - w.mean()) / w.std()
    t = (wn / 2.1).clamp(-1, 1)
    wq = project(t.abs(), levels(3)) * t.sign() * 2.1
    xq = project((x / 1.3).clamp(max=1), levels(4)) * 1.3
    expect = torch.nn.functional.conv2d(xq, wq, padding=1)
    assert torch.allclose(conv(x), expect, atol=1e-6)
    keys = set(conv.state_dict())
    assert keys == {"weight", "act_alpha", "weight_quant.wgt_alpha"}  # level buffers are not persistent
    set_bits(nn.Sequential(conv), 2)
    assert conv.bits == 2 and conv.weight_quant.levels.tolist() == [0.0, 1.0]


def test_quant_linear_and_first_last_layers():
    torch.manual_seed(0)
    fc = QuantLinear(8, 3, bits=3)
    assert fc(torch.rand(4, 8)).shape == (4, 3)
    w = torch.tensor([[-2.0, 0.5], [1.0, 0.25]])  # signed max = 1.0, not |−2|
    q = max_quantize_weight(w, 8)
    assert torch.allclose(q, torch.round(w / 1.0 * 127) / 127 * 1.0)
    assert q[0, 0].item() == -2.0  # beyond the ±127 range: the authors' signed-max behaviour
    lin = FirstLastLinear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.1], [0.2, 0.123456]]))
    out = lin(torch.eye(2))
    assert torch.allclose(out - lin.bias, max_quantize_weight(lin.weight).t())
    conv = FirstLastConv2d(3, 4, 3)
    assert conv(torch.rand(1, 3, 5, 5)).shape == (1, 4, 3, 3)


def test_apot_quantize_swaps_layers_and_leaves_the_original():
    torch.manual_seed(0)
    model = create("resnet20", kind="conv", head="linear").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = apot_quantize(model, 3)
    assert isinstance(q.conv1, FirstLastConv2d) and isinstance(q.fc, FirstLastLinear)
    assert isinstance(q.layer1[0].conv1, QuantConv2d) and isinstance(q.layer2[0].downsample[0], QuantConv2d)
    assert q.layer1[0].conv1.bits == 3 and q.layer1[0].conv1.act_alpha.item() == 8.0
    assert q.layer1[0].conv1.weight_quant.wgt_alpha.item() == 3.0
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    assert q(x).shape == (2, 10)


def test_apot_quantize_from_data_fits_thresholds_and_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(4))
    x = torch.randn(16, 3, 9, 9)
    model(x)
    model.eval()
    qc = apot_quantize(model, 4, calib=[(x, None)])
    inner = [m for m in qc.modules() if isinstance(m, QuantConv2d)]
    assert len(inner) == 2 and all(0 < m.act_alpha.item() < 8 for m in inner)
    assert all(0 < m.weight_quant.wgt_alpha.item() < 3 for m in inner)  # MSE-fit on ~N(0, 1) weights
    assert not torch.equal(qc[4].running_var, model[4].running_var)  # re-estimated on the calibration data
    assert qc[4].running_var.min() > 0


def test_apot_quantize_errors():
    with pytest.raises(TypeError, match="adder"):
        apot_quantize(create("resnet20", kind="adder"), 4)
    q = apot_quantize(create("resnet20", kind="conv"), 4)
    with pytest.raises(ValueError, match="already"):
        apot_quantize(q, 4)
    with pytest.raises(ValueError, match="not inner"):
        apot_quantize(create("resnet20", kind="conv"), 4, layers=["conv1"])
    with pytest.raises(ValueError, match=r"2\.\.6"):
        apot_quantize(create("resnet20", kind="conv"), 8)


# ---------------------------------------------------------------- the authors' checkpoints


def _accuracy(model, x_uint8, y, norm, batch=512):
    mean = torch.tensor(norm[0]).view(1, 3, 1, 1)
    std = torch.tensor(norm[1]).view(1, 3, 1, 1)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x_uint8), batch):
            xb = torch.from_numpy(x_uint8[i:i + batch]).permute(0, 3, 1, 2).float().div(255)
            xb = (xb - mean) / std
            correct += int((model(xb).argmax(1) == torch.from_numpy(y[i:i + batch])).sum())
    return 100.0 * correct / len(x_uint8)


@pytest.fixture(scope="module")
def apot_files(checkpoints_root):
    paths = {k: checkpoints_root / f"apot-resnet20-cifar10-{k}.pth.tar" for k in ("fp32", "4bit")}
    if not all(p.exists() for p in paths.values()):
        pytest.skip("APoT checkpoints absent")
    return paths


@pytest.fixture(scope="module")
def subset(cifar_subset):
    with np.load(cifar_subset) as f:
        return f["x_test"], f["y_test"]


@pytest.mark.data
@pytest.mark.slow
def test_authors_checkpoints_reach_the_published_subset_accuracy(apot_files, subset):
    x, y = subset
    fp = checkpoints.load(apot_files["fp32"])
    assert fp.format == "apot" and fp.meta["bits"] == 32 and fp.normalization == CIFAR_APOT_NORM
    assert isinstance(fp.model.conv1, FirstLastConv2d) and type(fp.model.layer1[0].conv1) is nn.Conv2d
    assert _accuracy(fp.model, x, y, fp.normalization) == pytest.approx(94.30, abs=0.01)
    q4 = checkpoints.load(apot_files["4bit"], bits=4)
    assert (q4.name, q4.kind, q4.num_classes, q4.meta["bits"]) == ("resnet20", "conv", 10, 4)
    assert isinstance(q4.model.layer3[0].downsample[0], QuantConv2d)  # the file has alphas there
    assert _accuracy(q4.model, x, y, q4.normalization) == pytest.approx(92.53, abs=0.01)


@pytest.mark.data
def test_same_path_serves_other_bit_widths(apot_files, subset):
    x, y = subset
    from adderquant.checkpoints.apot import import_apot

    x, y = x[:96], y[:96]
    state = checkpoints.core._read_torch(apot_files["4bit"], unsafe=False)
    xb = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_APOT_NORM)
    xb = (xb - mean) / std
    outs = {}
    for bits in (2, 3, 4, 5):
        model = import_apot(state, None, {"bits": bits}).model
        assert model.layer1[0].conv1.bits == bits
        with torch.no_grad():
            outs[bits] = model(xb)
        assert torch.isfinite(outs[bits]).all()
    for a in (2, 3, 5):
        assert not torch.allclose(outs[a], outs[4])
    acc = {b: (o.argmax(1).numpy() == y).mean() for b, o in outs.items()}
    assert acc[3] > 0.6 and acc[5] > 0.8  # sensible: well above chance (2-bit collapses without QAT)


def test_importer_detection_and_errors(apot_files):
    from adderquant.checkpoints.apot import import_apot

    state = checkpoints.core._read_torch(apot_files["4bit"], unsafe=False)
    with pytest.raises(ValueError, match="--bits"):
        import_apot(state, None, {})
    with pytest.raises(ValueError, match=r"2\.\.6"):
        import_apot(state, None, {"bits": 7})
    assert import_apot(state, None, {"bits": 4, "format": "state_dict"}) is None
    no_fc = {k: v for k, v in state.items() if not k.startswith("fc.")}
    with pytest.raises(ValueError, match="unsupported APoT architecture"):
        import_apot(no_fc, None, {"bits": 4})
    fp_state = checkpoints.core._read_torch(apot_files["fp32"], unsafe=False)
    with pytest.warns(UserWarning, match="not trained"):
        ck = import_apot(fp_state, None, {"bits": 3})
    assert isinstance(ck.model.layer1[0].conv1, QuantConv2d) and ck.meta["bits"] == 3


def test_importer_ignores_other_state_dicts():
    from adderquant.checkpoints.apot import import_apot

    adder = create("resnet20", kind="adder").state_dict()
    assert import_apot(adder, None, {}) is None
    assert import_apot({"weight": torch.zeros(2, 2)}, None, {}) is None
    assert "apot" in [n for n, _ in checkpoints.IMPORTERS]


# ---------------------------------------------------------------- operation counts


def test_shift_add_costs():
    c = apot_shift_add_cost(4)  # sign + Q(3): at most 2 terms
    assert (c.shifts, c.adds, c.max_terms) == (2, 1, 2)
    u = apot_shift_add_cost(4, "uniform")  # sign + 3-bit magnitude: up to 3 set bits
    assert (u.shifts, u.adds) == (3, 2)
    m = apot_shift_add_cost(4, reduce="mean")
    assert (m.shifts, m.adds) == (1.25, 0.375)
    assert apot_shift_add_cost(4, "uniform", reduce="mean").ops == 2.125


def test_resnet50_apot_vs_uniform_compute():
    macs = layer_macs(create("resnet50", kind="conv"))
    assert len(macs) == 54 and sum(m.macs for m in macs) == pytest.approx(4.089e9, rel=1e-3)
    result = compare_resnet50(4, macs=macs)
    # two explicit models land near the abstract's 22 %:
    assert result["mean-shift-adds"][2] == pytest.approx(21.7, abs=0.1)
    assert result["worst-terms+acc"][2] == pytest.approx(23.6, abs=0.1)
    assert result["worst-adds+acc"][2] == pytest.approx(31.1, abs=0.1)


# ---------------------------------------------------------------- progressive QAT


def test_progressive_qat_runs_on_tiny_data():
    from adderquant.data.dataset import Dataset
    from adderquant.quant.apot_qat import apot_progressive_qat

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    data = Dataset("tiny", x, y, x[:16], y[:16], [str(i) for i in range(10)], "synthetic")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    stages = apot_progressive_qat(model, data, schedule=(32, 4, 2), epochs_per_stage=1, lr=0.01,
                                  batch_size=16, calib_images=16)
    assert set(stages) == {32, 4, 2}
    m32, m4, m2 = (stages[b].model for b in (32, 4, 2))
    assert isinstance(m32[0], FirstLastConv2d) and type(m32[2]) is nn.Conv2d
    assert m4[2].bits == 4 and m2[2].bits == 2
    assert m4[2] is not m2[2]
    assert all(0 <= s.top1 <= 100 for s in stages.values())
    assert type(model[0]) is nn.Conv2d  # original untouched
