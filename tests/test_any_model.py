"""Every registry model and three user-style models through the whole path, on random weights and
synthetic images: one training step (AdderNet backward) → ``adderquant.quantize`` (``paper`` and
``ours`` at 4 bits, 8-bit first/last layers) → ``.aqz`` export → the integer engine and the NumPy
runtime, whose logits must be identical, and whose predictions must equal the fake-quant model
evaluated in float64 (logits within 1e-6 of it, as in tests/test_integer.py).

The user models are not in the registry: a MobileNet-like net with depthwise adder layers (an
``adderize``d CNN with ``groups=C`` convs), a net whose adder input can be negative (no ReLU before
it: the signed grid is needed even under ``ours``), and a net with adder layers after a max-pool and
after the global average pool. The ImageNet ResNets run at 32×32 with 10 classes to keep this fast.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import adderquant
from adderquant.cli import main
from adderquant.data import CIFAR_ADDERNET_NORM, normalize
from adderquant.integer import IntegerEngine, NumpyRuntime, export, load_aqz
from adderquant.integer import runtime_numpy as rt
from adderquant.integer.float64 import float64_reference
from adderquant.models import create, names
from adderquant.nn import AdderConv2d, adderize
from adderquant.quant import preset
from test_integer import _bn_calibrated

NORM = CIFAR_ADDERNET_NORM
SIZE = 32  # every model, the ImageNet ResNets included (their layer4 then runs at 1×1)


def _mobilenet_like() -> nn.Module:
    """Depthwise-separable blocks: depthwise 3×3 (groups = C) then pointwise 1×1, each with BN + ReLU."""
    def dw_pw(cin, cout, stride):
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        *dw_pw(16, 32, 1), *dw_pw(32, 32, 2),
                        nn.Conv2d(32, 64, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every conv but the stem and head becomes an adder layer, no warning
        return adderize(cnn)


class _SignedInput(nn.Module):
    """An adder layer fed straight by a BatchNorm (no ReLU): its input takes both signs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a1 = AdderConv2d(16, 16, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(16)  # no ReLU after this one
        self.a2 = AdderConv2d(16, 32, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.bn1(self.a1(self.stem(x)))
        x = torch.relu(self.bn2(self.a2(x)))
        return self.fc(self.pool(x).flatten(1))


class _AfterPooling(nn.Module):
    """Adder layers after a max-pool and after the global average pool (a 1×1 adder on 1×1 maps)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)
        self.a1 = nn.Sequential(AdderConv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.a2 = nn.Sequential(AdderConv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = self.a2(self.gap(self.a1(self.pool1(self.stem(x)))))
        return self.head(x).flatten(1)


USER_MODELS = {"mobilenet_like": _mobilenet_like, "signed_input": _SignedInput, "after_pooling": _AfterPooling}
REGISTRY = names()
MODELS = REGISTRY + list(USER_MODELS)
BATCH = {"resnet50": 2, "resnet56": 2, "vgg_small": 2}  # images per model (4 unless named)


def _build(name: str) -> nn.Module:
    return create(name, num_classes=10) if name in REGISTRY else USER_MODELS[name]()


@functools.cache
def _trained(name: str):
    """One SGD step on synthetic images, then BatchNorm statistics for them: (model, images, facts)."""
    torch.manual_seed(0)
    model = _build(name)
    n = BATCH.get(name, 4)
    x = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    xn = normalize(x, *NORM)
    adders = {k: m for k, m in model.named_modules() if isinstance(m, AdderConv2d)}
    before = {k: m.weight.detach().clone() for k, m in adders.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = nn.functional.cross_entropy(model.train()(xn), torch.arange(n) % 10)
    opt.zero_grad()
    loss.backward()
    opt.step()
    norms = {k: float(m.weight.grad.norm()) for k, m in adders.items()}
    # adaptive_scale gives every layer the gradient norm η·sqrt(numel) unless its raw gradient lies below
    # the 1e-12 floor (deep random-init AdderNets on a few images: some resnet50 layers get ~1e-18, which
    # moves the weights by less than an ulp); every layer with a full-size gradient must move
    full = {k for k, m in adders.items() if abs(norms[k] / (m.eta * m.weight.numel() ** 0.5) - 1) < 1e-3}
    unchanged = [k for k in full if torch.equal(adders[k].weight.detach(), before[k])]
    facts = {"loss": loss.item(), "adders": len(adders), "unchanged": unchanged, "norms": norms, "full": len(full),
             "grouped": sum(m.groups > 1 for m in adders.values())}
    return _bn_calibrated(model, x), x, xn, facts


def test_the_registry_is_what_the_cli_lists(capsys):
    assert main(["models", "--json"]) == 0
    import json

    listed = [m["name"] for m in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"]]
    assert listed == REGISTRY and set(REGISTRY) == {"resnet20", "resnet32", "resnet56", "vgg_small", "resnet18",
                                                    "resnet50"}


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step(name):
    _, _, _, facts = _trained(name)
    assert np.isfinite(facts["loss"])
    # the AdderNet backward reached every adder layer (a finite, non-zero gradient), and the step moved them
    assert facts["adders"] > 0 and all(np.isfinite(v) and v > 0 for v in facts["norms"].values())
    assert facts["unchanged"] == [] and facts["full"] > 0
    if name == "mobilenet_like":
        assert facts["grouped"] == 3  # two depthwise layers and one groups=4 layer


@pytest.mark.parametrize("method", ["paper", "ours"])
@pytest.mark.parametrize("name", MODELS)
def test_quantize_export_and_run_in_integers(name, method, tmp_path):
    model, x, xn, _ = _trained(name)
    # learned rounding (ours' at 6 and 3 bits) at a few iterations: the path to the integers is what is
    # tested here, and 200 iterations per block made this test most of the suite's time (resnet50: minutes)
    few = {"learned_rounding": 4} if method == "ours" else {}
    config = preset(method, 4, quantize_first_last=True, **few)
    result = adderquant.quantize(model, xn, config)
    path = export(result, tmp_path / f"{name}.aqz", name=name, normalization=NORM, input_shape=(3, SIZE, SIZE))
    engine = IntegerEngine(path, chunk=max(1, len(x) // 2))  # two chunks: the result must not depend on it
    logits = engine(x)
    np.testing.assert_array_equal(NumpyRuntime(path).logits(x.numpy()), logits.numpy())
    with torch.no_grad():
        ref64 = float64_reference(result.model)(xn)
    assert torch.equal(logits.argmax(1), ref64.argmax(1))
    assert float((logits.double() * 2.0 ** -engine.frac_bits - ref64).abs().max()) < 1e-6

    nodes = load_aqz(path).graph["nodes"]
    adders = [n for n in nodes if n["op"] == "adder"]
    assert len(adders) == sum(isinstance(m, AdderConv2d) for m in model.modules())
    version = rt.HEADER.unpack_from(path.read_bytes(), 0)[1]
    grouped = [n for n in adders if n["attrs"].get("groups", 1) != 1]
    assert version == (2 if grouped else 1)  # a file without grouped layers stays version 1
    if name == "mobilenet_like":
        assert sorted(n["attrs"]["groups"] for n in grouped) == [4, 16, 32]
    if name == "signed_input":
        by_name = {n["name"]: n for n in adders}
        assert by_name["a2"]["attrs"]["signed"] and by_name["a2"]["attrs"]["qmin"] < 0  # input of both signs
        assert result.layers["a2"]["signed"]
        if method == "ours":  # the unsigned grid only where the calibration inputs are ≥ 0
            assert not result.layers["a1"]["signed"]
