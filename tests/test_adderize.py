"""adderize: a user's CNN becomes an AdderNet that trains, quantizes and runs in integers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adderquant
from adderquant.nn import AdderConv2d, adderize


def _user_cnn(groups_mid: int = 1, norm: bool = True) -> nn.Module:
    """A small model not in the registry: stem, two 3×3 convs (BN after each unless ``norm=False``), head."""
    def bn(c):
        return nn.BatchNorm2d(c) if norm else nn.Identity()
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), bn(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=groups_mid, bias=False), bn(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_adderize_swaps_inner_convs_and_keeps_first_and_last():
    model = _user_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = adderize(model)
    kinds = [type(m) for m in out if isinstance(m, nn.Conv2d | nn.Linear | AdderConv2d)]
    assert kinds == [nn.Conv2d, AdderConv2d, AdderConv2d, nn.Linear]
    assert out[3].stride == (2, 2) and out[3].bias is None and out[3].in_channels == 8
    assert type(model[3]) is nn.Conv2d  # the original is untouched
    assert [type(m) for m in adderize(model, keep_first_last=False) if isinstance(m, nn.Conv2d | AdderConv2d)] == \
        [AdderConv2d] * 3


def test_copy_weights_copies_and_default_reinitialises():
    model = _user_cnn()
    torch.testing.assert_close(adderize(model, copy_weights=True)[3].weight, model[3].weight)
    assert not torch.equal(adderize(model)[3].weight, model[3].weight)


def test_warnings_name_unnormalised_and_unpaddable_layers():
    with pytest.warns(UserWarning, match=r"not followed by a normalisation layer.*\b3\b"):
        adderize(_user_cnn(norm=False))
    model = _user_cnn()
    model[6].padding_mode = "reflect"
    with pytest.warns(UserWarning, match=r"padding mode other than zeros conventional: 6"):
        out = adderize(model)
    assert type(out[6]) is nn.Conv2d and type(out[3]) is AdderConv2d


@pytest.mark.parametrize("groups", [2, 16])
def test_grouped_and_depthwise_convs_become_grouped_adder_layers(groups):
    model = _user_cnn(groups_mid=groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = adderize(model, copy_weights=True)
    assert type(out[6]) is AdderConv2d and out[6].groups == groups
    assert out[6].weight.shape == model[6].weight.shape == (16, 16 // groups, 3, 3)
    torch.testing.assert_close(out[6].weight, model[6].weight)
    x = torch.randn(2, 3, 16, 16)
    assert out(x).shape == (2, 10)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        adderize("resnet")
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        adderize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)))


def test_adderized_model_trains_quantizes_and_runs_in_integers():
    """train step → quantize (8-bit first/last) → export → integer engine = float64 fake-quant."""
    from adderquant.integer import IntegerEngine, convert
    from adderquant.integer.float64 import float64_reference

    torch.manual_seed(0)
    model = adderize(_user_cnn())
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    norm = ((0.5,) * 3, (0.25,) * 3)
    xn = (x.float() / 255 - 0.5) / 0.25
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w0 = model[3].weight.detach().clone()
    loss = nn.functional.cross_entropy(model.train()(xn), torch.arange(16) % 10)
    loss.backward()
    opt.step()
    assert not torch.equal(model[3].weight, w0)  # the AdderNet backward reached the adder weights
    q = adderquant.quantize(model.eval(), xn, adderquant.QuantConfig.ours_fast(4, quantize_first_last=True)).model
    graph = convert(q, norm, input_shape=(3, 16, 16))
    with torch.no_grad():
        ref = float64_reference(q)(xn.double()).argmax(1)
    assert torch.equal(IntegerEngine(graph).predict(x), ref)


def test_an_op_the_integer_path_cannot_lower_is_named():
    from adderquant.integer import convert

    torch.manual_seed(1)
    model = adderize(_user_cnn())
    model[5] = nn.Sigmoid()
    xn = torch.randn(4, 3, 16, 16)
    q = adderquant.quantize(model.eval(), xn, adderquant.QuantConfig.paper(4, quantize_first_last=True)).model
    with pytest.raises(NotImplementedError, match="module '5': the integer path cannot lower Sigmoid"):
        convert(q, ((0.5,) * 3, (0.25,) * 3), input_shape=(3, 16, 16))
