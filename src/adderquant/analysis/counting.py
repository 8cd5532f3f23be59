"""Per-layer operation counts of a model: the one MAC / add counter of the package.

:func:`count_model` walks a model with forward hooks on one input and returns one :class:`LayerCount`
per executed Conv2d / adder layer / Linear / BatchNorm / ReLU / pooling / residual add, with the *raw*
operation counts of :meth:`LayerCount.raw_ops` (multiplications, additions, subtractions, absolute
values, comparisons). :func:`count_named` does it for a registry model on the meta device (no
arithmetic is executed). Conventions: ``docs/energy.md``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models import create, input_size
from ..utils import conv_output_size, hooked

WEIGHT_TYPES = ("conv", "adder", "linear")
LAYER_TYPES = WEIGHT_TYPES + ("bn", "relu", "maxpool", "avgpool", "add")


@dataclass
class LayerCount:
    """One executed layer. ``fan_in`` is K, the terms summed per output element (c_in/groups·kh·kw for
    convolution and adder layers, in_features for Linear); ``window`` the pooling window size;
    ``conv_groups`` the layer's ``groups`` (grouped/depthwise convolution and adder layers) and
    ``out_channels`` its output channels (weight layers)."""

    name: str
    type: str  # one of LAYER_TYPES
    in_elems: int
    out_elems: int
    role: str = ""  # weight layers: "first", "last" or "body"; "" for the others
    weight_elems: int = 0
    fan_in: int = 0
    window: int = 0
    bias: bool = False
    source: int = -1  # BatchNorm: index in ModelCount.layers of the weight layer producing its input
    conv_groups: int = 1
    out_channels: int = 0

    @property
    def macs(self) -> int:
        """Multiply-accumulates (conv, linear) or adder-accumulates |x − w| + acc (adder): K per output."""
        return self.fan_in * self.out_elems if self.type in WEIGHT_TYPES else 0

    def raw_ops(self) -> dict[str, int]:
        """Raw operation counts, no convention applied.

        conv/linear: K mult + (K−1) add per output (+1 add for a bias); adder: K sub + K abs + (K−1) add
        per output (+1 add for a bias); bn: 1 mult + 1 add per element (y = a·x + b); relu: 1 cmp per
        element; maxpool: window−1 cmp per output; avgpool: window−1 add + 1 mult per output; add
        (residual): 1 add per element.
        """
        n, k = self.out_elems, self.fan_in
        ops = Counter()
        if self.type in ("conv", "linear"):
            ops["mult"] += k * n
            ops["add"] += (k - 1) * n + (n if self.bias else 0)
        elif self.type == "adder":
            ops["sub"] += k * n
            ops["abs"] += k * n
            ops["add"] += (k - 1) * n + (n if self.bias else 0)
        elif self.type == "bn":
            ops["mult"] += n
            ops["add"] += n
        elif self.type == "relu":
            ops["cmp"] += n
        elif self.type == "maxpool":
            ops["cmp"] += (self.window - 1) * n
        elif self.type == "avgpool":
            ops["add"] += (self.window - 1) * n
            ops["mult"] += n
        elif self.type == "add":
            ops["add"] += n
        return dict(ops)

    def flops(self, count_abs: bool = False) -> int:
        """FLOPs under the AdderNet papers' convention: a conv MAC = 1 mult + 1 add; an adder MAC = 2
        additions (|x − w| counted once, as the subtraction; ``count_abs`` adds the |·| as a third op)."""
        ops = self.raw_ops()
        return sum(v for key, v in ops.items() if key != "abs" or count_abs)


@dataclass
class ModelCount:
    """Per-layer counts of one model on one input of ``input_shape``."""

    layers: list[LayerCount]
    input_shape: tuple[int, ...]
    name: str = ""

    def weight_layers(self) -> list[LayerCount]:
        return [lc for lc in self.layers if lc.type in WEIGHT_TYPES]

    @property
    def macs(self) -> int:
        return sum(lc.macs for lc in self.layers)

    @property
    def params(self) -> int:
        return sum(lc.weight_elems for lc in self.layers)

    def totals(self) -> dict[str, int]:
        """Raw operation counts summed over the model, plus MACs by layer type."""
        out: Counter = Counter()
        for lc in self.layers:
            out.update(lc.raw_ops())
            if lc.type in WEIGHT_TYPES:
                out[f"{lc.type}_macs"] += lc.macs
        return dict(out)

    def flops(self, count_abs: bool = False) -> int:
        return sum(lc.flops(count_abs) for lc in self.layers)


def _is_adder(m: nn.Module) -> bool:
    return "AdderConv2d" in type(m).__name__ and hasattr(m, "weight")


def _classify(m: nn.Module) -> str | None:
    if _is_adder(m):
        return "adder"
    if isinstance(m, nn.Conv2d):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(m, nn.ReLU | nn.ReLU6):
        return "relu"
    if isinstance(m, nn.MaxPool2d | nn.AdaptiveMaxPool2d):
        return "maxpool"
    if isinstance(m, nn.AvgPool2d | nn.AdaptiveAvgPool2d):
        return "avgpool"
    return None


def _is_residual_block(m: nn.Module) -> bool:
    """Blocks that end in ``out + identity``: every block of the registry keeps a ``downsample`` slot."""
    return hasattr(m, "downsample") and not isinstance(m, nn.Sequential)


def _pair2(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def _shape_only_conv_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of the conv/adder layer's output shape: counts depend on shapes only,
    so the walk neither computes nor touches the weights (they may live on the meta device)."""
    kh, kw = m.weight.shape[2:]
    (sh, sw), (dh, dw) = _pair2(m.stride), _pair2(m.dilation)
    if isinstance(m.padding, str):  # nn.Conv2d's "same" / "valid"
        if m.padding == "same":
            return x.new_empty(x.shape[0], m.weight.shape[0], *x.shape[2:])
        ph = pw = 0
    else:
        ph, pw = _pair2(m.padding)
    h = conv_output_size(x.shape[2], kh, sh, ph, dh)
    w = conv_output_size(x.shape[3], kw, sw, pw, dw)
    return x.new_empty(x.shape[0], m.weight.shape[0], h, w)


