"""Range statistics and the Figure 2/4 plots (adderquant.analysis.ranges)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adderquant.analysis.ranges import format_table, plot_distributions, plot_ranges, range_statistics, report_ranges
from adderquant.nn import AdderConv2d
from adderquant.quant import QuantConfig
from adderquant.quant.grouping import group_channels

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(AdderConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                          AdderConv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=None))
    with torch.no_grad():  # channel ranges that differ widely, as in a trained AdderNet
        for m in model:
            if isinstance(m, AdderConv2d):
                m.weight.mul_(torch.linspace(0.5, 8.0, m.out_channels).view(-1, 1, 1, 1))
        model.train()(torch.randn(32, 3, 8, 8))  # BatchNorm statistics, so that the ReLU passes half
    return model.eval()


def inputs_of(model: nn.Module, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda _, a, n=n: seen.setdefault(n, a[0].detach().clone()))
             for n, m in model.named_modules() if isinstance(m, AdderConv2d)]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("alpha", [0.99, 0.999, 1.0])
def test_range_statistics_match_direct_computation(alpha):
    model, calib = tiny_model(), torch.randn(12, 3, 8, 8)
    stats = range_statistics(model, calib, alpha=alpha)
    xs = inputs_of(model, calib)
    assert list(stats) == ["0", "3"]
    for name, s in stats.items():
        w = model.get_submodule(name).weight.detach().double()
        flat = w.abs().flatten(1)
        x = xs[name].abs().flatten().double()
        n = x.numel()
        r_x = float(torch.sort(x).values[math.ceil(alpha * (n - 1))])
        assert s.n_activations == n
        assert s.r_x == pytest.approx(r_x, rel=1e-6)
        assert s.x_max == pytest.approx(float(x.max()), rel=1e-6)
        assert s.weight_max == pytest.approx(flat.amax(1).tolist(), rel=1e-6)
        assert s.frac_beyond == pytest.approx(float((flat > s.r_x).double().mean()))
        assert s.frac_above + s.frac_below == pytest.approx(s.frac_beyond)
        assert s.frac_above == pytest.approx(float((w > s.r_x).double().mean()))
        assert s.frac_beyond_channel == pytest.approx((flat > s.r_x).double().mean(1).tolist())
        assert s.group_of == group_channels(w, 4, "max").tolist()
        for j, (rw, r) in enumerate(zip(s.group_weight_max, s.group_ranges, strict=True)):
            members = [c for c, g in enumerate(s.group_of) if g == j]
            assert rw == pytest.approx(max(s.weight_max[c] for c in members), rel=1e-6)
            assert r == pytest.approx(min(rw, s.r_x), rel=1e-6)  # the paper's shared range min(r_wj, r_x)
        assert sum(s.group_sizes) == w.shape[0]
    table = format_table(stats)
    assert table.count("\n") == 3 and "r_x" in table


def test_range_statistics_follow_the_config():
    model, calib = tiny_model(), torch.randn(8, 3, 8, 8)
    stats = range_statistics(model, calib, QuantConfig.qssf("weights"), alpha=0.999)
    for s in stats.values():
        assert s.group_of == [0] * len(s.weight_max)
        assert s.group_ranges == pytest.approx([max(s.weight_max)], rel=1e-6)


def test_plots_write_pngs(tmp_path):
    model, calib = tiny_model(), torch.randn(8, 3, 8, 8)
    stats = range_statistics(model, calib)
    for path in (plot_ranges(stats, "3", tmp_path / "fig2.png"), plot_ranges(stats, "0", tmp_path / "l.png", log=True),
                 plot_distributions(model, calib, "3", tmp_path / "sub" / "fig4.png")):
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


@pytest.mark.data
def test_official_resnet20_ranges(official_addernet, cifar_subset, tmp_path):
    """The paper's motivation (Fig. 2, 4): weights span ±35–75 while the activations stay a few units."""
    out = report_ranges(official_addernet, cifar_subset, tmp_path, calib_size=128, progress=False)
    stats = out["stats"]
    assert len(stats) == 20 and out["layer"] == "layer1.1.conv2"
    for s in stats.values():
        assert 30 < max(s.weight_max) < 80, s.name
        assert 0.5 < s.r_x < 5, s.name
        assert s.r_x <= s.x_max < 10
        assert max(s.weight_max) / s.r_x > 10
        assert s.frac_beyond > 0.3  # most weights lie beyond the activation range
        # with the weight clamp, every group's shared range min(r_wj, r_x) is r_x: the groups coincide
        assert min(s.group_weight_max) > s.r_x
        assert s.group_ranges == pytest.approx([s.r_x] * len(s.group_ranges))
    for key in ("ranges", "distributions"):
        assert out["paths"][key].read_bytes()[:8] == PNG
    assert "layer3.2.conv2" in out["paths"]["table"].read_text()
