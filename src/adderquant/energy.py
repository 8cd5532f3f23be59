"""Operation counts, memory traffic and energy of CNNs, AdderNets and their quantized versions.

Three layers of API, each usable on its own (conventions: ``docs/energy.md``):

1. Counting — :func:`count_model` walks a model with forward hooks on one input and returns one
   :class:`LayerCount` per executed Conv2d / adder layer / Linear / BatchNorm / ReLU / pooling /
   residual add, with the *raw* operation counts of :meth:`LayerCount.raw_ops` (multiplications,
   additions, subtractions, absolute values, comparisons). :func:`count_named` does it for a registry
   model on the meta device (no arithmetic is executed).
2. Pricing — :func:`tally` turns the counts of one model into operations at a number format and bit
   width (``"int4_add"``, ``"fp32_mult"``…) for one variant (FP32, b-bit uniform, APoT, b-bit adder
   with g group scales) plus memory traffic; :func:`energy` prices a tally with an :class:`EnergyTable`
   (default: Horowitz, ISSCC 2014, 45 nm).
3. Reports — :func:`model_report` (rows for CNN / APoT CNN / AdderNet / quantized AdderNet),
   :func:`energy_command` (text table + JSON-able dict, for the CLI) and
   :func:`plot_accuracy_vs_energy` (the paper's Figure 6; matplotlib imported lazily).

Proposition 2 of the paper (extra FLOPs of g group scales) is :func:`group_overhead_ratio` and
:func:`proposition2_ratio`.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------
# 1. Counting
# ----------------------------------------------------------------------------------------------------

WEIGHT_TYPES = ("conv", "adder", "linear")
LAYER_TYPES = WEIGHT_TYPES + ("bn", "relu", "maxpool", "avgpool", "add")


@dataclass
class LayerCount:
    """One executed layer. ``fan_in`` is K, the terms summed per output element (c_in/groups·kh·kw for
    convolution and adder layers, in_features for Linear); ``window`` the pooling window size."""

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
    h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return x.new_empty(x.shape[0], m.weight.shape[0], h, w)


def _shape_only_linear_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], m.out_features)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_SHAPE_ONLY = {"conv": _shape_only_conv_forward, "adder": _shape_only_conv_forward,
               "linear": _shape_only_linear_forward}


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
    handles, patched = [], []

    def hook(mod, args, out, mod_name, kind):
        x = args[0]
        lc = LayerCount(mod_name, kind, x.numel(), out.numel())
        if kind in ("conv", "adder"):
            k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]  # c_in/groups · kh · kw
            lc.fan_in, lc.weight_elems, lc.bias = k, mod.weight.numel(), mod.bias is not None
        elif kind == "linear":
            lc.fan_in, lc.weight_elems, lc.bias = mod.in_features, mod.weight.numel(), mod.bias is not None
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

    def block_hook(mod, args, out, mod_name):
        layers.append(LayerCount(mod_name + ".add", "add", 2 * out.numel(), out.numel()))

    try:
        for mod_name, mod in model.named_modules():
            kind = _classify(mod)
            if kind is not None:
                handles.append(mod.register_forward_hook(functools.partial(hook, mod_name=mod_name,
                                                                           kind=kind)))
                if kind in _SHAPE_ONLY:  # weight layers and BatchNorm: shape only, no arithmetic
                    mod.forward = functools.partial(_SHAPE_ONLY[kind], mod)
                    patched.append(mod)
                elif kind == "bn":
                    mod.forward = _identity
                    patched.append(mod)
            elif _is_residual_block(mod):
                # fires when the block returns, so the add is listed after the block's final ReLU
                # (the order inside a block does not change any count)
                handles.append(mod.register_forward_hook(functools.partial(block_hook, mod_name=mod_name)))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(*input_shape, device=device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        for mod in patched:
            del mod.forward
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
    from .models import create, input_size

    with torch.device("meta"):
        model = create(name, num_classes=num_classes, kind=kind)
    s = input_size(name)
    return count_model(model, (1, 3, s, s), name=f"{name}[{kind}]")


# ----------------------------------------------------------------------------------------------------
# Proposition 2 / Table 4: the extra FLOPs of g group-shared scales
# ----------------------------------------------------------------------------------------------------


def group_overhead_ratio(c: int, g: int, kernel: int = 3) -> float:
    """Extra FLOPs of ``g`` group scales relative to one shared scale (g = 1), for a quantized adder
    layer c → c with a kernel×kernel window, stride 1, "same" padding (as many input as output elements).

    Our explicit count per output element of the one-scale layer: K = kernel²·c subtractions (|·| not
    counted, the papers' "adder MAC = 2 additions"), K − 1 accumulations, 1 rescale multiplication, and
    per input element 1 activation quantization (one FLOP: x·(1/s)) — 2K + 1 FLOPs. g scales need g
    quantizations per input element: g − 1 extra. Ratio (g − 1)/(2·kernel²·c + 1); Table 4's "relative
    FLOPs" is 1 + this ratio.
    """
    if c < 1 or g < 1 or kernel < 1:
        raise ValueError(f"c, g and kernel must be ≥ 1, got {c}, {g}, {kernel}")
    return (g - 1) / (2 * kernel * kernel * c + 1)


def proposition2_ratio(c: int, g: int = 4, kernel: int = 3) -> float:
    """The paper's closed form: the g − 1 extra quantizations as a share of the grouped layer's FLOPs
    when the base is 2K = 2·kernel²·c per output element (K subtractions + K accumulations, scale
    operations not counted): (g − 1)/(2·kernel²·c + g − 1), exactly 1/(6c + 1) at g = 4, kernel = 3."""
    if c < 1 or g < 1 or kernel < 1:
        raise ValueError(f"c, g and kernel must be ≥ 1, got {c}, {g}, {kernel}")
    return (g - 1) / (2 * kernel * kernel * c + g - 1)


# ----------------------------------------------------------------------------------------------------
# 2. Energy table
# ----------------------------------------------------------------------------------------------------

_HOROWITZ = "Horowitz, 'Computing's energy problem', ISSCC 2014, 45 nm"


def _default_int_add() -> dict[int, float]:
    return {8: 0.03, 16: 0.05, 32: 0.1}


def _default_int_mult() -> dict[int, float]:
    return {8: 0.2, 32: 3.1}


def _default_fp_add() -> dict[int, float]:
    return {16: 0.4, 32: 0.9}


def _default_fp_mult() -> dict[int, float]:
    return {16: 1.1, 32: 3.7}


def _default_memory() -> dict[str, float]:
    # pJ per 64-bit read; DRAM is 1.3–2.6 nJ in the source: the low end is used
    return {"sram_8kb": 10.0, "sram_32kb": 20.0, "sram_1mb": 100.0, "dram": 1300.0}


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in pJ, by bit width (default: Horowitz 45 nm, from the reference README).

    Integer widths that are not in the table are scaled: below the smallest tabulated width and above
    the largest, energy ∝ width^exponent from the nearest anchor (``add_exponent`` = 1 for adders,
    ``mult_exponent`` = 2 for multipliers: add_b = 0.03·b/8 pJ and mult_b = 0.2·(b/8)² pJ for b ≤ 8
    with the default table); between two anchors, log-log interpolation (exact at the anchors,
    monotone). Floating-point widths must be tabulated. ``abs_cost``, ``cmp_cost`` and ``shift_cost``
    price an absolute value, a comparison and a shift (APoT) as that fraction of an addition of the same
    format and width. ``memory`` is pJ per 64-bit access at each level; ``memory_level`` is the level
    charged.
    """

    int_add: dict[int, float] = field(default_factory=_default_int_add)
    int_mult: dict[int, float] = field(default_factory=_default_int_mult)
    fp_add: dict[int, float] = field(default_factory=_default_fp_add)
    fp_mult: dict[int, float] = field(default_factory=_default_fp_mult)
    memory: dict[str, float] = field(default_factory=_default_memory)
    memory_level: str = "sram_1mb"
    add_exponent: float = 1.0
    mult_exponent: float = 2.0
    abs_cost: float = 0.0
    cmp_cost: float = 1.0
    shift_cost: float = 0.0
    source: str = _HOROWITZ

    def __post_init__(self):
        for name in ("int_add", "int_mult", "fp_add", "fp_mult"):
            table = getattr(self, name)
            if not table:
                raise ValueError(f"EnergyTable.{name} must have at least one width")
            clean = {}
            for width, pj in table.items():
                w = int(width)
                if w < 1 or not float(pj) >= 0:
                    raise ValueError(f"EnergyTable.{name}: bad entry {width!r}: {pj!r}")
                clean[w] = float(pj)
            object.__setattr__(self, name, dict(sorted(clean.items())))
        if self.memory_level not in self.memory:
            raise ValueError(f"memory_level {self.memory_level!r} not in memory levels {sorted(self.memory)}")

    # -- lookups ---------------------------------------------------------------------------------------
    def add(self, bits: int, fmt: str = "int") -> float:
        if fmt == "fp":
            return self._fp(self.fp_add, "fp_add", bits)
        return _scaled(self.int_add, bits, self.add_exponent)

    def mult(self, bits: int, fmt: str = "int") -> float:
        if fmt == "fp":
            return self._fp(self.fp_mult, "fp_mult", bits)
        return _scaled(self.int_mult, bits, self.mult_exponent)

    def op(self, key: str) -> float:
        """pJ of one operation named like ``"int4_add"``, ``"fp32_mult"``, ``"int5_abs"``, ``"fp32_cmp"``."""
        fmt, bits, op = parse_op_key(key)
        if op == "mult":
            return self.mult(bits, fmt)
        if op == "add":
            return self.add(bits, fmt)
        if op == "abs":
            return self.abs_cost * self.add(bits, fmt)
        if op == "cmp":
            return self.cmp_cost * self.add(bits, fmt)
        if op == "shift":
            return self.shift_cost * self.add(bits, fmt)
        raise ValueError(f"unknown operation {op!r} in {key!r}")

    @property
    def memory_pj_per_bit(self) -> float:
        return self.memory[self.memory_level] / 64.0

    @staticmethod
    def _fp(table: dict[int, float], name: str, bits: int) -> float:
        if bits not in table:
            raise ValueError(f"no floating-point entry for {bits} bits in EnergyTable.{name} "
                             f"(tabulated: {sorted(table)}); add one in the JSON table")
        return table[bits]

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("int_add", "int_mult", "fp_add", "fp_mult"):
            d[name] = {str(k): v for k, v in d[name].items()}
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnergyTable:
        """Fields given replace the defaults entirely (a given ``int_add`` is the whole int-add table);
        absent fields keep the defaults. Unknown keys raise ``ValueError``."""
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown energy-table key(s) {unknown}; allowed keys: {sorted(allowed)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, path: str | Path) -> EnergyTable:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an energy table must be a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def _scaled(anchors: Mapping[int, float], bits: int, exponent: float) -> float:
    if bits < 1:
        raise ValueError(f"bit width must be ≥ 1, got {bits}")
    if bits in anchors:
        return anchors[bits]
    widths = sorted(anchors)
    if bits < widths[0] or bits > widths[-1]:
        a = widths[0] if bits < widths[0] else widths[-1]
        return anchors[a] * (bits / a) ** exponent
    lo = max(w for w in widths if w < bits)
    hi = min(w for w in widths if w > bits)
    t = math.log(bits / lo) / math.log(hi / lo)
    if anchors[lo] <= 0 or anchors[hi] <= 0:
        return anchors[lo] + t * (anchors[hi] - anchors[lo])
    return anchors[lo] * (anchors[hi] / anchors[lo]) ** t


def op_key(fmt: str, bits: int, op: str) -> str:
    return f"{fmt}{bits}_{op}"


def parse_op_key(key: str) -> tuple[str, int, str]:
    head, _, op = key.partition("_")
    fmt = "int" if head.startswith("int") else "fp" if head.startswith("fp") else ""
    digits = head[len(fmt):]
    if not fmt or not digits.isdigit() or not op:
        raise ValueError(f"bad operation key {key!r}; expected e.g. 'int4_add' or 'fp32_mult'")
    return fmt, int(digits), op


# ----------------------------------------------------------------------------------------------------
# Variants → operations at a format and width
# ----------------------------------------------------------------------------------------------------

PARTS = ("body", "first_last", "scales", "aux")


def default_apot_terms(bits: int) -> float:
    """Power-of-two terms per b-bit APoT weight when ``adderquant.quant.apot_cost`` is absent: APoT's
    b = k·n rule (base width k = 2, n additive terms) on the b − 1 magnitude bits, ceil((b − 1)/2) ≥ 1:
    2 terms at 4 bits."""
    return float(max(1, math.ceil((bits - 1) / 2)))


def _max_terms(value: Any) -> float:
    """A number of terms, or the worst case of per-level term counts (a tensor or a sequence)."""
    if hasattr(value, "max") and not isinstance(value, int | float):
        return float(value.max())
    if isinstance(value, Sequence):
        return float(max(value))
    return float(value)


def resolve_apot_terms(apot_terms: Callable[[int], Any] | float | None) -> Callable[[int], float]:
    """Terms per APoT weight as a function of the bit width.

    A number → that many at every width; a callable → its value at the width, reduced with ``max`` if it
    returns per-level counts; ``None`` → the worst case over the signed b-bit APoT levels from
    ``adderquant.quant.apot_cost.terms_per_level(b, "apot", signed=True)`` (2 terms at 3–5 bits, 3 at
    6–7; it raises ``ValueError`` where the authors' level sets do not exist), or
    :func:`default_apot_terms` when that module is absent.
    """
    if callable(apot_terms):
        return lambda bits: _max_terms(apot_terms(bits))
    if apot_terms is not None:
        value = float(apot_terms)
        return lambda bits: value
    try:
        from .quant.apot_cost import terms_per_level  # the APoT cost model of adderquant.quant
    except ImportError:
        return default_apot_terms
    return lambda bits: _max_terms(terms_per_level(bits, "apot", signed=True))


def accumulator_bits(kind: str, bits: int, fan_in: int, acc_bits: int | str) -> int:
    """Accumulator width: ``acc_bits`` if an int; ``"auto"``: the width that can never overflow —
    adder: |x̄ − w̄| ≤ 2^b − 1, so Σ of K terms needs b + ceil(log2 K) bits, +1 sign (the output is
    −Σ): b + 1 + ceil(log2 K); conv: |x̄·w̄| ≤ 2^(2b−2), signed sum of K: 2b + ceil(log2 K)."""
    if isinstance(acc_bits, str):
        if acc_bits != "auto":
            raise ValueError(f"acc_bits must be an int or 'auto', got {acc_bits!r}")
        extra = math.ceil(math.log2(fan_in)) if fan_in > 1 else 0
        return bits + 1 + extra if kind == "adder" else 2 * bits + extra
    if acc_bits < 1:
        raise ValueError(f"acc_bits must be ≥ 1, got {acc_bits}")
    return int(acc_bits)


def tally(counts: ModelCount, bits: int = 32, *, groups: int = 1, first_last_bits: int | None = None,
          acc_bits: int | str = 32, apot_terms: float | None = None, fold_bn: bool = True) -> dict[str, Any]:
    """Operations of one variant of the counted model, by part, keyed ``"<fmt><bits>_<op>"``, plus the
    memory traffic in bits. JSON-able; priced by :func:`energy`.

    ``bits = 32``: everything FP32. ``bits < 32``: body weight layers use b-bit integer operands —
    conv: K int-b mult (APoT, ``apot_terms`` = t: t int-(2b) shifts + (t − 1) int-(2b) adds per
    product) + (K−1) accumulations; adder: K int-b sub + K int-b abs + (K−1) accumulations; accumulations at
    :func:`accumulator_bits`. Scale operations (part ``scales``, FP32 multiplications): per body output
    element 1 rescale (s_x·s_w or the group scale s_j), per body input element 1 activation quantization
    (``groups`` for an adder layer: one per group scale; conv: one). First/last layers: FP32, or
    ``first_last_bits``-bit integer convolutions with their scale operations. BatchNorm, ReLU, pooling and
    residual adds (part ``aux``) are FP32 in every variant; with ``fold_bn`` a BatchNorm right after a
    layer costs 1 add per element (its scale folds into FP conv weights or into a rescale; not into FP
    adder weights, where it stays 1 mult + 1 add). Memory: every weight layer reads its weights and
    input and writes its output once, at its operand width; residual adds read the shortcut at 32 bits.
    """
    if groups < 1:
        raise ValueError(f"groups must be ≥ 1, got {groups}")
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    ops: dict[str, Counter] = {p: Counter() for p in PARTS}
    mem = Counter()
    rescaled: set[int] = set()  # indices of layers whose outputs get a rescale multiplication
    quantized_body = bits < 32
    fl_bits = first_last_bits if first_last_bits is not None and first_last_bits < 32 else None

    for i, lc in enumerate(counts.layers):
        n, k = lc.out_elems, lc.fan_in
        if lc.type in WEIGHT_TYPES:
            body = lc.role == "body"
            part = "body" if body else "first_last"
            b = bits if body and quantized_body else (fl_bits if not body else None)
            kind = "adder" if lc.type == "adder" else "conv"
            if b is None:  # full precision
                if kind == "adder":
                    ops[part][op_key("fp", 32, "add")] += k * n  # subtractions
                    ops[part][op_key("fp", 32, "abs")] += k * n
                else:
                    ops[part][op_key("fp", 32, "mult")] += k * n
                ops[part][op_key("fp", 32, "add")] += (k - 1) * n + (n if lc.bias else 0)
                wbits = abits = 32
            else:
                acc = accumulator_bits(kind, b, k, acc_bits)
                if kind == "adder":
                    ops[part][op_key("int", b, "add")] += k * n
                    ops[part][op_key("int", b, "abs")] += k * n
                elif apot_terms is not None and body:  # t terms: t shifts + (t − 1) adds per product
                    ops[part][op_key("int", 2 * b, "shift")] += round(apot_terms * k * n)
                    ops[part][op_key("int", 2 * b, "add")] += round(max(apot_terms - 1, 0) * k * n)
                else:
                    ops[part][op_key("int", b, "mult")] += k * n
                ops[part][op_key("int", acc, "add")] += (k - 1) * n
                copies = groups if kind == "adder" else 1
                ops["scales"][op_key("fp", 32, "mult")] += n + copies * lc.in_elems
                if lc.bias:
                    ops["scales"][op_key("fp", 32, "add")] += n
                rescaled.add(i)
                wbits = abits = b
            mem["weights"] += lc.weight_elems * wbits
            mem["activations"] += (lc.in_elems + n) * abits
        elif lc.type == "bn":
            src = lc.source
            if fold_bn and src >= 0 and (src in rescaled or counts.layers[src].type in ("conv", "linear")):
                ops["aux"][op_key("fp", 32, "add")] += n
            else:
                ops["aux"][op_key("fp", 32, "mult")] += n
                ops["aux"][op_key("fp", 32, "add")] += n
        else:
            for op, v in lc.raw_ops().items():
                ops["aux"][op_key("fp", 32, op)] += v
            if lc.type == "add":
                mem["activations"] += n * 32
    return {"ops": {p: dict(c) for p, c in ops.items() if c}, "memory_bits": dict(mem)}


def tally_flops(t: Mapping[str, Any], count_abs: bool = False, parts: Iterable[str] | None = None) -> int:
    """Operations in a :func:`tally` (all formats and widths), the papers' FLOPs convention: |·| not
    counted unless ``count_abs``; ``parts`` restricts to some of "body", "first_last", "scales", "aux"."""
    keep = set(parts) if parts is not None else None
    return sum(n for part, ops in t["ops"].items() if keep is None or part in keep
               for key, n in ops.items() if count_abs or not key.endswith("_abs"))


def energy(counts: Mapping[str, Any], table: EnergyTable | None = None) -> dict[str, Any]:
    """Price a :func:`tally` (or a flat ``{"int4_add": n, …}`` mapping) with ``table``.

    Returns ``{"pJ": {op key: pJ}, "parts_uJ": {part: µJ}, "compute_uJ", "memory_uJ", "total_uJ"}``.
    """
    table = table or EnergyTable()
    if "ops" in counts:
        parts = counts["ops"]
        memory_bits = counts.get("memory_bits", {})
    else:
        parts, memory_bits = {"all": counts}, {}
    per_op: Counter = Counter()
    parts_uj = {}
    for part, ops in parts.items():
        pj = 0.0
        for key, n in ops.items():
            e = n * table.op(key)
            per_op[key] += e
            pj += e
        parts_uj[part] = pj * 1e-6
    memory_pj = sum(memory_bits.values()) * table.memory_pj_per_bit
    compute = sum(per_op.values()) * 1e-6
    memory = memory_pj * 1e-6
    return {"pJ": dict(sorted(per_op.items())), "parts_uJ": parts_uj, "compute_uJ": compute,
            "memory_uJ": memory, "total_uJ": compute + memory}


# ----------------------------------------------------------------------------------------------------
# 3. Reports
# ----------------------------------------------------------------------------------------------------

FAMILIES = {  # (kind, method) → family label
    ("conv", "fp32"): "CNN",
    ("conv", "uniform"): "CNN",
    ("conv", "apot"): "CNN (APoT)",
    ("adder", "fp32"): "AdderNet",
    ("adder", "paper"): "AdderNet (quantized)",
    ("adder", "qssf"): "AdderNet (quantized)",
}


def variant_row(name: str, kind: str, method: str, bits: int, *, groups: int = 4,
                first_last_bits: int | None = None, acc_bits: int | str = 32,
                apot_terms: Callable[[int], float] | float | None = None, fold_bn: bool = True,
                table: EnergyTable | None = None) -> dict[str, Any]:
    """One report row: ``kind`` "conv"/"adder", ``method`` "fp32", "uniform" (CNN, per-channel
    weights, per-layer activations), "apot" (CNN), "paper" (adder, ``groups`` scales) or "qssf" (adder,
    one shared scale)."""
    if (kind, method) not in FAMILIES:
        raise ValueError(f"unknown variant ({kind!r}, {method!r}); choose from {sorted(FAMILIES)}")
    counts = count_named(name, kind)
    if method == "fp32":
        bits = 32
    elif bits >= 32:
        raise ValueError(f"method {method!r} needs bits < 32, got {bits}")
    g = groups if method == "paper" else 1
    terms = resolve_apot_terms(apot_terms)(bits) if method == "apot" else None
    fl_bits = first_last_bits if bits < 32 else None  # FP32 rows are FP32 throughout
    t = tally(counts, bits, groups=g, first_last_bits=fl_bits, acc_bits=acc_bits, apot_terms=terms,
              fold_bn=fold_bn)
    e = energy(t, table)
    fmt = "FP32" if bits == 32 else f"int{bits}"
    if method == "fp32":
        label = f"{'CNN' if kind == 'conv' else 'AdderNet'} FP32"
    elif method == "apot":
        label = f"CNN APoT {bits}b ({terms:g} terms)"
    else:
        label = f"CNN {fmt}" if kind == "conv" else f"AdderNet {fmt} g={g}"
    return {"model": name, "label": label, "family": FAMILIES[(kind, method)], "kind": kind,
            "method": method, "bits": bits, "groups": g if kind == "adder" and bits < 32 else None,
            "first_last_bits": fl_bits or 32, "acc_bits": acc_bits if bits < 32 else 32,
            "apot_terms": terms, "macs": counts.macs, "params": counts.params,
            "flops": tally_flops(t), "ops": t["ops"], "memory_bits": t["memory_bits"],
            "pJ": e["pJ"], "parts_uJ": e["parts_uJ"], "compute_uJ": e["compute_uJ"],
            "memory_uJ": e["memory_uJ"], "total_uJ": e["total_uJ"]}


def model_report(name: str, bits_list: Iterable[int] = (32, 8, 6, 5, 4), groups: int = 4,
                 first_last_bits: int | None = None, *, acc_bits: int | str = 32,
                 apot_terms: Callable[[int], float] | float | None = None, include_apot: bool = True,
                 fold_bn: bool = True, table: EnergyTable | None = None) -> list[dict[str, Any]]:
    """Rows for CNN (FP32 at 32, int-b uniform otherwise), APoT CNN (b < 32, if ``include_apot``),
    AdderNet FP32 and quantized AdderNet with ``groups`` scales at each b (APoT rows are skipped at
    widths where the terms function raises ``ValueError``); ``ratio_vs_cnn_fp32`` is the
    total energy relative to the FP32 CNN. ``apot_terms``: terms per weight, a number or a callable of
    the bit width (default: see :func:`resolve_apot_terms`)."""
    bits_list = sorted(set(bits_list), reverse=True)
    kw = dict(groups=groups, first_last_bits=first_last_bits, acc_bits=acc_bits, apot_terms=apot_terms,
              fold_bn=fold_bn, table=table)
    rows = []
    for b in bits_list:
        rows.append(variant_row(name, "conv", "fp32" if b >= 32 else "uniform", b, **kw))
    if include_apot:
        terms_of = resolve_apot_terms(apot_terms)
        for b in (b for b in bits_list if b < 32):
            try:
                terms = terms_of(b)
            except ValueError:  # no APoT level set at this width (apot_cost covers 2..7 bits)
                continue
            rows.append(variant_row(name, "conv", "apot", b, **{**kw, "apot_terms": terms}))
    for b in bits_list:
        rows.append(variant_row(name, "adder", "fp32" if b >= 32 else "paper", b, **kw))
    _add_ratios(rows, name, kw)
    return rows


def _add_ratios(rows: list[dict[str, Any]], name: str, kw: Mapping[str, Any]) -> None:
    ref = next((r for r in rows if r["kind"] == "conv" and r["method"] == "fp32"), None)
    if ref is None:
        ref = variant_row(name, "conv", "fp32", 32, **kw)
    for r in rows:
        r["ratio_vs_cnn_fp32"] = r["total_uJ"] / ref["total_uJ"]


# -- accuracies ---------------------------------------------------------------------------------------


def load_accuracies(path: str | Path) -> list[dict[str, Any]]:
    """Read accuracy records: a JSON list of objects, one object, ``{"results": [...]}``, or JSON
    lines (one object per line). Each object needs ``kind`` ("adder"/"conv"), ``method``, ``bits`` and
    ``top1``; ``model``, ``dataset`` and ``groups`` are optional."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data["results"] if isinstance(data.get("results"), list) else [data]
    records = []
    for i, rec in enumerate(data):
        missing = [k for k in ("kind", "method", "bits", "top1") if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing}: {rec}")
        if rec["kind"] not in ("adder", "conv"):
            raise ValueError(f"{path}: record {i}: kind must be 'adder' or 'conv', got {rec['kind']!r}")
        records.append(dict(rec))
    return records


def record_variant(rec: Mapping[str, Any], groups: int = 4) -> tuple[str, str, int, int]:
    """(kind, energy method, bits, groups) of an accuracy record: FP32 if bits ≥ 32 or method "fp32"/
    "fp"; for CNNs "apot" → APoT, any other method → uniform integer; for AdderNets "qssf*" → one
    shared scale, any other method → ``rec["groups"]`` (default ``groups``) group scales."""
    kind, method, bits = rec["kind"], str(rec["method"]).lower(), int(rec["bits"])
    if bits >= 32 or method in ("fp32", "fp", "full"):
        return kind, "fp32", 32, 1
    if kind == "conv":
        return kind, ("apot" if method.startswith("apot") else "uniform"), bits, 1
    if method.startswith("qssf"):
        return kind, "qssf", bits, 1
    return kind, "paper", bits, int(rec.get("groups", groups))


def _row_key(row: Mapping[str, Any]) -> tuple[str, str, int, int]:
    return row["kind"], row["method"], row["bits"], row["groups"] or 1


def attach_accuracies(rows: list[dict[str, Any]], records: Sequence[Mapping[str, Any]], *,
                      groups: int = 4, **variant_kw) -> list[dict[str, Any]]:
    """Points for the plot: one per record (for ``rows``' model), carrying the record's top-1 and the
    energy of the matching row (computed with ``variant_kw`` if ``rows`` lacks it)."""
    name = rows[0]["model"]
    by_key = {_row_key(r): r for r in rows}
    points = []
    for rec in records:
        if rec.get("model", name) != name:
            continue
        kind, method, bits, g = record_variant(rec, groups)
        key = (kind, method, bits, g if kind == "adder" and bits < 32 else 1)
        if key not in by_key:
            by_key[key] = variant_row(name, kind, method, bits, groups=g, **variant_kw)
        row = by_key[key]
        points.append({**{k: row[k] for k in ("label", "family", "kind", "bits", "total_uJ", "compute_uJ")},
                       "method": rec["method"], "energy_method": method, "groups": row["groups"],
                       "top1": float(rec["top1"]), "dataset": rec.get("dataset")})
    return points


def plot_accuracy_vs_energy(rows: Sequence[Mapping[str, Any]],
                            accuracies: Sequence[Mapping[str, Any]] | Mapping[str, float],
                            path: str | Path, *, energy_key: str = "total_uJ", title: str | None = None,
                            log_x: bool = True) -> Path:
    """Accuracy vs energy like the paper's Figure 6, written as a PNG (Agg canvas; matplotlib is
    imported here only). ``accuracies``: accuracy records (see :func:`load_accuracies`) or a mapping
    row label → top-1. One series per family (CNN, CNN APoT, AdderNet FP32, quantized AdderNet per
    method); points annotated with their bit width."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(rows)
    if isinstance(accuracies, Mapping):
        by_label = {r["label"]: r for r in rows}
        unknown = sorted(set(accuracies) - set(by_label))
        if unknown:
            raise ValueError(f"accuracies for unknown row labels {unknown}; labels: {sorted(by_label)}")
        points = [{**by_label[k], "top1": float(v)} for k, v in accuracies.items()]
    else:
        points = attach_accuracies(rows, accuracies)
    if not points:
        raise ValueError("no accuracy matches the rows: nothing to plot")
    datasets = {p.get("dataset") for p in points}
    series: dict[str, list] = {}
    for p in points:
        if p["kind"] == "adder" and p["bits"] < 32:
            name = f"AdderNet quantized ({p['method']}, g={p['groups']})"
        elif p["kind"] == "adder":
            name = "AdderNet FP32"
        else:
            name = p["family"]
        if len(datasets) > 1:
            name += f" — {p.get('dataset')}"
        series.setdefault(name, []).append(p)
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = "os^Dvp*hX"
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts.sort(key=lambda p: p[energy_key])
        xs, ys = [p[energy_key] for p in pts], [p["top1"] for p in pts]
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if len(pts) > 1 else "none",
                markersize=7, label=name)
        for p in pts:
            ax.annotate("FP32" if p["bits"] >= 32 else f"{p['bits']}b", (p[energy_key], p["top1"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
    if log_x:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="both", labelsize=8)
    unit = {"total_uJ": "energy per image, compute + memory (µJ)",
            "compute_uJ": "compute energy per image (µJ)"}
    ax.set_xlabel(unit.get(energy_key, energy_key))
    ax.set_ylabel("top-1 accuracy (%)")
    model = rows[0]["model"] if rows else ""
    ax.set_title(title or f"{model}: accuracy vs energy (45 nm op energies)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


# -- CLI-facing -------------------------------------------------------------------------------------

_COLUMNS = (("label", "variant", "{}"), ("macs", "MACs (M)", "{:.2f}"), ("body", "body µJ", "{:.2f}"),
            ("first_last", "first/last µJ", "{:.2f}"), ("scales", "scales µJ", "{:.3f}"),
            ("aux", "aux µJ", "{:.2f}"), ("compute_uJ", "compute µJ", "{:.2f}"),
            ("memory_uJ", "memory µJ", "{:.2f}"), ("total_uJ", "total µJ", "{:.2f}"),
            ("ratio_vs_cnn_fp32", "× CNN FP32", "{:.3f}"), ("top1", "top-1 %", "{:.2f}"))


def format_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """Rows as an aligned text table (or a Markdown table)."""
    cols = [c for c in _COLUMNS if c[0] != "top1" or any("top1" in r for r in rows)]
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key, r.get("parts_uJ", {}).get(key, 0.0 if key in PARTS else None))
            if key == "macs":
                v = v / 1e6
            cells.append("–" if v is None else fmt.format(v))
        body.append(cells)
    head = [c[1] for c in cols]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    fmt_line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([fmt_line(head), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in body])


def energy_command(model: str, bits: Sequence[int] | None = None, json_out: bool = False,
                   plot_path: str | Path | None = None, accuracies_json: str | Path | None = None, *,
                   groups: int = 4, first_last_bits: int | None = None, acc_bits: int | str = 32,
                   apot_terms: Callable[[int], float] | float | None = None,
                   energy_table: str | Path | EnergyTable | None = None) -> tuple[str, dict[str, Any]]:
    """``adderquant energy --model M [--bits 8 6 5 4] [--json] [--plot F.png] [--accuracies F]``.

    FP32 rows are always included; ``bits`` defaults to 8 6 5 4. Returns ``(text, data)``: ``text`` is
    the aligned table (or ``data`` as JSON when ``json_out``), ``data`` a JSON-able dict with the rows,
    the energy table used, the settings, and the accuracy points when ``accuracies_json`` is given.
    ``plot_path`` needs ``accuracies_json``.
    """
    table = (energy_table if isinstance(energy_table, EnergyTable)
             else EnergyTable.from_json(energy_table) if energy_table is not None else EnergyTable())
    bits_list = [32, *(bits if bits is not None else (8, 6, 5, 4))]
    rows = model_report(model, bits_list, groups, first_last_bits, acc_bits=acc_bits, apot_terms=apot_terms,
                        table=table)
    data: dict[str, Any] = {
        "model": model, "settings": {"bits": sorted(set(bits_list), reverse=True), "groups": groups,
                                     "first_last_bits": first_last_bits or 32, "acc_bits": acc_bits,
                                     "fold_bn": True},
        "energy_table": table.to_dict(), "rows": rows}
    if plot_path is not None and accuracies_json is None:
        raise ValueError("--plot needs --accuracies (a results JSON with top-1 per variant)")
    if accuracies_json is not None:
        records = load_accuracies(accuracies_json)
        points = attach_accuracies(rows, records, groups=groups, first_last_bits=first_last_bits,
                                   acc_bits=acc_bits, apot_terms=apot_terms, table=table)
        data["points"] = points
        for r in rows:  # show top-1 in the table where exactly one record matches the row
            hits = [p["top1"] for p in points if p["label"] == r["label"]]
            if len(hits) == 1:
                r["top1"] = hits[0]
        if plot_path is not None:
            data["plot"] = str(plot_accuracy_vs_energy(rows, records, plot_path))
    text = json.dumps(data, indent=2) if json_out else format_table(rows)
    return text, data


__all__ = [
    "EnergyTable", "LayerCount", "ModelCount", "accumulator_bits", "attach_accuracies", "count_model",
    "count_named", "default_apot_terms", "energy", "energy_command", "format_table", "group_overhead_ratio",
    "load_accuracies", "model_report", "plot_accuracy_vs_energy", "proposition2_ratio", "record_variant",
    "resolve_apot_terms", "tally", "tally_flops", "variant_row",
]