def _shape_only_linear_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], m.out_features)


def _pass_through(_m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


_SHAPE_ONLY = {"conv": _shape_only_conv_forward, "adder": _shape_only_conv_forward,
               "linear": _shape_only_linear_forward, "bn": _pass_through}


def count_model(model: nn.Module, input_shape: Sequence[int], *, mark_first_last: bool = True,
                name: str = "") -> ModelCount:
    """Walk ``model`` with forward hooks on one input of ``input_shape`` (batch size 1 recommended).

    Counts depend on shapes only: during the walk, convolution, adder and linear layers return an
    uninitialised tensor of their output shape and BatchNorm passes its input through (no arithmetic;
    the weights may be on the meta device, the input is then on the CPU). With ``mark_first_last``
    the first and the last executed weight layer get roles ``first`` and ``last`` (the layers the paper
    keeps in full precision); otherwise every weight layer is ``body``. Residual additions are counted
    on blocks with a ``downsample`` attribute (the registry's BasicBlock/Bottleneck), one add per output
    element.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device("cpu") if device.type == "meta" else device
    layers: list[LayerCount] = []
    produced: dict[int, tuple[int, torch.Tensor]] = {}  # id(output) of weight layers → (index, tensor)
    kinds: dict[str, str] = {}  # hooked module name → layer type, or "block" for a residual block

    def record(mod_name, mod, args, out):
        kind = kinds[mod_name]
        if kind == "block":
            # fires when the block returns, so the add is listed after the block's final ReLU
            # (the order inside a block does not change any count)
            layers.append(LayerCount(mod_name + ".add", "add", 2 * out.numel(), out.numel()))
            return
        x = args[0]
        lc = LayerCount(mod_name, kind, x.numel(), out.numel())
        if kind in ("conv", "adder"):
            k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]  # c_in/groups · kh · kw
            lc.fan_in, lc.weight_elems, lc.bias = k, mod.weight.numel(), mod.bias is not None
            # a QuantAdderConv2d's `groups` are its scale groups; its convolution groups are `conv_groups`
            lc.conv_groups = int(getattr(mod, "conv_groups", None) or getattr(mod, "groups", 1))
            lc.out_channels = int(mod.weight.shape[0])
        elif kind == "linear":
            lc.fan_in, lc.weight_elems, lc.bias = mod.in_features, mod.weight.numel(), mod.bias is not None
            lc.out_channels = int(mod.out_features)
        elif kind in ("maxpool", "avgpool"):
            spatial_in, spatial_out = x.shape[2:], out.shape[2:]
            if isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
                lc.window = math.prod(math.ceil(i / o) for i, o in zip(spatial_in, spatial_out, strict=True))
            else:
                ks = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,) * 2
                lc.window = math.prod(ks)
        elif kind == "bn":
            lc.source = produced[id(x)][0] if id(x) in produced else -1
            lc.weight_elems = 0  # γ, β, μ, σ are per channel: negligible, folded or kept as scales
        if kind in WEIGHT_TYPES:
            produced[id(out)] = (len(layers), out)  # the tensor is kept alive so its id stays unique
        layers.append(lc)

    targets: dict[str, nn.Module] = {}
    for mod_name, mod in model.named_modules():
        kind = _classify(mod) or ("block" if _is_residual_block(mod) else None)
        if kind is not None:
            targets[mod_name], kinds[mod_name] = mod, kind
    patched = {n: mod for n, mod in targets.items() if kinds[n] in _SHAPE_ONLY}
    try:
        for n, mod in patched.items():  # weight layers and BatchNorm: shape only, no arithmetic
            mod.forward = functools.partial(_SHAPE_ONLY[kinds[n]], mod)
        with hooked(model, targets, record, pre=False), torch.no_grad():
            model(torch.zeros(*input_shape, device=device))
    finally:
        for mod in patched.values():
            mod.__dict__.pop("forward", None)
    weights = [lc for lc in layers if lc.type in WEIGHT_TYPES]
    for lc in weights:
        lc.role = "body"
    if mark_first_last and weights:
        weights[0].role = "first"
        weights[-1].role = "last" if len(weights) > 1 else "first"
    return ModelCount(layers, tuple(input_shape), name)


@functools.lru_cache(maxsize=32)
def count_named(name: str, kind: str = "adder", num_classes: int | None = None) -> ModelCount:
    """Counts of a registry model (``adderquant.models.create(name, kind=kind)``) on one input of
    ``input_size(name)``, built on the meta device: no weights are allocated or initialised."""
    with torch.device("meta"):
        model = create(name, num_classes=num_classes, kind=kind)
    s = input_size(name)
    return count_model(model, (1, 3, s, s), name=f"{name}[{kind}]")


__all__ = ["LAYER_TYPES", "WEIGHT_TYPES", "LayerCount", "ModelCount", "count_model", "count_named"]
