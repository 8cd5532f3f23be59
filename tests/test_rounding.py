"""Learned rounding (``QuantConfig.learned_rounding``, AdaRound with block reconstruction) on tiny
models: the codes stay integers on each layer's grid, 0 iterations changes nothing, the block error
it optimises is no worse than nearest rounding's, bad options are refused, and the result converts
bit-exact to the integer engine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adderquant.data import normalize
from adderquant.models.resnet_cifar import CifarResNet
from adderquant.nn import AdderConv2d
from adderquant.quant import QuantAdderConv2d, QuantConfig, preset, quantize
from adderquant.quant import rounding as rounding_module
from adderquant.quant.rounding import LayerRounding, block_error, find_blocks, learn_rounding, rectified_sigmoid
from adderquant.quant.uniform import int_range
from test_integer import NORM, _bn_calibrated, _check_model


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model(images):
    torch.manual_seed(0)
    return _bn_calibrated(CifarResNet(8), images)


def _adders(q):
    return {n: m for n, m in q.named_modules() if isinstance(m, QuantAdderConv2d)}


def _codes_and_steps(m: QuantAdderConv2d):
    """The weights in units of the grid step (as LayerRounding sees them) and the layer's codes."""
    r = LayerRounding(m)
    t = m.weight.detach().double() / r.step.double()
    if m.double_step:
        t = m.weight.detach().double() * (2**m.bits - 1) / (2 * m.ranges.double()[m.group_of].view(-1, 1, 1, 1))
    return t, m.int_weight().double()


@pytest.mark.parametrize("make", [
    lambda: QuantConfig.ours_fast(4, learned_rounding=10),
    lambda: QuantConfig.paper(3, learned_rounding=10),  # signed grid
    lambda: QuantConfig.authors(4, learned_rounding=10, bn_recalibration=0),  # double step, literal clamp
    lambda: QuantConfig.qssf("weights", 4, learned_rounding=10),  # no clamp
], ids=["ours", "paper3", "authors", "qssf-w"])
def test_learned_codes_are_integers_on_the_grid(model, images, make):
    config = make()
    calib = normalize(images, *NORM)
    plain = quantize(model, calib, config.with_(learned_rounding=0))
    learned = quantize(model, calib, config)
    assert set(learned.rounding) == {"layer1.0", "layer2.0", "layer3.0"}
    assert sum(len(v["layers"]) for v in learned.rounding.values()) == len(_adders(learned.model)) == 8
    changed = 0
    for name, m in _adders(learned.model).items():
        p = plain.model.get_submodule(name)
        codes = m.int_weight().double()
        qn, qp = int_range(m.bits, True) if m.double_step else m.int_bounds()
        assert torch.equal(codes, codes.round()) and codes.min() >= qn and codes.max() <= qp
        t, _ = _codes_and_steps(m)
        t0, nearest = _codes_and_steps(p)
        moved = codes != nearest
        torch.testing.assert_close(t[moved], codes[moved], rtol=0, atol=1e-4)  # a moved weight is code·step
        assert torch.equal(t[~moved], t0[~moved])  # the others are left as they were
        assert bool(((codes - torch.floor(t0)).abs() <= 1).all())  # floor(t) or floor(t) + 1 (clamped)
        assert bool(((codes - nearest).abs() <= 1).all())
        edge = (t0 <= qn) | (t0 >= qp)  # weights the Theorem-1 clamp put on an edge keep their code
        assert torch.equal(codes[edge], nearest[edge])
        changed += int((codes != nearest).sum())
        # what quantize_adder decided stays: groups, scales, the Theorem-1 fold
        for buf in ("group_of", "ranges", "clamp_bias"):
            assert torch.equal(getattr(m, buf), getattr(p, buf))
    assert changed == sum(v["changed"] for v in learned.rounding.values() if v["kept"]) > 0
    for name in {n for n, _ in learned.model.named_parameters()} - {f"{n}.weight" for n in _adders(learned.model)}:
        assert torch.equal(learned.model.get_parameter(name), plain.model.get_parameter(name))


def test_zero_iterations_is_the_plain_model(model, images):
    calib = normalize(images, *NORM)
    plain = quantize(model, calib, QuantConfig.ours_fast(4))
    zero = quantize(model, calib, QuantConfig.ours_fast(4, learned_rounding=0))
    assert zero.rounding is None
    a, b = plain.model.state_dict(), zero.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = {k: v.clone() for k, v in a.items()}
    assert learn_rounding(plain.model, model, calib, 0) == {}
    assert all(torch.equal(before[k], v) for k, v in plain.model.state_dict().items())


