"""The energy model: per-operation energies, Proposition 2's group overhead, and the pricing of CNN,
AdderNet and quantized variants of a counted model (conventions: ``docs/energy.md``).

:func:`tally` turns the counts of one model (:mod:`.counting`) into operations at a number format and
bit width (``"int4_add"``, ``"fp32_mult"``…) for one variant (FP32, b-bit uniform, APoT, b-bit adder
with g group scales) plus memory traffic; :func:`energy` prices a tally with an :class:`EnergyTable`
(default: Horowitz, ISSCC 2014, 45 nm). Proposition 2 of the paper (extra FLOPs of g group scales) is
:func:`group_overhead_ratio` and :func:`proposition2_ratio`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..quant.apot import terms_per_level
from ..utils import atomic_write, check_bits
from .counting import WEIGHT_TYPES, ModelCount

# ----------------------------------------------------------------------------------------------------
# Proposition 2 / Table 4: the extra FLOPs of g group-shared scales
# ----------------------------------------------------------------------------------------------------


def _check_layer(c: int, g: int, kernel: int) -> None:
    if c < 1 or g < 1 or kernel < 1:
        raise ValueError(f"c, g and kernel must be ≥ 1, got {c}, {g}, {kernel}")


def group_overhead_ratio(c: int, g: int, kernel: int = 3) -> float:
    """Extra FLOPs of ``g`` group scales relative to one shared scale (g = 1), for a quantized adder
    layer c → c with a kernel×kernel window, stride 1, "same" padding (as many input as output elements).

    Our explicit count per output element of the one-scale layer: K = kernel²·c subtractions (|·| not
    counted, the papers' "adder MAC = 2 additions"), K − 1 accumulations, 1 rescale multiplication, and
    per input element 1 activation quantization (one FLOP: x·(1/s)) — 2K + 1 FLOPs. g scales need g
    quantizations per input element: g − 1 extra. Ratio (g − 1)/(2·kernel²·c + 1); Table 4's "relative
    FLOPs" is 1 + this ratio.
    """
    _check_layer(c, g, kernel)
    return (g - 1) / (2 * kernel * kernel * c + 1)


def proposition2_ratio(c: int, g: int = 4, kernel: int = 3) -> float:
    """The paper's closed form: the g − 1 extra quantizations as a share of the grouped layer's FLOPs
    when the base is 2K = 2·kernel²·c per output element (K subtractions + K accumulations, scale
    operations not counted): (g − 1)/(2·kernel²·c + g − 1), exactly 1/(6c + 1) at g = 4, kernel = 3."""
    _check_layer(c, g, kernel)
    return (g - 1) / (2 * kernel * kernel * c + g - 1)


# ----------------------------------------------------------------------------------------------------
# Energy table
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
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

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
    ``adderquant.quant.apot.terms_per_level(b, "apot", signed=True)`` (2 terms at 3–5 bits, 3 at
    6–7; it raises ``ValueError`` where the authors' level sets do not exist).
    """
    if callable(apot_terms):
        return lambda bits: _max_terms(apot_terms(bits))
    if apot_terms is not None:
        value = float(apot_terms)
        return lambda bits: value
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
    (``groups`` for an adder layer: one per group scale; conv: one; a grouped adder layer's input element
    feeds only the O/conv_groups output channels of its conv group, so at most ``min(groups, O/conv_groups)``
    scales — this worst case is counted, 1 for a depthwise layer). First/last layers: FP32, or
    ``first_last_bits``-bit integer convolutions with their scale operations. BatchNorm, ReLU, pooling and
    residual adds (part ``aux``) are FP32 in every variant; with ``fold_bn`` a BatchNorm right after a
    layer costs 1 add per element (its scale folds into FP conv weights or into a rescale; not into FP
    adder weights, where it stays 1 mult + 1 add). Memory: every weight layer reads its weights and
    input and writes its output once, at its operand width; residual adds read the shortcut at 32 bits.
    """
    if groups < 1:
        raise ValueError(f"groups must be ≥ 1, got {groups}")
    check_bits(bits, 1, 32)
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
                if kind == "adder" and lc.out_channels and groups > lc.out_channels:  # as quantize refuses it
                    raise ValueError(f"groups={groups} but adder layer {lc.name} has only {lc.out_channels} "
                                     "output channels (a scale group holds at least one)")
                copies = 1
                if kind == "adder":  # one quantization per scale an input element meets (docstring)
                    per_group = lc.out_channels // lc.conv_groups if lc.out_channels else groups
                    copies = min(groups, per_group) if lc.conv_groups > 1 else groups
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


__all__ = ["PARTS", "EnergyTable", "accumulator_bits", "energy", "group_overhead_ratio", "proposition2_ratio",
           "resolve_apot_terms", "tally", "tally_flops"]
