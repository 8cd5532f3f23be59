"""The paper's quantizer: its theorems as property tests, and the PTQ/QAT machinery."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adderquant.nn import AdderConv2d
from adderquant.nn.functional import adder_conv2d
from adderquant.quant import QATConfig, QuantAdderConv2d, QuantConfig, calibrate, preset, qat, quantize
from adderquant.quant.adder_layer import window_sum
from adderquant.quant.grouping import clustering_cost, group_channels, optimal_1d_clusters
from adderquant.quant.observers import AbsRangeObserver, percentile_index
from adderquant.quant.ptq import layer_parameters, quantize_adder
from adderquant.quant.uniform import int_range

F64 = torch.float64
shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(3, 7), st.sampled_from([1, 3]))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.1, 5.0), st.floats(0.1, 5.0), st.integers(0, 2**31 - 1))
def test_theorem1_weight_clamp_is_exact(shape, r_lo, r_hi, seed):
    """X ⊕ W = X ⊕ clamp(W, a, c) − Σ dist(W, [a, c]) whenever every X lies in [a, c]."""
    n, cin, cout, hw, k = shape
    g = _gen(seed)
    lo, hi = -r_lo, r_hi
    x = lo + (hi - lo) * torch.rand(n, cin, hw, hw, generator=g, dtype=F64)
    w = 30 * torch.randn(cout, cin, k, k, generator=g, dtype=F64)
    clamped = w.clamp(lo, hi)
    bias = -(w - clamped).abs().flatten(1).sum(1)
    # padding would feed zeros, which lie in [a, c] as well, so test with padding too
    for pad in (0, k // 2):
        lhs = adder_conv2d(x, w, padding=pad)
        rhs = adder_conv2d(x, clamped, bias, padding=pad)
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.2, 3.0), st.integers(0, 2**31 - 1))
def test_lossless_activation_clamp_identity(shape, r, seed):
    """For |W| ≤ r: X ⊕ W = clamp(X, −r, r) ⊕ W − Σ_window max(|X| − r, 0) (additions only)."""
    n, cin, cout, hw, k = shape
    g = _gen(seed)
    x = 3 * r * torch.randn(n, cin, hw, hw, generator=g, dtype=F64)
    w = r * (2 * torch.rand(cout, cin, k, k, generator=g, dtype=F64) - 1)
    excess = (x.abs() - r).clamp_min(0)
    lhs = adder_conv2d(x, w, padding=k // 2)
    rhs = adder_conv2d(x.clamp(-r, r), w, padding=k // 2) - window_sum(excess, (k, k), 1, k // 2, 1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_lossless_clamp_layer_equals_unclamped_rounding(bits, seed):
    """With the switch on, a quantized layer computes s·(round(X/s) ⊕ w̄): no clamping loss at all."""
    g = _gen(seed)
    w = torch.randn(6, 3, 3, 3, generator=g)
    x = 4 * torch.randn(2, 3, 6, 6, generator=g)  # many activations beyond the range
    ranges = torch.tensor([0.5, 1.5])
    group_of = torch.tensor([0, 1, 0, 1, 1, 0])
    layer = QuantAdderConv2d(w, (1, 1), (1, 1), (1, 1), bits=bits, group_of=group_of, ranges=ranges,
                             clamp_bias=None, lossless_act_clamp=True).eval()
    with torch.no_grad():
        y = layer(x)
    s = 2 * ranges / (2**bits - 1)
    w_int = layer.int_weight()
    for j in range(2):
        idx = (group_of == j).nonzero().flatten()
        expect = s[j].double() * adder_conv2d(torch.round(x / s[j]).double(), w_int[idx].double(), padding=1)
        torch.testing.assert_close(y[:, idx].double(), expect, rtol=1e-6, atol=1e-4)


def test_quantized_values_stay_in_integer_range():
    w = 50 * torch.randn(8, 4, 3, 3)
    layer = QuantAdderConv2d(w, (1, 1), (0, 0), (1, 1), bits=4, group_of=torch.zeros(8, dtype=torch.long),
                             ranges=torch.tensor([1.0]), clamp_bias=None)
    qn, qp = int_range(4)
    wi = layer.int_weight()
    assert wi.min() >= qn and wi.max() <= qp and torch.equal(wi, wi.round())


@pytest.mark.parametrize("n,alpha", [(1, 0.999), (10, 0.5), (1000, 0.999), (1001, 0.9), (7, 1.0)])
def test_percentile_index_formula(n, alpha):
    assert percentile_index(n, alpha) == math.ceil(alpha * (n - 1))
    v = torch.randn(n).abs()
    obs = AbsRangeObserver(alpha)
    obs.observe(v)
    assert obs.percentile() == float(torch.sort(v).values[math.ceil(alpha * (n - 1))])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 400), st.floats(0.9, 1.0), st.floats(0.0, 1.0), st.integers(0, 999))
def test_streaming_observer_is_exact(batches, per_batch, alpha, extra, seed):
    """Keeping only the top values (n known) gives the same percentile as sorting everything."""
    g = _gen(seed)
    data = [torch.randn(per_batch, generator=g) for _ in range(batches)]
    n = batches * per_batch
    obs = AbsRangeObserver(alpha, total=n)
    for d in data:
        obs.observe(d)
    allv = torch.sort(torch.cat(data).abs()).values
    asked = alpha + (1 - alpha) * extra  # any α at or above the one kept for
    assert obs.percentile(asked) == float(allv[percentile_index(n, asked)])
    assert obs.max == float(allv[-1])


def test_dp_clustering_is_optimal_for_eq15():
    g = _gen(0)
    for _ in range(30):
        n, k = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        v = torch.rand(n, generator=g, dtype=F64)
        best = min(clustering_cost(v, torch.tensor(a)) for a in itertools.product(range(k), repeat=n))
        assert clustering_cost(v, optimal_1d_clusters(v, k)) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("feature", ["max", "mean", "all", "uniform"])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_group_count_and_order(feature, groups):
    w = torch.randn(16, 4, 3, 3, generator=_gen(1)) * torch.linspace(0.1, 9, 16).view(-1, 1, 1, 1)
    labels = group_channels(w, groups, feature)
    assert labels.shape == (16,)
    assert set(labels.tolist()) == set(range(min(groups, 16)))
    if feature in ("max", "mean"):  # 1-D clusters are runs of the sorted feature: order preserved
        f = w.abs().flatten(1).amax(1) if feature == "max" else w.abs().flatten(1).mean(1)
        order = torch.argsort(f)
        assert torch.all(labels[order].diff() >= 0)


@pytest.mark.parametrize("source", ["min", "weights", "activations"])
def test_group_ranges_monotone_and_bounded(source):
    w = torch.randn(32, 8, 3, 3, generator=_gen(2)) * torch.linspace(0.2, 40, 32).view(-1, 1, 1, 1)
    r_x = 3.0
    config = QuantConfig.paper(4, scale_source=source, weight_clamp=False)
    _, group_of, ranges, _ = layer_parameters(w, r_x, config)
    assert torch.all(ranges.diff() >= 0)  # groups ordered by max|W| give ordered scales
    if source == "min":
        assert ranges.max() <= r_x + 1e-6
    if source == "activations":
        assert torch.allclose(ranges, torch.full_like(ranges, r_x))


def test_weight_clamp_folds_into_bias_exactly_for_quantized_inputs():
    """After PTQ parameters, the clamped layer with its bias equals the unclamped weights on any
    activation the quantizer can produce."""
    w = 20 * torch.randn(8, 4, 3, 3, generator=_gen(3), dtype=F64)
    config = QuantConfig.paper(4)
    wc, group_of, ranges, bias = layer_parameters(w, 1.0, config)
    qn, qp = int_range(4)
    s = (2 * ranges / 15).double()[group_of].view(-1, 1, 1, 1)
    assert torch.all(wc >= qn * s - 1e-12) and torch.all(wc <= qp * s + 1e-12)
    x_int = torch.randint(qn, qp + 1, (2, 4, 5, 5), generator=_gen(4)).double()
    for j in range(int(group_of.max()) + 1):
        idx = (group_of == j).nonzero().flatten()
        xs = x_int * s[idx[0]]
        torch.testing.assert_close(adder_conv2d(xs, w[idx]), adder_conv2d(xs, wc[idx], bias[idx]), rtol=1e-12, atol=0)


def _tiny_adder_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               AdderConv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               AdderConv2d(8, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()


def test_quantize_leaves_original_untouched_and_high_bits_match_fp():
    model = _tiny_adder_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randn(16, 3, 8, 8)
    q = quantize(model, calib, QuantConfig.paper(16, act_clamp=False)).model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, QuantAdderConv2d) for m in q.modules()) == 2
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(x), model(x), rtol=1e-2, atol=1e-2)


def test_qssf_picks_the_better_variant_and_records_scores():
    model = _tiny_adder_net()
    calib = torch.randn(32, 3, 8, 8)
    result = quantize(model, calib, QuantConfig.qssf("best", 4))
    scores = result.calibration_scores
    assert set(scores) == {"qssf-w", "qssf-a"}
    assert scores[result.config.method] == max(scores.values())


def test_one_calibration_serves_many_configs():
    model = _tiny_adder_net()
    calib = torch.randn(16, 3, 8, 8)
    obs = calibrate(model, calib, QuantConfig.paper(4), progress=False, min_alpha=0.99)
    for alpha in (0.99, 0.999, 1.0):
        cfg = QuantConfig.paper(4, alpha=alpha)
        a = quantize(model, calib, cfg)
        b = quantize_adder(model, calib, cfg, observers=obs)
        assert a.layers["2"]["r_x"] == pytest.approx(b.layers["2"]["r_x"])


def test_qat_steps_reduce_loss_with_ste():
    from adderquant.data import Dataset

    g = _gen(5)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = (x.float().mean((1, 2, 3)) > 127).long()  # a learnable rule
    ds = Dataset("toy", x, y, x[:32], y[:32], ["0", "1", "2", "3"], "memory")
    model = _tiny_adder_net()
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    q = quantize(model, (x.float() / 255 - 0.5) / 0.25, QuantConfig.paper(4)).model
    w0 = [m.weight.detach().clone() for m in q.modules() if isinstance(m, QuantAdderConv2d)]
    log = qat(q, ds, norm, QATConfig(epochs=3, lr=0.05, batch_size=16), progress=False, float_model=model)
    assert len(log) == 3 and log[-1]["train_loss"] < log[0]["train_loss"]
    w1 = [m.weight.detach() for m in q.modules() if isinstance(m, QuantAdderConv2d)]
    assert any(not torch.equal(a, b) for a, b in zip(w0, w1, strict=True))  # gradients reached the weights


def test_qat_gradient_cap_bounds_every_step():
    """With ``clip_grad_norm`` the total update of one plain-SGD step is at most lr × the cap."""
    from adderquant.data import Dataset

    g = _gen(6)
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = (x.float().mean((1, 2, 3)) > 127).long()
    ds = Dataset("toy", x, y, x[:16], y[:16], ["0", "1", "2", "3"], "memory")
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for cap, bounded in ((1e-3, True), (None, False)):
        q = quantize(_tiny_adder_net(), (x.float() / 255 - 0.5) / 0.25, QuantConfig.paper(4)).model
        before = torch.cat([p.detach().flatten().clone() for p in q.parameters()])
        qat(q, ds, norm, QATConfig(epochs=1, lr=0.5, momentum=0.0, weight_decay=0.0, batch_size=32, max_steps=1,
                                   clip_grad_norm=cap, latent=False, distill=0.0), progress=False)
        moved = float((torch.cat([p.detach().flatten() for p in q.parameters()]) - before).norm())
        assert (moved <= 0.5 * 1e-3 * (1 + 1e-4)) == bounded, (cap, moved)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=1)
    with pytest.raises(ValueError, match="alpha"):
        QuantConfig(alpha=0.0)
    with pytest.raises(ValueError, match="group_feature"):
        QuantConfig(group_feature="median")
    with pytest.raises(ValueError, match="method"):
        preset("nonsense", 4)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=4.5)
    with pytest.raises(ValueError, match="QSSF .* takes no groups"):
        preset("qssf", 4, groups=2)
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize(_tiny_adder_net(), torch.randn(2, 3, 8, 8), "paper")


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_unsigned_grid_keeps_theorem1_exact_for_nonnegative_inputs(bits, seed):
    """Non-negative activations: clamping W to [0, q_p·s] and folding the rest is lossless."""
    g = _gen(seed)
    w = 10 * torch.randn(6, 3, 3, 3, generator=g, dtype=F64)
    config = QuantConfig.paper(bits, unsigned_activations=True)
    wc, group_of, ranges, bias = layer_parameters(w, 1.0, config, signed=False)
    qn, qp = int_range(bits, signed=False)
    s = (ranges / (2**bits - 1)).double()[group_of].view(-1, 1, 1, 1)
    assert qn == 0 and torch.all(wc >= 0) and torch.all(wc <= qp * s + 1e-12)
    x = torch.randint(0, qp + 1, (2, 3, 5, 5), generator=g).double()
    for j in range(int(group_of.max()) + 1):
        idx = (group_of == j).nonzero().flatten()
        xs = x * s[idx[0]]
        torch.testing.assert_close(adder_conv2d(xs, w[idx], padding=1), adder_conv2d(xs, wc[idx], bias[idx], padding=1),
                                   rtol=1e-12, atol=1e-12)


def test_unsigned_grid_applies_only_to_nonnegative_layers():
    model = _tiny_adder_net()
    model[2] = AdderConv2d(3, 8, 3, padding=1)  # fed by the raw (signed) input
    model = torch.nn.Sequential(*list(model.children())[2:]).eval()
    q = quantize(model, torch.randn(16, 3, 8, 8), QuantConfig.ours_fast(4)).model
    layers = [m for m in q.modules() if isinstance(m, QuantAdderConv2d)]
    assert [m.signed for m in layers] == [True, False]
    assert layers[1].int_bounds() == (0, 15)


def test_apot_grid_projects_both_operands_onto_scaled_levels():
    from adderquant.quant.apot import levels, project

    g = _gen(7)
    w = 0.9 * (2 * torch.rand(4, 2, 3, 3, generator=g) - 1)  # inside [-r, r]: no clamp needed
    x = torch.rand(2, 2, 5, 5, generator=g) * 1.5
    layer = QuantAdderConv2d(w, (1, 1), (1, 1), (1, 1), bits=4, group_of=torch.zeros(4, dtype=torch.long),
                             ranges=torch.tensor([1.0]), clamp_bias=None, signed=True, grid="apot").eval()
    lv = levels(4, "apot", signed=True)
    expect = adder_conv2d(project(x.clamp(-1, 1), lv), project(w, lv), padding=1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expect)
    assert set(project(w, lv).unique().tolist()) <= set(lv.tolist())
    with pytest.raises(ValueError, match="APoT"):
        QuantConfig.paper(8, grid="apot")


def test_quantize_refuses_models_it_would_return_unchanged():
    with pytest.raises(ValueError, match="no adder layers"):
        quantize(torch.nn.Identity(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no adder layers"):
        quantize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="groups=1000"):
        quantize(_tiny_adder_net(), torch.randn(2, 3, 8, 8), QuantConfig.paper(4, groups=1000))
