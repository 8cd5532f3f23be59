"""BatchNorm re-estimation after PTQ (``QuantConfig.bn_recalibration``) and the authors' preset
(``QuantConfig.authors``: unsigned activations, double-step signed weights, per-batch r_x), checked
against direct float64 formulas, brute-force sorts and the integer path."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adderquant.data import normalize
from adderquant.data.augment import crop_flip
from adderquant.models.resnet_cifar import CifarResNet
from adderquant.nn import AdderConv2d
from adderquant.quant import QuantAdderConv2d, QuantConfig, preset, quantize
from adderquant.quant.bn import reestimate_bn
from adderquant.quant.config import FINE_RANGE_ALPHAS, METHODS
from adderquant.quant.first_last import QuantFirstLast
from adderquant.quant.observers import AbsRangeObserver, batch_percentile_index
from adderquant.quant.ptq import calibrate, layer_parameters
from test_integer import NORM, _bn_calibrated, _check_model


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _spread_adder_weights(model: nn.Module, factors=(1.0, 8.0, 30.0, 80.0)) -> nn.Module:
    """Scale each adder layer's output channels by one of ``factors`` (in four channel blocks), so that
    some groups' max|W| lie below the activation range r_x and some above (both branches of the rule)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdderConv2d):
                block = torch.arange(m.weight.shape[0]) * len(factors) // m.weight.shape[0]
                m.weight.mul_(torch.tensor(factors)[block].view(-1, 1, 1, 1))
    return model


def _tiny(images, seed=0):
    torch.manual_seed(seed)
    return _bn_calibrated(_spread_adder_weights(CifarResNet(8)), images)


# --------------------------------------------------------------------------- BatchNorm re-estimation


def _record_bn_inputs(model):
    """Hooks recording every BatchNorm's input and the model's input batches."""
    store = {"model": []}
    handles = [model.register_forward_pre_hook(lambda _m, inp: store["model"].append(inp[0].detach().clone()))]
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            store[name] = []
            handles.append(m.register_forward_pre_hook(
                lambda _m, inp, name=name: store[name].append(inp[0].detach().double().clone())))
    return store, handles


def test_bn_reestimation_equals_the_statistics_of_all_its_batches(images):
    model = _tiny(images)
    calib = normalize(images, *NORM)
    base = quantize(model, calib, QuantConfig.paper(4)).model
    q = copy.deepcopy(base)
    modes = [m.training for m in q.modules()]
    store, handles = _record_bn_inputs(q)
    darkest = calib.amin((0, 2, 3))  # the config's default padding: black of the normalised images
    assert torch.equal(darkest, normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), *NORM).flatten())
    assert reestimate_bn(q, calib, 5, momentum=None, batch_size=4, fill=darkest) == 5
    for h in handles:
        h.remove()
    assert [m.training for m in q.modules()] == modes  # every module's mode restored
    # float64 reference: mean and unbiased variance of the concatenated inputs of each BatchNorm
    for name, m in q.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            x = torch.cat(store[name])
            assert x.shape[0] == 5 * 4
            mean = x.mean((0, 2, 3))
            var = x.var((0, 2, 3), unbiased=True)
            torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(m.running_var.double(), var, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(m.running_var, base.get_submodule(name).running_var)
    # the batches: full, drawn from the calibration images, each a 4-pad crop (padded with black, as a
    # crop of the raw image) with a horizontal flip or not
    crops = {}
    for dy, dx, f in itertools.product(range(9), range(9), (False, True)):
        n = len(calib)
        crops[(dy, dx, f)] = crop_flip(calib, torch.full((n,), dy), torch.full((n,), dx),
                                       torch.full((n,), f), 4, fill=darkest)
    for xb in store["model"]:
        assert xb.shape == (4, 3, 32, 32)
        for img in xb:
            assert any(torch.equal(img, c[i]) for c in crops.values() for i in range(len(calib)))
    # the same through the config, and deterministic
    r = quantize(model, calib, QuantConfig.paper(4, bn_recalibration=5, bn_batch_size=4))
    assert not any(m.training for m in r.model.modules())  # evaluation mode after the re-estimation
    for name, m in r.model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, q.get_submodule(name).running_mean)
            assert torch.equal(m.running_var, q.get_submodule(name).running_var)


def test_bn_reestimation_ema_follows_pytorch_momentum(images):
    model = _tiny(images, seed=1)
    calib = normalize(images, *NORM)
    q = quantize(model, calib, QuantConfig.ours_fast(4)).model
    start = {n: (m.running_mean.double().clone(), m.running_var.double().clone())
             for n, m in q.named_modules() if isinstance(m, nn.BatchNorm2d)}
    store, handles = _record_bn_inputs(q)
    reestimate_bn(q, calib, 3, momentum=0.1, batch_size=3)
    for h in handles:
        h.remove()
    for name, (mean, var) in start.items():
        for x in store[name]:
            mean = 0.9 * mean + 0.1 * x.mean((0, 2, 3))
            var = 0.9 * var + 0.1 * x.var((0, 2, 3), unbiased=True)
        m = q.get_submodule(name)
        torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert m.momentum is None  # restored (the fixture's BatchNorms use None)


