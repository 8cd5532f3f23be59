"""Fake-quantized model → integer graph (the node list and tensors an ``.aqz`` file stores).

The model is traced with ``torch.fx`` (quantized layers are leaves) and every value is tracked in one
of three integer domains while the nodes are emitted (``docs/format.md`` has the node semantics):

- ``image``: the raw uint8 input. Only an 8-bit first layer may consume it, through a per-channel
  256-entry table that reproduces ``quantize_int(normalize(u), s_x)`` of the fake-quant model exactly.
- ``acc``: an integer accumulator ``v`` whose real meaning is ``scale_c·v + bias_c`` per channel.
  Adder and 8-bit layers produce it; BatchNorm folds into (scale, bias) without a node; max-pooling
  runs on it directly when every scale is positive (the affine map is then monotone).
- ``fx``: fixed point, int64 ``Z`` with real value ``Z·2^-F`` (F = ``frac_bits``, 40 by default), or
  ``Z·2^-F/n`` after a global sum over n positions (kept exact; the division is folded into the next
  layer's quantization). ``acc`` becomes ``fx`` through a ``requant`` node — one integer multiplier
  and shift per channel plus an integer bias: ``Z = ⌊(v·M_c + 2^(sh_c−1)) / 2^sh_c⌋ + C_c`` — and
  residual adds, ReLU and pooling act on ``fx``.

Each layer's input quantization ``round(z / s)`` is an exact rational rounding of ``Z``: with ``s``
the float32 scale, ``Z·2^-F/(n·s) = Z·2^k / D`` for integers k ≥ 0 and D, so
``x̃ = round_half_even(Z·2^k / D)`` — the decision the real-number model takes for that ``Z``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn import AdderConv2d
from ..quant.adder_layer import QuantAdderConv2d
from ..quant.first_last import QuantFirstLast
from ..quant.uniform import int_range, quantize_int
from .runtime_numpy import GRAPH_FORMAT

DEFAULT_FRAC_BITS = 40
PRODUCT_BITS = 62  # every integer product stays below 2^62 in magnitude (checked at run time as well)
LOSSLESS_HEADROOM_BITS = 12  # room for the excess sums of the lossless activation clamp


def fixed_multiplier(m: float, bits: int, max_shift: int = PRODUCT_BITS) -> tuple[int, int]:
    """``(M, sh)`` with ``M / 2^sh`` the nearest such fraction to ``m`` and ``2^(bits−1) ≤ |M| < 2^bits``
    (fewer bits only when ``m`` is so small that ``sh`` would exceed ``max_shift``)."""
    if not math.isfinite(m):
        raise ValueError(f"multiplier {m} is not finite")
    if m == 0:
        return 0, 0
    _, exp = math.frexp(m)  # |m| = f·2^exp, f in [0.5, 1)
    sh = min(bits - exp, max_shift)
    if sh < 0:
        raise ValueError(f"multiplier {m} needs more than {bits} integer bits")
    mult = round(Fraction(m) * 2**sh)  # exact, round half to even
    if abs(mult) >= 2**bits:
        mult, sh = mult // 2, sh - 1
    return int(mult), int(sh)


def exact_divisor(frac_bits: int, count: int, scale: float) -> tuple[int, int]:
    """``(k, D)`` with ``Z·2^-frac_bits / count / scale = (Z·2^k) / D`` exactly (``scale`` a float32 value)."""
    r = Fraction(1, 2**frac_bits * count) / Fraction(scale)
    k = r.numerator.bit_length() - 1
    if r.numerator != 2**k or scale <= 0:
        raise ValueError(f"scale {scale} does not give a power-of-two numerator")
    if r.denominator >= 2**PRODUCT_BITS:
        raise ValueError(f"scale {scale}: divisor {r.denominator} does not fit int64")
    return k, int(r.denominator)


def _round_int(v: np.ndarray) -> np.ndarray:
    return np.rint(v).astype(np.int64)  # round half to even


@dataclass
class IntegerGraph:
    """Nodes (JSON-ready dicts), their tensors (NumPy) and the graph-level fields of the JSON."""

    nodes: list[dict]
    tensors: dict[str, np.ndarray]
    input: dict
    output: dict
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": GRAPH_FORMAT, "input": self.input, "output": self.output, "nodes": self.nodes,
                "meta": self.meta}

    @classmethod
    def from_json(cls, graph: dict, tensors: dict) -> IntegerGraph:
        return cls(graph["nodes"], dict(tensors), graph["input"], graph["output"], graph.get("meta", {}))

    @property
    def frac_bits(self) -> int:
        return int(self.output["frac_bits"])

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n["op"]] = counts.get(n["op"], 0) + 1
        return counts


@dataclass
class _Image:
    name: str
    shape: tuple


@dataclass
class _Acc:
    name: str
    shape: tuple
    scale: np.ndarray  # (C,) float64: real = scale_c · v + bias_c
    bias: np.ndarray
    bound_bits: int  # |v| < 2^bound_bits by construction


@dataclass
class _Fx:
    name: str
    shape: tuple
    count: int = 1  # real = Z · 2^-frac_bits / count (count > 1 after a global sum)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantAdderConv2d, QuantFirstLast, AdderConv2d)):
            return True
        return super().is_leaf_module(m, qualname)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _bits(n: float) -> int:
    return max(1, math.ceil(math.log2(n + 1)))


class _Builder:
    def __init__(self, frac_bits: int, normalization):
        self.frac_bits = frac_bits
        self.unit = 2.0**-frac_bits
        self.normalization = normalization
        self.nodes: list[dict] = []
        self.tensors: dict[str, np.ndarray] = {}
        self._count = 0
        self._labels: dict[str, int] = {}

    # --------------------------------------------------------------------------------- emitting
    def emit(self, op: str, label: str, inputs: list[str], attrs: dict | None = None,
             params: dict[str, np.ndarray] | None = None) -> str:
        k = self._labels.get(label, 0)
        self._labels[label] = k + 1
        name = label if k == 0 else f"{label}#{k}"
        out = f"t{self._count}"
        self._count += 1
        refs = {}
        for key, arr in (params or {}).items():
            ref = f"{name}.{key}"
            self.tensors[ref] = np.ascontiguousarray(arr)
            refs[key] = ref
        self.nodes.append({"name": name, "op": op, "inputs": inputs, "output": out, "attrs": attrs or {},
                           "params": refs})
        return out

    def to_fx(self, v, label: str) -> _Fx:
        """Requantise an accumulator to fixed point: ``Z = round(v·M_c / 2^sh_c) + C_c``."""
        if isinstance(v, _Fx):
            if v.count != 1:
                raise NotImplementedError(f"{label}: a global average must feed a quantized layer")
            return v
        if isinstance(v, _Image):
            raise NotImplementedError(f"{label}: the raw image may only feed an 8-bit quantized first layer")
        bits = PRODUCT_BITS - v.bound_bits
        mults, shifts = zip(*(fixed_multiplier(float(s) / self.unit, bits) for s in v.scale), strict=True)
        out = self.emit("requant", f"{label}.requant", [v.name], params={
            "mult": np.array(mults, dtype=np.int64), "shift": np.array(shifts, dtype=np.int64),
            "bias": _round_int(v.bias / self.unit)})
        return _Fx(out, v.shape)

    def divisors(self, x: _Fx, scales) -> tuple[np.ndarray, np.ndarray]:
        ks, ds = zip(*(exact_divisor(self.frac_bits, x.count, float(s)) for s in scales), strict=True)
        return np.array(ks, dtype=np.int64), np.array(ds, dtype=np.int64)

    # ----------------------------------------------------------------------------------- layers
    def conv8(self, mod: QuantFirstLast, x, label: str, shape) -> _Acc:
        layer, bits = mod.layer, mod.bits
        if bits > 8:
            raise NotImplementedError(f"{label}: {bits}-bit first/last layers (the integer graph takes ≤ 8)")
        qn, qp = int_range(bits)
        w = layer.weight.detach().float()
        w_int = quantize_int(w, mod.w_scale.view((-1,) + (1,) * (w.dim() - 1)), bits).to(torch.int8).numpy()
        sx = mod.x_scale.detach().float()
        if isinstance(x, _Image):
            if not isinstance(layer, nn.Conv2d):
                raise NotImplementedError(f"{label}: the image input must feed a convolution")
            from ..data import normalize

            c = x.shape[1]
            mean, std = self.normalization
            if len(mean) != c or len(std) != c:
                raise ValueError(f"normalisation has {len(mean)} channels, the model takes {c}")
            u = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, c, 1, 256).contiguous()
            table = quantize_int(normalize(u, mean, std), sx, bits).view(c, 256).to(torch.int8).numpy()
            q = self.emit("lut", f"{label}.lut", [x.name], attrs={"qmin": qn, "qmax": qp}, params={"table": table})
        else:
            if not isinstance(x, _Fx):
                x = self.to_fx(x, label)
            k, d = self.divisors(x, [float(sx)])
            q = self.emit("quantize", f"{label}.quantize", [x.name],
                          attrs={"lshift": int(k[0]), "divisor": int(d[0]), "qmin": qn, "qmax": qp})
        if isinstance(layer, nn.Conv2d):
            if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
                raise NotImplementedError(f"{label}: convolutions with string padding or a padding mode other than "
                                          "zeros")
            attrs = {"stride": _pair(layer.stride), "padding": _pair(layer.padding), "dilation": _pair(layer.dilation)}
            if layer.groups != 1:
                attrs["groups"] = int(layer.groups)
            out = self.emit("conv", label, [q], attrs=attrs, params={"weight": w_int})
        else:
            if len(x.shape) != 2:
                raise NotImplementedError(f"{label}: a linear layer needs a flattened input")
            out = self.emit("linear", label, [q], params={"weight": w_int})
        scale = float(sx) * mod.w_scale.detach().double().numpy()
        bias = (layer.bias.detach().double().numpy() if layer.bias is not None else np.zeros(w.shape[0]))
        fan_in = math.prod(w.shape[1:])
        return _Acc(out, shape, scale, bias, _bits(fan_in * 2 ** (2 * bits - 2)))

    def adder(self, mod: QuantAdderConv2d, x, label: str, shape) -> _Acc:
        if getattr(mod, "grid", "uniform") != "uniform":
            raise NotImplementedError(f"{label}: {mod.grid} levels are fake-quant only (not an integer grid)")
        if mod.bits > 8:
            raise NotImplementedError(f"{label}: {mod.bits}-bit adder layers (the integer graph takes ≤ 8)")
        if not isinstance(x, _Fx):
            x = self.to_fx(x, label)
        signed = bool(getattr(mod, "signed", True))
        qn, qp = int_range(mod.bits, signed)
        scales = mod.scales().detach().float()  # float32, as the fake-quant forward divides by them
        group_of = mod.group_of.detach().cpu().numpy()
        lshift, divisor = self.divisors(x, scales.tolist())
        # the weight operand in units of the activation step: w̄, or 2·w_q on the double-step grid
        wn, wp = mod.acc_weight_bounds()
        w_dtype = torch.int8 if -128 <= wn and wp <= 127 else torch.int16  # unsigned 8-bit reaches 255
        w_int = mod.acc_weight().detach().to(w_dtype).numpy()
        attrs = {"bits": mod.bits, "signed": signed, "qmin": qn, "qmax": qp,
                 "lossless_act_clamp": bool(mod.lossless_act_clamp),
                 "stride": _pair(mod.stride), "padding": _pair(mod.padding), "dilation": _pair(mod.dilation)}
        if mod.double_step:  # informational: the runtimes need nothing new (weights may leave [qmin, qmax])
            attrs["weight_grid"] = "double_step"
        if mod.conv_groups != 1:  # only then: a dense layer's node (and file, version 1) stays as it was
            attrs["groups"] = int(mod.conv_groups)
        out = self.emit("adder", label, [x.name], attrs=attrs, params={
            "weight": w_int, "group_of": group_of.astype(np.int32), "lshift": lshift, "divisor": divisor})
        scale = scales.double().numpy()[group_of]
        bound = _bits(math.prod(w_int.shape[1:]) * max(qp - wn, wp - qn))
        if mod.lossless_act_clamp:
            bound += LOSSLESS_HEADROOM_BITS
        return _Acc(out, shape, scale, mod.clamp_bias.detach().double().numpy().copy(), bound)

    @staticmethod
    def batchnorm(mod: nn.BatchNorm2d, x, label: str, shape) -> _Acc:
        if mod.running_mean is None:
            raise NotImplementedError(f"{label}: BatchNorm without running statistics")
        if not isinstance(x, _Acc):
            raise NotImplementedError(f"{label}: BatchNorm must follow a quantized layer (optionally max-pooled)")
        a = 1.0 / torch.sqrt(mod.running_var.detach().double() + mod.eps)
        if mod.weight is not None:
            a = a * mod.weight.detach().double()
        b = -mod.running_mean.detach().double() * a
        if mod.bias is not None:
            b = b + mod.bias.detach().double()
        a, b = a.numpy(), b.numpy()
        return _Acc(x.name, shape, x.scale * a, x.bias * a + b, x.bound_bits)

    def maxpool(self, mod: nn.MaxPool2d, x, label: str, shape):
        if mod.ceil_mode or _pair(mod.dilation) != [1, 1]:
            raise NotImplementedError(f"{label}: max-pooling with ceil_mode or dilation")
        attrs = {"kernel": _pair(mod.kernel_size), "stride": _pair(mod.stride or mod.kernel_size),
                 "padding": _pair(mod.padding)}
        if isinstance(x, _Acc) and np.all(x.scale > 0):  # monotone: the max commutes with the affine map
            return _Acc(self.emit("maxpool", label, [x.name], attrs=attrs), shape, x.scale, x.bias, x.bound_bits)
        x = self.to_fx(x, label)
        return _Fx(self.emit("maxpool", label, [x.name], attrs=attrs), shape)

    def relu(self, x, label: str, shape) -> _Fx:
        x = self.to_fx(x, label)
        return _Fx(self.emit("relu", label, [x.name]), shape)

    def add(self, a, b, label: str, shape) -> _Fx:
        a, b = self.to_fx(a, f"{label}.a"), self.to_fx(b, f"{label}.b")
        return _Fx(self.emit("add", label, [a.name, b.name]), shape)

    def global_avg(self, x, label: str, in_shape, shape) -> _Fx:
        x = self.to_fx(x, label)
        hw = int(in_shape[2]) * int(in_shape[3])
        return _Fx(self.emit("global_sum", label, [x.name]), shape, hw)

    def flatten(self, x, label: str, in_shape, shape):
        if isinstance(x, _Acc) and math.prod(in_shape[2:]) == 1:
            return _Acc(self.emit("flatten", label, [x.name]), shape, x.scale, x.bias, x.bound_bits)
        if isinstance(x, _Fx):
            return _Fx(self.emit("flatten", label, [x.name]), shape, x.count)
        x = self.to_fx(x, label)
        return _Fx(self.emit("flatten", label, [x.name]), shape)


def _is_relu(node: fx.Node, mod) -> bool:
    if node.op == "call_module":
        return isinstance(mod, nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target == "relu"


def _flatten_args(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


@torch.no_grad()
def convert(qmodel: nn.Module, normalization, *, input_shape=(3, 32, 32), frac_bits: int = DEFAULT_FRAC_BITS,
            meta: dict | None = None) -> IntegerGraph:
    """The integer graph of a fake-quantized model (``quantize(..., QuantConfig(quantize_first_last=True))``).

    ``normalization = (mean, std)`` is what the float model's uint8 input goes through; it is folded
    into the first layer's lookup table, so the graph takes raw uint8 images of ``input_shape``.
    """
    if not 8 <= frac_bits <= 48:
        raise ValueError(f"frac_bits must be in 8..48, got {frac_bits}")
    was_training = qmodel.training
    qmodel.eval()
    try:
        gm = fx.GraphModule(qmodel, _Tracer().trace(qmodel))
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    finally:
        qmodel.train(was_training)
    b = _Builder(frac_bits, normalization)
    env: dict[fx.Node, object] = {}
    output = None
    for node in gm.graph.nodes:
        shape = tuple(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
        label = node.target if node.op == "call_module" else node.name
        in_shape = tuple(node.args[0].meta["tensor_meta"].shape) if node.args and isinstance(
            node.args[0], fx.Node) and "tensor_meta" in node.args[0].meta else None
        if node.op == "placeholder":
            if env:
                raise NotImplementedError("models with more than one input")
            env[node] = _Image("image", (None, *input_shape))
        elif node.op == "output":
            output = args[0]
        elif isinstance(mod, QuantFirstLast):
            env[node] = b.conv8(mod, args[0], label, shape)
        elif isinstance(mod, QuantAdderConv2d):
            env[node] = b.adder(mod, args[0], label, shape)
        elif isinstance(mod, AdderConv2d | nn.Conv2d | nn.Linear):
            raise NotImplementedError(f"{label}: {type(mod).__name__} is not quantized; quantize with "
                                      "QuantConfig(quantize_first_last=True) first")
        elif isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
            env[node] = b.batchnorm(mod, args[0], label, shape)
        elif isinstance(mod, nn.MaxPool2d):
            env[node] = b.maxpool(mod, args[0], label, shape)
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            if _pair(mod.output_size) != [1, 1]:
                raise NotImplementedError(f"{label}: adaptive average pooling to a size other than 1×1")
            env[node] = b.global_avg(args[0], label, in_shape, shape)
        elif isinstance(mod, nn.Identity | nn.Dropout):
            env[node] = args[0]
        elif _is_relu(node, mod):
            env[node] = b.relu(args[0], label, shape)
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and not node.kwargs:
            env[node] = b.add(args[0], args[1], label, shape)
        elif (node.op == "call_method" and node.target == "flatten") or (
                node.op == "call_function" and node.target is torch.flatten) or isinstance(mod, nn.Flatten):
            if not (_flatten_args(node) if mod is None else (mod.start_dim, mod.end_dim) == (1, -1)):
                raise NotImplementedError(f"{label}: flatten other than flatten(1)")
            env[node] = b.flatten(args[0], label, in_shape, shape)
        else:
            target = getattr(node.target, "__name__", node.target)
            what = type(mod).__name__ if mod is not None else f"{node.op} {target}"
            raise NotImplementedError(f"module {label!r}: the integer path cannot lower {what} (docs/format.md lists "
                                      "the ops it lowers)")
    if not isinstance(output, _Acc | _Fx):
        raise NotImplementedError("the model must return one tensor computed from its input")
    out = b.to_fx(output, "logits")
    info = {"name": None, "normalization": {"mean": list(map(float, normalization[0])),
                                            "std": list(map(float, normalization[1]))},
            "num_classes": int(out.shape[1]), **(meta or {})}
    return IntegerGraph(b.nodes, b.tensors, {"name": "image", "dtype": "uint8", "shape": [None, *input_shape]},
                        {"name": out.name, "frac_bits": frac_bits, "shape": [None, *out.shape[1:]]}, info)


@torch.no_grad()
def convert_adder_layer(mod: QuantAdderConv2d, frac_bits: int = DEFAULT_FRAC_BITS) -> IntegerGraph:
    """One adder layer as a graph from a fixed-point input (int64 ``Z``, real value ``Z·2^-frac_bits``)
    to its requantised fixed-point output ``s_j·(x̄ ⊕ w̄ − excess) + clamp_bias``: the unit the
    property tests exercise (``adder`` node, then ``requant``)."""
    b = _Builder(frac_bits, None)
    shape_in, shape_out = (None, mod.in_channels, None, None), (None, mod.out_channels, None, None)
    out = b.to_fx(b.adder(mod, _Fx("x", shape_in), "adder", shape_out), "adder")
    return IntegerGraph(b.nodes, b.tensors, {"name": "x", "dtype": "int64", "shape": list(shape_in)},
                        {"name": out.name, "frac_bits": frac_bits, "shape": list(shape_out)}, {})
