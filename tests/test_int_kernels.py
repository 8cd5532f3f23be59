"""The integer engine's C paths (csrc/int_net.c): SAD kernels and the network runner, on every ISA path.

``int_adder_conv2d`` (NCHWc8 SAD kernels) against a brute-force integer reference for odd shapes; the C
network runner (``integer.cpu_plan``) against the op-by-op engine and the NumPy runtime — logits equal
element for element — on small models covering each epilogue variant: unsigned / signed / double-step
grids, 4-bit (16-entry tables), 5-bit (32-entry tables), 8-bit (float estimates with exact fixes),
partial position groups (widths not a multiple of 8), channel counts not a multiple of 8, strided and
1x1 layers, residual adds, both heads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from adderquant import kernels
from adderquant.data import CIFAR_ADDERNET_NORM, normalize
from adderquant.integer import AQZ, IntegerEngine, NumpyRuntime, convert
from adderquant.integer import cpu_plan as cp
from adderquant.models.resnet_cifar import CifarResNet
from adderquant.nn import AdderConv2d
from adderquant.quant import QuantConfig, quantize
from test_integer import _bn_calibrated, _brute_adder

cpu = pytest.importorskip("adderquant.kernels.cpu")
if cpu.BACKEND is None or not cp.available():
    pytest.skip("adderquant._adder_cpu is not built", allow_module_level=True)

ISAS = [n for n in cpu.ISA_NAMES if cpu.ISA_NAMES.index(n) <= cpu.ISA_NAMES.index(cpu.isa_max())]
NORM = CIFAR_ADDERNET_NORM


SHAPES = [  # n, c, h, w, o, (kh, kw), stride, padding, dilation
    (1, 3, 7, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 13, 9, 11, 17, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 16, 8, 8, 8, (1, 1), (2, 2), (0, 0), (1, 1)),
    (2, 8, 6, 13, 9, (1, 3), (1, 2), (0, 1), (1, 1)),
    (1, 24, 10, 10, 12, (3, 3), (1, 1), (2, 2), (2, 2)),
    (1, 70, 5, 5, 3, (2, 2), (3, 1), (1, 0), (1, 1)),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", SHAPES, ids=lambda c: "n{}c{}_{}x{}_o{}_k{}{}_s{}{}_p{}{}".format(
    *c[:5], *c[5], *c[6], *c[7]))
def test_sad_kernels_match_brute_force(isa, case):
    n, c, h, w, o, k, s, p, d = case
    rng = np.random.default_rng(sum(case[:5]))
    def ints(lo, hi, shape, dtype):
        return rng.integers(lo, hi, shape).astype(dtype)

    xs, ws = (n, c, h, w), (o, c, *k)
    cases = [(ints(-128, 128, xs, np.int8), ints(-128, 128, ws, np.int8)),
             (ints(0, 256, xs, np.uint8), ints(-128, 128, ws, np.int8)),
             (ints(0, 256, xs, np.uint8), ints(-600, 900, ws, np.int16)),  # beyond [0, 255]: clamp + constant
             (ints(0, 16, xs, np.uint8), ints(0, 16, ws, np.int8))]
    with cpu.force_isa(isa):
        for x, wt in cases:
            got = cpu.BACKEND.int_forward(torch.from_numpy(x), torch.from_numpy(wt), s, p, d)
            np.testing.assert_array_equal(got.numpy(), _brute_adder(x, wt, s, p, d),
                                          err_msg=f"{x.dtype} x, {wt.dtype} w")


# ------------------------------------------------------------------------------------- the runner


class _Odd(nn.Module):
    """A small adder CNN with what the ResNets lack: 12 and 20 channels (not multiples of 8), a 1x1
    stride-2 layer feeding a residual add, and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.a1, self.b1 = AdderConv2d(12, 20, 3, stride=2, padding=1), nn.BatchNorm2d(20)
        self.a2, self.b2 = AdderConv2d(20, 20, 3, padding=1), nn.BatchNorm2d(20)
        self.sc, self.bsc = AdderConv2d(12, 20, 1, stride=2), nn.BatchNorm2d(20)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(20, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.b1(self.a1(x)))
        y = torch.relu(self.b2(self.a2(y)) + self.bsc(self.sc(x)))
        return self.fc(self.pool(y).flatten(1))