def test_bn_reestimation_keeps_the_model_exportable(images):
    model = _tiny(images, seed=2)
    config = QuantConfig.paper(4, quantize_first_last=True, bn_recalibration=4, bn_batch_size=4)
    q = quantize(model, normalize(images, *NORM), config).model
    _check_model(q, images, numpy_images=2)


@pytest.mark.parametrize("kw", [{"bn_recalibration": -1}, {"bn_recalibration": 1.5}, {"bn_batch_size": 1},
                                {"bn_momentum": 0.0}, {"bn_momentum": 1.5}, {"bn_momentum": -0.1}])
def test_bad_bn_options_are_refused(kw):
    with pytest.raises(ValueError, match="bn_"):
        QuantConfig.paper(4, **kw)
    with pytest.raises(ValueError, match="bn_"):
        preset("authors", 4, **kw)
    with pytest.raises(ValueError, match="bn_"):
        reestimate_bn(nn.BatchNorm2d(2), torch.zeros(4, 2, 3, 3), kw.get("bn_recalibration", 1),
                      momentum=kw.get("bn_momentum"), batch_size=kw.get("bn_batch_size", 2))


def test_bn_pad_picks_what_the_crops_pad_with(images):
    model = _tiny(images, seed=3)
    calib = normalize(images, *NORM)
    base = quantize(model, calib, QuantConfig.paper(4)).model
    for pad, fill in (("zero", None), ((0.5, -1.0, 2.0), torch.tensor([0.5, -1.0, 2.0]))):
        direct = copy.deepcopy(base)
        reestimate_bn(direct, calib, 3, batch_size=4, fill=fill)
        config = QuantConfig.paper(4, bn_recalibration=3, bn_batch_size=4, bn_pad=pad)
        via_config = quantize(model, calib, config).model
        darkest = quantize(model, calib, config.with_(bn_pad="darkest")).model
        for name, m in via_config.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.equal(m.running_mean, direct.get_submodule(name).running_mean)
        means = [m.running_mean for m in darkest.modules() if isinstance(m, nn.BatchNorm2d)]
        assert not all(torch.equal(a, m.running_mean) for a, m in
                       zip(means, (m for m in via_config.modules() if isinstance(m, nn.BatchNorm2d)), strict=True))


@pytest.mark.parametrize("pad", ["grey", (), (1.0, float("nan"), 0.0), (True, 0.0, 0.0), [0.0, 0.0, 0.0]])
def test_bad_bn_pad_is_refused(pad):
    with pytest.raises(ValueError, match="bn_pad"):
        QuantConfig.paper(4, bn_pad=pad)