def test_block_error_after_optimisation_is_not_worse_than_nearest(model, images):
    calib = normalize(images, *NORM)
    config = QuantConfig.ours_fast(4, bn_correction=None)  # the blocks' BatchNorms as the rounding saw them
    plain = quantize(model, calib, config).model
    result = quantize(model, calib, config.with_(learned_rounding=50))
    for info in result.rounding.values():
        assert info["kept"] and info["error_learned"] <= info["error_nearest"]
    # recomputed independently for the first block, whose input is the same in both models
    blocks = {b.name: b for b in find_blocks(plain, model, calib)}
    fp_block, block = model.layer1[0], plain.layer1[0]
    seen = {}
    h = model.layer1.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("fp", inp[0]))
    h2 = plain.layer1.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("q", inp[0]))
    with torch.no_grad():
        model(calib), plain(calib)
    h.remove(), h2.remove()
    with torch.no_grad():
        target = fp_block(seen["fp"])
    nearest = block_error(block, seen["q"], target)
    learned = block_error(result.model.layer1[0], seen["q"], target)
    info = result.rounding["layer1.0"]
    assert blocks["layer1.0"].layers == info["layers"] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert nearest == pytest.approx(info["error_nearest"], rel=1e-9)
    assert learned == pytest.approx(info["error_learned"], rel=1e-9)
    assert learned < nearest  # 50 iterations do find better codes on these images


def test_rectified_sigmoid_init_reproduces_the_fraction():
    frac = torch.linspace(0, 1, 101)
    v = rounding_module.inverse_rectified_sigmoid(frac)
    assert bool(torch.isfinite(v).all())
    torch.testing.assert_close(rectified_sigmoid(v), frac, rtol=0, atol=1e-6)
    assert rectified_sigmoid(torch.tensor([-1e4, 1e4])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("kw", [{"learned_rounding": -1}, {"learned_rounding": 1.5}, {"learned_rounding": True},
                                {"learned_rounding": "10"}, {"rounding_batch_size": 0}, {"rounding_batch_size": 2.0},
                                {"rounding_lr": 0.0}, {"rounding_lr": -1e-3}, {"rounding_lr": math.nan},
                                {"rounding_lr": math.inf}, {"rounding_lr": "1e-3"}])
def test_bad_rounding_options_are_refused(kw):
    with pytest.raises(ValueError, match="rounding"):
        QuantConfig.ours_fast(4, **kw)
    with pytest.raises(ValueError, match="rounding"):
        preset("authors", 4, **kw)
    with pytest.raises(ValueError, match="rounding"):
        learn_rounding(nn.Identity(), nn.Identity(), torch.zeros(1), kw.get("learned_rounding", 1),
                       batch_size=kw.get("rounding_batch_size", 1), lr=kw.get("rounding_lr", 1e-3))


def test_rounding_needs_the_uniform_grid_and_works_with_qssf():
    with pytest.raises(ValueError, match="learned_rounding.*uniform"):
        QuantConfig.paper(4, grid="apot", learned_rounding=5)
    assert QuantConfig.qssf("best", 4, learned_rounding=5).learned_rounding == 5


@pytest.mark.parametrize("make", [
    lambda: QuantConfig.ours_fast(4, learned_rounding=20, quantize_first_last=True),
    lambda: QuantConfig.authors(4, learned_rounding=20, quantize_first_last=True, bn_recalibration=2, bn_batch_size=4),
], ids=["ours", "authors"])
def test_learned_rounding_exports_bit_exact(model, images, make):
    result = quantize(model, normalize(images, *NORM), make())
    assert any(v["changed"] and v["kept"] for v in result.rounding.values())
    _check_model(result.model, images, numpy_images=2)


class _MiniVGG(nn.Module):
    """VGG layout: adder → max-pool → BN → ReLU, and adder → BN → ReLU, in one Sequential."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            AdderConv2d(8, 8, 3, 1, 1), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            AdderConv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_without_residual_blocks_a_layer_is_reconstructed_up_to_its_batchnorm(images, monkeypatch):
    torch.manual_seed(5)
    model = _bn_calibrated(_MiniVGG(), images)
    calib = normalize(images, *NORM)
    bars = []
    real = rounding_module.progress_bar
    monkeypatch.setattr(rounding_module, "progress_bar",
                        lambda it, desc, enabled, **kw: bars.append(enabled) or real(it, desc, False, **kw))
    result = quantize(model, calib, QuantConfig.ours_fast(4, learned_rounding=30, quantize_first_last=True),
                      progress=True)
    assert bars and bars[0]
    assert {k: v["layers"] for k, v in result.rounding.items()} == {
        "features[3:6]": ["features.3"], "features[7:9]": ["features.7"]}
    # learned codes are kept only where they reconstruct no worse; here the second block's 30 iterations
    # flip 2 codes for the worse, so it falls back to nearest rounding
    plain = quantize(model, calib, QuantConfig.ours_fast(4, quantize_first_last=True)).model
    first, second = result.rounding.values()
    assert first["kept"] and first["changed"] and first["error_learned"] < first["error_nearest"]
    assert not second["kept"] and second["changed"] and second["error_learned"] > second["error_nearest"]
    assert not torch.equal(result.model.features[3].int_weight(), plain.features[3].int_weight())
    assert torch.equal(result.model.features[7].weight, plain.features[7].weight)
    blocks = find_blocks(result.model, model, calib)
    assert [type(m).__name__ for m in blocks[0].module] == ["QuantAdderConv2d", "MaxPool2d", "BatchNorm2d"]
    quantize(model, calib, QuantConfig.ours_fast(4, learned_rounding=2))
    assert not bars[-1]  # no progress bar unless asked