@pytest.fixture(scope="module")
def images():  # 20x20: output rows of 20, 10 and 5 positions, none a multiple of 8
    return torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


_GRAPHS: dict = {}


def _graph(kind, config, images):
    key = (kind, config)
    if key not in _GRAPHS:
        _GRAPHS[key] = _build(kind, CONFIGS[config] if isinstance(config, str) else config, images)
    return _GRAPHS[key]


def _build(kind, config, images):
    torch.manual_seed(0)
    model = {"resnet8": lambda: CifarResNet(8), "resnet8-linear": lambda: CifarResNet(8, head="linear"),
             "odd": _Odd}[kind]()
    model = _bn_calibrated(model, images)
    return convert(quantize(model, normalize(images, *NORM), config).model, NORM, input_shape=tuple(images.shape[1:]))


CONFIGS = {
    "unsigned4": QuantConfig.paper(4, quantize_first_last=True, unsigned_activations=True),  # 16-entry tables
    "paper4": QuantConfig.paper(4, quantize_first_last=True),  # signed grid: offsets
    "double4": QuantConfig.paper(4, quantize_first_last=True, unsigned_activations=True,
                                 weight_grid="double_step"),  # the authors' weights 2*w_q, unsigned activations
    "paper5": QuantConfig.paper(5, quantize_first_last=True),  # 31 thresholds: 32-entry tables
    "paper8": QuantConfig.paper(8, quantize_first_last=True),  # 255 thresholds: float estimates
}


def _check(g, x, isas=ISAS):
    engine = IntegerEngine(g)
    assert engine.cpu_plan(x.shape[1:]) is not None, "the C runner should take this graph"
    want = IntegerEngine(g, fast=False)(x)
    np.testing.assert_array_equal(NumpyRuntime(AQZ(g.to_json(), g.tensors)).logits(x[:2].numpy()), want[:2].numpy())
    for isa in isas:
        with cpu.force_isa(isa):
            np.testing.assert_array_equal(engine(x).numpy(), want.numpy(), err_msg=isa)


@pytest.mark.parametrize("kind, config", [("resnet8", "unsigned4"), ("odd", "unsigned4"), ("odd", "paper4"),
                                          ("odd", "double4"), ("odd", "paper8")])
def test_runner_logits_equal_op_by_op_and_numpy(images, kind, config):
    _check(_graph(kind, config, images), images)


def test_runner_linear_head_5bit_batch_one(images):
    _check(_graph("resnet8-linear", "paper5", images), images[:1])


def test_runner_exact_fixes_near_rounding_boundaries(images, monkeypatch):
    """With margins so wide that almost every float estimate counts as near a boundary, every lane takes
    the exact fix-up path: the logits must not change."""
    monkeypatch.setattr(cp, "_margin_v", lambda *a: 0.49)
    monkeypatch.setattr(cp, "_margin_exact", lambda *a: 0.49)
    monkeypatch.setattr(cp, "_MAX_MARGIN", 0.5)
    for config in ("paper8", "unsigned4"):
        _check(_graph("odd", config, images), images)


def test_runner_declines_what_it_does_not_take(images):
    cfg = QuantConfig.paper(4, quantize_first_last=True, unsigned_activations=True, lossless_act_clamp=True)
    g = _build("odd", cfg, images)
    engine = IntegerEngine(g)
    assert engine.cpu_plan(images.shape[1:]) is None  # the lossless clamp: op by op
    assert torch.equal(engine(images[:2]), IntegerEngine(g, fast=False)(images[:2]))
    g = _graph("odd", "unsigned4", images)
    with kernels.use_backend("reference"):  # a forced non-C backend: op by op
        assert IntegerEngine(g).cpu_plan(images.shape[1:]) is None
    assert IntegerEngine(g, fast=False).cpu_plan(images.shape[1:]) is None