def test_bn_pad_for_another_number_of_channels_is_refused_before_work(images):
    model = _tiny(images)
    with pytest.raises(ValueError, match="bn_pad has 2 values, the model takes 3 input channels"):
        quantize(model, "not even images", QuantConfig.paper(4, bn_recalibration=2, bn_pad=(0.0, 0.0)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_calibration_data_is_refused(images, bad):
    model = _tiny(images)
    calib = normalize(images, *NORM)
    calib[3, 1, 5, 7] = bad
    for config in (QuantConfig.paper(4), QuantConfig.authors(4, bn_recalibration=1, bn_batch_size=2)):
        with pytest.raises(ValueError, match="NaN/inf"):
            quantize(model, calib, config)
        with pytest.raises(ValueError, match="NaN/inf"):
            calibrate(model, [(calib[:3], None), (calib[3:], None)], config)


def test_the_presets_and_the_cli_know_the_authors_method():
    assert "authors" in METHODS
    c = preset("authors", 4)
    assert c == QuantConfig.authors(4) and c.method == "authors" and c.weight_grid == "double_step"
    assert (c.bn_recalibration, c.bn_momentum, c.act_clamp_mode, c.alpha, c.clamp_to) == (
        200, 0.1, "batch_max", 0.9997, "range")
    assert not c.quantize_first_last
    assert QuantConfig.paper(4).bn_recalibration == 0 and QuantConfig.ours_fast(4).weight_grid == "shared"
    assert QuantConfig.qssf("best", 4, bn_recalibration=3).bn_recalibration == 3
    from adderquant.cli import _quantize_run, build_parser

    args = build_parser().parse_args(["quantize", "--method", "authors", "--bn-recalibration", "7"])
    assert _quantize_run(args).quant.bn_recalibration == 7


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
SWITCHES = {"paper-unsigned": {}, "+bn-mean": {"bn_correction": "mean"}, "+bn-mean-var": {"bn_correction": "mean_var"},
            "+bn-reestimate": {"bn_recalibration": 50},
            "+search": {"range_search": True}, "+search+bn-mean": {"range_search": True, "bn_correction": "mean"},
            "+search+bn-mean-var": {"range_search": True, "bn_correction": "mean_var"},
            "+search+bn-reestimate": {"range_search": True, "bn_recalibration": 50}}
SWITCHES.update({f"+{scope}-{name[1:]}": {**SWITCHES[name], "range_search_scope": scope}
                 for scope in ("group", "regroup")
                 for name in ("+search+bn-mean", "+search+bn-mean-var", "+search+bn-reestimate")})
SWITCHES.update({f"+regroup-fine-{name[9:]}": {**SWITCHES[name], "range_alphas": FINE_RANGE_ALPHAS}
                 for name in ("+regroup-search+bn-mean-var", "+regroup-search+bn-reestimate")})
SWITCHES.update({name.replace("-search", f"-{metric}-search"): {**SWITCHES[name], "range_search_metric": metric}
                 for name, metric in (("+regroup-search+bn-mean-var", "centered"),
                                      ("+regroup-fine-search+bn-mean-var", "centered"),
                                      ("+regroup-search+bn-mean-var", "fisher"),
                                      ("+group-search+bn-mean-var", "kl"))})


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_ours_presets_encode_the_committed_held_out_choices(bits):
    """``ours-fast`` is the fast switch set ptq_select.json chose at this width; ``ours`` is the set, with
    or without 200 learned-rounding iterations, with the lowest mean held-out KL of every row measured
    at this width (recomputed here from the rows) — the presets cannot drift from the measurement that
    justifies them."""
    chosen = json.loads((RESULTS / "ptq_select.json").read_text())
    fast_pick, pick = chosen["chosen_fast"][str(bits)], chosen["chosen"][str(bits)]
    kl = {}
    for row in chosen["rows"]:
        if row["bits"] == bits:
            kl.setdefault(row["candidate"], []).append(row["held_out_kl"])
    mean = {name: sum(v) / len(v) for name, v in kl.items()}
    assert mean[pick] == min(mean.values())
    assert mean[fast_pick] == min(v for name, v in mean.items() if not name.endswith("+rounding"))
    base = QuantConfig(bits=bits, unsigned_activations=True)
    fast = QuantConfig.ours_fast(bits)
    assert fast == base.with_(method="ours-fast", **SWITCHES[fast_pick]) and fast.learned_rounding == 0
    rounding = 200 if pick.endswith("+rounding") else 0
    best = base.with_(method="ours", **SWITCHES[pick.removesuffix("+rounding")], learned_rounding=rounding)
    assert QuantConfig.ours(bits) == best
    assert preset("ours", bits) == QuantConfig.ours(bits) and preset("ours-fast", bits) == fast


def test_the_fast_path_is_the_default_everywhere():
    from adderquant.cli import _quantize_run, build_parser
    from adderquant.workflows import PTQRun

    assert _quantize_run(build_parser().parse_args(["quantize"])).quant == QuantConfig.ours_fast(4) == PTQRun().quant
    assert _quantize_run(build_parser().parse_args(["quantize", "--method", "ours", "--bits", "3"])).quant == (
        QuantConfig.ours(3))
    assert QuantConfig.ours(16).learned_rounding == QuantConfig.ours(8).learned_rounding  # wider: the 8-bit choice


def test_cli_switches_reach_the_config_of_any_method():
    """--bn-correction, --range-search and --learned-rounding override the preset's switches, so a recipe such
    as an earlier `ours-fast` (paper-unsigned + the mean correction) stays expressible."""
    from adderquant.cli import _quantize_run, build_parser

    args = ["quantize", "--method", "paper-unsigned", "--bits", "3", "--bn-correction", "mean", "--range-search",
            "--range-search-scope", "group", "--range-search-metric", "centered", "--learned-rounding", "7"]
    assert _quantize_run(build_parser().parse_args(args)).quant == QuantConfig.paper_unsigned(
        3, bn_correction="mean", range_search=True, range_search_scope="group", range_search_metric="centered",
        learned_rounding=7)
    assert _quantize_run(build_parser().parse_args(["quantize", "--method", "paper"])).quant == QuantConfig.paper(4)


@pytest.mark.parametrize("flags", [["--method", "qssf", "--range-search"], ["--learned-rounding", "-1"],
                                   ["--method", "paper", "--range-search-metric", "kl"],
                                   ["--method", "paper", "--bn-correction", "mean", "--bn-recalibration", "3"]])
def test_cli_refuses_bad_switches_in_one_line_before_any_work(flags, capsys, tmp_path, monkeypatch):
    from adderquant.cli import main

    monkeypatch.setattr("adderquant.cli._data", lambda args: pytest.fail("data was loaded before the check"))
    assert main(["quantize", "--checkpoint", str(tmp_path / "never-read.pth"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adderquant quantize: error:")


def test_cli_refuses_negative_bn_recalibration_before_any_work(capsys, tmp_path, monkeypatch):
    from adderquant.cli import main

    monkeypatch.setattr("adderquant.cli._data", lambda args: pytest.fail("data was loaded before the check"))
    assert main(["quantize", "--checkpoint", str(tmp_path / "never-read.pth"), "--bn-recalibration", "-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bn_recalibration must be an integer ≥ 0" in err, err


# ------------------------------------------------------------------------------- the authors' preset


def test_per_batch_percentile_index_matches_a_brute_force_sort():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 100, 3333, 10_000, 65_536, 123_457]:
        want = int((round(n * 0.9997) - 1) * 0.9997)
        assert batch_percentile_index(n, 0.9997) == min(n - 1, max(0, want))
    obs = AbsRangeObserver(0.9997, batch_alpha=0.9997)
    values = []
    for n in (5000, 12_345, 777):  # three batches
        x = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * rng.uniform(0.5, 3))
        obs.observe(x.view(1, -1))
        a = np.sort(np.abs(x.numpy().astype(np.float64)))
        values.append(a[int((round(n * 0.9997) - 1) * 0.9997)])
    assert obs.batch_max == max(values)
    assert obs.range(True, "batch_max") == max(values)
    with pytest.raises(ValueError, match="batch_max"):
        AbsRangeObserver(0.999).range(True, "batch_max")


def test_calibration_takes_the_running_max_over_128_image_batches(images):
    model = _tiny(images)
    calib = normalize(images[torch.arange(300) % 6], *NORM) + 0.01 * torch.randn(300, 3, 32, 32,
                                                                                   generator=torch.Generator().manual_seed(3))
    name = "layer2.0.conv1"
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    obs = calibrate(model, calib, QuantConfig.authors(4))
    h.remove()
    assert [x.shape[0] for x in seen] == [128, 128, 44]
    want = max(float(np.sort(x.abs().double().flatten().numpy())[batch_percentile_index(x.numel(), 0.9997)])
               for x in seen)
    assert obs[name].batch_max == want


def _authors_reference(w: torch.Tensor, x: torch.Tensor, r_x: float, group_of: torch.Tensor, bits: int):
    """The authors' layer by its formulas in float64: per group r = r_x if max|W_g| > r_x (weights
    clamped to [−r_x, r_x], the excess into the bias), else r = max|W_g|."""
    w, x = w.double(), x.double()
    n = 2**bits - 1
    out, accs, codes = [], [], torch.empty_like(w)
    for c in range(w.shape[0]):
        g = group_of[c]
        r_w = float(w[group_of == g].abs().max())
        r = r_x if r_w > r_x else r_w
        wc = w[c].clamp(-r_x, r_x) if r_w > r_x else w[c]
        bias = -float((w[c].abs() - r_x).clamp_min(0).sum()) if r_w > r_x else 0.0
        w_q = torch.clamp(torch.round(wc * n / (2 * r)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        a_q = torch.clamp(torch.round(x * n / r), 0, n)
        codes[c] = w_q
        a_hat, w_hat = a_q * r / n, w_q * 2 * r / n
        cols = nn.functional.unfold(a_hat, w.shape[2:], padding=1)  # (N, C·k·k, P)
        y = -(cols - w_hat.flatten()[None, :, None]).abs().sum(1) + bias
        out.append(y.view(x.shape[0], x.shape[2], x.shape[3]))
        acc = -(nn.functional.unfold(a_q, w.shape[2:], padding=1) - 2 * w_q.flatten()[None, :, None]).abs().sum(1)
        accs.append(acc.view(x.shape[0], x.shape[2], x.shape[3]))
    return torch.stack(out, 1), torch.stack(accs, 1), codes


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_authors_grids_and_group_rule_match_the_formulas(bits):
    g = torch.Generator().manual_seed(bits)
    cout, cin = 16, 6
    scale = torch.tensor([0.3, 0.5, 4.0, 9.0]).repeat_interleave(4).view(-1, 1, 1, 1)  # 4 clear magnitude groups
    w = (torch.rand(cout, cin, 3, 3, generator=g) * 2 - 1) * scale
    w[:, 0, 0, 0] = scale.flatten()  # each block's max|W| is its scale
    x = torch.rand(2, cin, 5, 5, generator=g) * 2.5
    r_x = 2.0
    config = QuantConfig.authors(bits)
    w_c, group_of, ranges, bias = layer_parameters(w, r_x, config, signed=True)
    # 4 groups by max|W| (k-means-optimal on the four blocks); r = max|W_g| below r_x, r_x above
    assert torch.equal(group_of, torch.arange(cout) // 4)
    assert ranges.tolist() == pytest.approx([0.3, 0.5, 2.0, 2.0])
    assert float(w_c.abs().max()) <= r_x
    torch.testing.assert_close(bias.double(), -(w.double().abs() - r_x).clamp_min(0).flatten(1).sum(1))
    assert torch.equal(bias[:8], torch.zeros(8, dtype=bias.dtype))
    layer = QuantAdderConv2d(w_c, 1, 1, 1, bits=bits, group_of=group_of, ranges=ranges, clamp_bias=bias,
                             signed=False, weight_grid="double_step").eval()
    want, want_acc, codes = _authors_reference(w, x, r_x, group_of, bits)
    assert torch.equal(layer.int_weight().double(), codes)
    assert torch.equal(layer.acc_weight(), 2 * layer.int_weight())
    assert layer.acc_weight_bounds() == (-(2**bits), 2**bits - 2)
    with torch.no_grad():
        got = layer(x.double())
    s = layer.channel_scales().double().view(1, -1, 1, 1)  # float32 steps r_j/(2^b−1)
    acc = (got - layer.clamp_bias.double().view(1, -1, 1, 1)) / s
    assert torch.equal(acc.round(), want_acc) and float((acc - acc.round()).abs().max()) < 1e-6
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # ŵ, â with float32 steps
    with pytest.raises(ValueError, match="double_step"):
        QuantAdderConv2d(w_c, 1, 1, 1, bits=bits, group_of=group_of, ranges=ranges, clamp_bias=bias,
                         signed=True, weight_grid="double_step")


def test_authors_preset_builds_the_authors_layers(images):
    model = _tiny(images)
    calib = normalize(images, *NORM)
    r = quantize(model, calib, QuantConfig.authors(4, bn_recalibration=2, bn_batch_size=3))
    layers = [m for m in r.model.modules() if isinstance(m, QuantAdderConv2d)]
    assert layers and all(m.weight_grid == "double_step" and not m.signed for m in layers)
    assert not any(isinstance(m, QuantFirstLast) for m in r.model.modules())  # first/last: full precision
    below = above = 0
    for name, info in r.layers.items():  # r = min(max|W_g|, r_x) per group, both cases present
        m = r.model.get_submodule(name)
        r_w = [float(model.get_submodule(name).weight.detach()[m.group_of == j].abs().max()) for j in range(m.groups)]
        assert info["ranges"] == pytest.approx([min(v, info["r_x"]) for v in r_w], rel=1e-6)
        below += sum(v < info["r_x"] for v in r_w)
        above += sum(v > info["r_x"] for v in r_w)
    assert below and above


@pytest.mark.parametrize("bits", [4, 8])
def test_authors_preset_exports_bit_exact(images, bits):
    model = _tiny(images, seed=bits)
    config = QuantConfig.authors(bits, quantize_first_last=True, bn_recalibration=3, bn_batch_size=4)
    q = quantize(model, normalize(images, *NORM), config).model
    g, _ = _check_model(q, images, numpy_images=2)
    adders = [n for n in g.nodes if n["op"] == "adder"]
    assert len(adders) == 8 and all(n["attrs"]["weight_grid"] == "double_step" for n in adders)
    assert all((n["attrs"]["qmin"], n["attrs"]["qmax"]) == (0, 2**bits - 1) for n in adders)
    for node in adders:
        w = g.tensors[node["params"]["weight"]]
        assert w.dtype == (np.int8 if bits == 4 else np.int16)
        assert w.min() >= -(2**bits) and w.max() <= 2**bits - 2 and (w % 2 == 0).all()
        mod = q.get_submodule(node["name"])
        np.testing.assert_array_equal(w, (2 * mod.int_weight()).to(torch.int64).numpy())
    assert any(g.tensors[n["params"]["weight"]].min() < 0 for n in adders)  # signed weights reach the graph


# --------------------------------------------------------------------------- BatchNorm correction


def _bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every BatchNorm's input on ``x``, float64 (an independent hook, not the library's)."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(
                lambda _m, inp, name=name: seen.__setitem__(name, inp[0].detach().double())))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("mode", ["mean", "mean_var"])
def test_bn_correction_moves_each_batchnorm_by_the_quantization_shift(images, mode):
    """After the correction, each BatchNorm normalises the quantized model's calibration inputs to the
    same per-channel mean (and, for mean_var, spread) as the float model's BatchNorm does its own."""
    fp = _tiny(images)
    calib = normalize(images, *NORM)
    plain = quantize(fp, calib, QuantConfig.paper(3, unsigned_activations=True)).model
    fixed = quantize(fp, calib, QuantConfig.paper(3, unsigned_activations=True, bn_correction=mode)).model
    ins_fp, ins_q = _bn_inputs(fp, calib), _bn_inputs(fixed, calib)
    bns_fp, bns_q = dict(fp.named_modules()), dict(fixed.named_modules())
    moved = 0
    for name, x_f in ins_fp.items():
        x_q = ins_q[name]
        dims = [0, 2, 3]
        bf, bq = bns_fp[name], bns_q[name]
        sig_f = (bf.running_var.double() + bf.eps).sqrt()
        sig_q = (bq.running_var.double() + bq.eps).sqrt()
        z_f = (x_f.mean(dims) - bf.running_mean.double()) / sig_f
        z_q = (x_q.mean(dims) - bq.running_mean.double()) / sig_q
        # the running statistics are float32 buffers: agreement up to their rounding
        tol = 8 * torch.finfo(torch.float32).eps * float(x_f.abs().max().clamp_min(1))
        if mode == "mean":  # classic bias correction: the same mean offset, the variance untouched
            torch.testing.assert_close(x_q.mean(dims) - bq.running_mean.double(),
                                       x_f.mean(dims) - bf.running_mean.double(), rtol=0, atol=tol)
            torch.testing.assert_close(bq.running_var, bf.running_var)
        else:
            torch.testing.assert_close(z_q, z_f, rtol=1e-5, atol=tol / float(sig_f.min()))
            torch.testing.assert_close(x_q.std(dims, unbiased=False) / sig_q, x_f.std(dims, unbiased=False) / sig_f,
                                       rtol=1e-5, atol=1e-6)
        moved += not torch.equal(bq.running_mean, dict(plain.named_modules())[name].running_mean)
    assert moved > 0  # quantization did shift something, and the correction acted on it


def test_bn_correction_keeps_the_model_exportable(images):
    fp = _tiny(images)
    q = quantize(fp, normalize(images, *NORM), QuantConfig.ours_fast(4, quantize_first_last=True)).model
    _check_model(q, images[:2], numpy_images=1)


# ------------------------------------------------------------------------------------ range search


@pytest.mark.parametrize("metric", ["mse", "centered", "fisher"])
def test_range_search_returns_the_brute_force_minimiser(images, metric):
    """For each layer, the chosen r_x is the candidate whose rebuilt quantized layer has the smallest
    output MSE (``centered``: after subtracting each output channel's mean error; ``fisher``: each
    element weighted by its sensitivity, tested on its own below) — recomputed here by building every
    candidate layer through the public config path."""
    from adderquant.quant.ptq import _adder_inputs, _quant_layer
    from adderquant.quant.sensitivity import output_sensitivity

    fp = _tiny(images)
    calib = normalize(images, *NORM)
    config = QuantConfig.paper(3, unsigned_activations=True, range_search=True, range_alphas=(0.9, 0.99, 1.0),
                               range_search_metric=metric)
    result = quantize(fp, calib, config)
    obs = calibrate(fp, calib, config, min_alpha=0.9)
    inputs = _adder_inputs(fp, calib, config.range_search_images)

    adders = {n: m for n, m in fp.named_modules() if isinstance(m, AdderConv2d)}
    sensitivity = output_sensitivity(fp, calib[: config.range_search_images], adders)

    def error(d, name):
        if metric == "centered":
            d = d - d.mean((0, 2, 3), keepdim=True)
        return float((d.square() * sensitivity[name][1] if metric == "fisher" else d.square()).mean())

    for name, stats in result.layers.items():
        layer, o = fp.get_submodule(name), obs[name]
        candidates = {a: (o.percentile(a) if a < 1 else o.max) for a in config.range_alphas}
        with torch.no_grad():
            errs = {a: error(_quant_layer(layer, r, config, stats["signed"]).eval()(inputs[name])
                             - layer(inputs[name]), name) for a, r in candidates.items()}
        best = min(errs, key=errs.get)
        assert stats["r_x"] == candidates[best]
        assert stats["range_search"] == pytest.approx(errs)


@torch.no_grad()
def _total_error(layer, r_x: list[float], config, signed, x, target) -> float:
    from adderquant.quant.ptq import _quant_layer

    return float((_quant_layer(layer, r_x, config, signed).eval()(x).double() - target).square().sum())


def test_range_search_per_group_is_the_brute_force_minimiser_over_every_combination(images):
    """Per group, the chosen ranges minimise the layer's total output error over every combination of
    per-group candidates (built through the same path with a list of ranges) — so the per-group choice is
    exact, and never worse than the per-layer one."""
    from adderquant.quant.ptq import _adder_inputs

    fp = _tiny(images)
    calib = normalize(images, *NORM)
    config = QuantConfig.paper(3, unsigned_activations=True, range_search=True, range_alphas=(0.9, 0.99, 1.0),
                               range_search_scope="group")
    result = quantize(fp, calib, config)
    per_layer = quantize(fp, calib, config.with_(range_search_scope="layer"))
    obs = calibrate(fp, calib, config, min_alpha=0.9)
    inputs = _adder_inputs(fp, calib, config.range_search_images)
    differ = 0
    for name, stats in result.layers.items():
        layer, o, x = fp.get_submodule(name), obs[name], inputs[name]
        candidates = {a: (o.percentile(a) if a < 1 else o.max) for a in config.range_alphas}
        groups = len(stats["ranges"])
        with torch.no_grad():
            target = layer(x).double()
        errs = {combo: _total_error(layer, [candidates[a] for a in combo], config, stats["signed"], x, target)
                for combo in itertools.product(config.range_alphas, repeat=groups)}
        best = min(errs, key=errs.get)
        chosen = tuple(stats["range_search"]["group_alphas"])
        assert errs[chosen] == pytest.approx(errs[best], rel=1e-9)
        assert stats["r_x_groups"] == [candidates[a] for a in chosen]
        layer_choice = [per_layer.layers[name]["r_x"]] * groups
        assert errs[chosen] <= _total_error(layer, layer_choice, config, stats["signed"], x, target) * (1 + 1e-9)
        differ += len(set(chosen)) > 1
    assert differ > 0  # some layer did choose different ranges for different groups


def test_range_search_per_group_keeps_the_model_exportable(images):
    fp = _tiny(images)
    config = QuantConfig.ours_fast(4, range_search_scope="group", quantize_first_last=True)
    _check_model(quantize(fp, normalize(images, *NORM), config).model, images[:2], numpy_images=1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_error_groups_is_the_brute_force_best_labelling(candidates, groups, channels, seed):
    """Over every labelling of the channels with at most ``groups`` distinct candidates, none has a lower
    total error than :func:`error_groups`'s, and its labels are contiguous and point at the candidates it
    reports."""
    from adderquant.quant.grouping import error_groups

    errors = torch.rand(candidates, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    used, labels = error_groups(errors, groups)
    total = float(errors[torch.tensor(used)[labels], torch.arange(channels)].sum())
    brute = min(float(errors[list(pick), torch.arange(channels)].sum())
                for pick in itertools.product(range(candidates), repeat=channels) if len(set(pick)) <= groups)
    assert total == pytest.approx(brute, rel=1e-12)
    assert sorted(set(labels.tolist())) == list(range(len(used))) and len(used) <= groups
    assert used == sorted(used)


def test_regroup_search_beats_both_scopes_on_every_layer_and_stays_exportable(images):
    """Groups formed by the errors: the rebuilt layer's output error is at most the per-group and the
    per-layer search's (they are labellings it considered), each group has one shared range — the
    candidate its channels chose — and the model exports bit-exactly."""
    from adderquant.quant.ptq import _adder_inputs, _quant_layer

    fp = _tiny(images)
    calib = normalize(images, *NORM)
    config = QuantConfig.paper(3, unsigned_activations=True, range_search=True, range_alphas=(0.9, 0.99, 1.0),
                               range_search_scope="regroup")
    results = {scope: quantize(fp, calib, config.with_(range_search_scope=scope))
               for scope in ("regroup", "group", "layer")}
    inputs = _adder_inputs(fp, calib, config.range_search_images)
    regrouped = 0
    for name, stats in results["regroup"].layers.items():
        layer, x = fp.get_submodule(name), inputs[name]
        built = results["regroup"].model.get_submodule(name)
        with torch.no_grad():
            target = layer(x).double()
            err = {scope: float((r.model.get_submodule(name).eval()(x).double() - target).square().sum())
                   for scope, r in results.items()}
            again = _quant_layer(layer, stats["r_x_groups"], config, stats["signed"], built.group_of).eval()
            assert torch.equal(again(x), built(x))
        assert err["regroup"] <= min(err["group"], err["layer"]) * (1 + 1e-9)
        assert len(stats["r_x_groups"]) == len(stats["ranges"]) <= config.groups
        regrouped += not torch.equal(built.group_of, results["group"].model.get_submodule(name).group_of)
    assert regrouped > 0  # the errors did form other groups than max|W| somewhere
    exportable = QuantConfig.ours_fast(4, range_search_scope="regroup", quantize_first_last=True)
    _check_model(quantize(fp, calib, exportable).model, images[:2], numpy_images=1)


def test_range_search_options_are_checked():
    with pytest.raises(ValueError, match="at least one candidate"):
        QuantConfig.paper(4, range_search=True, range_alphas=())
    with pytest.raises(ValueError, match=r"range_alphas must lie in \(0, 1\]"):
        QuantConfig.paper(4, range_search=True, range_alphas=(0.5, 1.5))
    with pytest.raises(ValueError, match="range_search_scope"):
        QuantConfig.paper(4, range_search=True, range_search_scope="channel")
    with pytest.raises(ValueError, match="range_search_metric"):
        QuantConfig.paper(4, range_search=True, range_search_metric="mae")
    with pytest.raises(ValueError, match="needs range_search=True"):
        QuantConfig.paper(4, range_search_metric="kl")
    with pytest.raises(ValueError, match="choose one"):
        QuantConfig.paper(4, bn_correction="mean", bn_recalibration=10)
    with pytest.raises(ValueError, match="bn_correction"):
        QuantConfig.paper(4, bn_correction="median")


def _kl(model, x, fp_log_p) -> float:
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(model(x).double(), 1), fp_log_p, log_target=True, reduction="batchmean"))


def test_kl_search_is_the_brute_force_minimiser_layer_by_layer(images):
    """``range_search_metric="kl"``, one range per layer: for each adder layer in turn — the layers before
    it at the ranges chosen, those after it float — no candidate gives a lower KL(p_fp ‖ p) on the search
    images (computed here from scratch, in float64) than the chosen one; and the model the search ends
    with is the model returned."""
    from adderquant.quant.ptq import _quant_layer
    from adderquant.utils import set_submodule

    fp = _tiny(images)
    calib = normalize(images, *NORM)
    config = QuantConfig.paper(3, unsigned_activations=True, range_search=True, range_alphas=(0.9, 0.99, 1.0),
                               range_search_metric="kl")
    result = quantize(fp, calib, config)
    obs = calibrate(fp, calib, config, min_alpha=0.9)
    with torch.no_grad():
        fp_log_p = F.log_softmax(fp(calib).double(), 1)
    model = copy.deepcopy(fp)
    improved = 0
    for name, stats in result.layers.items():
        layer, o = fp.get_submodule(name), obs[name]
        candidates = {a: (o.percentile(a) if a < 1 else o.max) for a in config.range_alphas}
        kls = {}
        for a, r in candidates.items():
            set_submodule(model, name, _quant_layer(layer, r, config, stats["signed"]).eval())
            kls[a] = _kl(model, calib, fp_log_p)
        report = stats["range_search"]["kl"]
        assert kls[report["alphas"][0]] == pytest.approx(min(kls.values()), rel=1e-4, abs=1e-8)
        assert stats["r_x"] == candidates[report["alphas"][0]]
        assert report["kl"] <= report["kl_mse_choice"]
        improved += report["kl"] < report["kl_mse_choice"]
        set_submodule(model, name, _quant_layer(layer, stats["r_x"], config, stats["signed"]).eval())
    assert improved > 0  # the KL overruled the MSE choice somewhere
    with torch.no_grad():
        assert torch.equal(model(calib), result.model(calib))


@pytest.mark.parametrize("scope", ["group", "regroup"])
def test_kl_search_per_group_scores_the_bn_corrected_model_it_returns(images, scope):
    """Per group, with the BatchNorm correction: every layer's KL is at most its MSE choice's, the last
    layer's KL is the KL of the returned model (corrected on the same images — so each candidate was
    scored as the model it ends up in, from the float statistics), and the model exports bit-exactly."""
    fp = _tiny(images)
    calib = normalize(images, *NORM)
    config = QuantConfig.paper(3, unsigned_activations=True, range_search=True, range_alphas=(0.9, 0.99, 1.0),
                               range_search_scope=scope, range_search_metric="kl", bn_correction="mean_var")
    result = quantize(fp, calib, config)
    reports = [stats["range_search"]["kl"] for stats in result.layers.values()]
    assert all(r["kl"] <= r["kl_mse_choice"] for r in reports)
    assert all(len(r["alphas"]) == len(s["ranges"]) for r, s in zip(reports, result.layers.values(), strict=True))
    with torch.no_grad():
        fp_log_p = F.log_softmax(fp(calib).double(), 1)
    assert _kl(result.model, calib, fp_log_p) == pytest.approx(reports[-1]["kl"], rel=1e-4, abs=1e-8)
    exportable = config.with_(quantize_first_last=True)
    _check_model(quantize(fp, calib, exportable).model, images[:2], numpy_images=1)


def test_output_sensitivity_is_the_fisher_diagonal_by_brute_force():
    """``F = Σ_k p_k (∂ log p_k/∂y)²`` per element of an adder layer's output, against the full Jacobian
    of the log-probabilities with respect to that output (float64, every image and class)."""
    from adderquant.quant.sensitivity import output_sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(AdderConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 5)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-20, -10)
        model[1].running_var.uniform_(20, 40)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    (seen, weights), = output_sensitivity(model, x, {"0": model[0]}).values()
    assert torch.equal(seen, x) and all(not p.requires_grad or p.grad is None for p in model.parameters())
    with torch.no_grad():
        y = model[0](x)
        log_p = F.log_softmax(model[1:](y), 1)
    jac = torch.autograd.functional.jacobian(lambda v: F.log_softmax(model[1:](v), 1), y)  # (N, K, *y.shape)
    expected = torch.stack([(log_p[n].exp().view(-1, 1, 1, 1) * jac[n, :, n].square()).sum(0)
                            for n in range(x.shape[0])])
    assert weights.shape == y.shape and (weights > 0).any()
    assert torch.allclose(weights, expected, rtol=1e-10, atol=1e-14)
