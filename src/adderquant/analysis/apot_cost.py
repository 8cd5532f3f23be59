"""Shift/add operation counts of APoT vs uniform multiplication, for the energy model, and the check of
the APoT abstract's "22 % less computation than uniform at 4 bits on ResNet-50".

A weight level with t non-zero power-of-two terms multiplies an (integer) activation with t shifts and
t − 1 adds (plus a sign flip). A b-bit weight is sign + a (b − 1)-bit magnitude set: APoT Q(b − 1)
(at most k = 2 terms for b = 3, 4, 5; 3 terms from b = 6), uniform {0 … 2^(b−1) − 1} (popcount terms,
shift-add multiplication: up to b − 1 terms). :func:`apot_shift_add_cost` gives the per-product cost,
worst case (``reduce="max"``) or averaged over the levels (``"mean"``: equal use, or ``probs``).

:func:`compare_resnet50` counts a network's multiply-accumulates per layer (the ``nn.Conv2d`` and
``nn.Linear`` layers of :func:`.counting.count_model`: output elements × fan-in) and prices them under
several explicit cost models; first and last layers are 8-bit uniform (by ``w.max()``) in both
networks, as in APoT. The paper does not state its model here; see :data:`COST_MODELS` for the ones
tried and the report in the module tests / project docs for which land near 22 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import create
from ..quant.apot import levels, terms_per_level
from .counting import count_model

__all__ = ["COST_MODELS", "LayerMACs", "ShiftAddCost", "apot_shift_add_cost", "compare_resnet50",
           "layer_macs", "network_cost", "terms_per_level"]


@dataclass(frozen=True)
class ShiftAddCost:
    """Cost of one product x·w: shifts and adds (the sign is a free negation / subtract)."""

    shifts: float
    adds: float
    max_terms: int

    @property
    def ops(self) -> float:
        return self.shifts + self.adds


def apot_shift_add_cost(bits: int, kind: str = "apot", reduce: str = "max",
                        probs: torch.Tensor | None = None) -> ShiftAddCost:
    """Shifts and adds of multiplying by a ``bits``-bit signed weight of ``kind`` (``"apot"`` or
    ``"uniform"``; magnitude set of ``bits − 1`` bits): worst case (``reduce="max"``: k shifts, k − 1
    adds) or the mean over the magnitude levels (``"mean"``; ``probs`` = their usage, default equal)."""
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    signed = terms_per_level(bits, kind, signed=True)
    terms = signed[signed.numel() // 2:].double()  # magnitude levels 0 … 1 (the set is symmetric)
    adds = (terms - 1).clamp_min(0)
    k = int(terms.max())
    if reduce == "max":
        return ShiftAddCost(float(k), float(max(k - 1, 0)), k)
    p = torch.full_like(terms, 1 / terms.numel()) if probs is None else torch.as_tensor(probs).double()
    if p.shape != terms.shape:
        raise ValueError(f"probs must have one entry per magnitude level ({terms.numel()}), "
                         f"got {tuple(p.shape)}")
    p = p / p.sum()
    return ShiftAddCost(float((p * terms).sum()), float((p * adds).sum()), k)


@dataclass(frozen=True)
class LayerMACs:
    name: str
    kind: str
    macs: int


def layer_macs(model: nn.Module, input_shape=(1, 3, 224, 224)) -> list[LayerMACs]:
    """Multiply-accumulates per sample of every ``nn.Conv2d``/``nn.Linear`` (adder layers excluded) for
    one input, in execution order."""
    batch = input_shape[0]
    return [LayerMACs(lc.name, type(model.get_submodule(lc.name)).__name__, lc.macs // batch)
            for lc in count_model(model, input_shape).layers if lc.type in ("conv", "linear")]


# name: (description, per-product cost function(ShiftAddCost) -> float, accumulate add per MAC, reduce)
COST_MODELS = {
    "worst-adds": ("worst-case adds inside the multiply (k − 1 vs b − 2)", lambda c: c.adds, False, "max"),
    "worst-adds+acc": ("worst-case adds + 1 accumulate per MAC", lambda c: c.adds, True, "max"),
    "worst-shift-adds": ("worst-case shifts + adds", lambda c: c.ops, False, "max"),
    "worst-terms+acc": ("worst-case terms, one 'shift-add' each (uniform 3 vs APoT 2 at 4 bits) "
                        "+ 1 accumulate per MAC", lambda c: c.shifts, True, "max"),
    "mean-terms": ("mean terms per product (levels equally used)", lambda c: c.shifts, False, "mean"),
    "mean-shift-adds": ("mean shifts + adds per product (levels equally used)", lambda c: c.ops, False,
                        "mean"),
    "mean-shift-adds+acc": ("mean shifts + adds + 1 accumulate per MAC", lambda c: c.ops, True, "mean"),
}


def network_cost(macs: list[LayerMACs], bits: int, kind: str, model: str, first_last_bits: int | None = 8,
                 include_first_last: bool = True) -> float:
    """Total operations of a network under cost model ``model`` (a key of :data:`COST_MODELS`): inner
    layers with ``bits``-bit ``kind`` weights, first/last layer with ``first_last_bits``-bit uniform."""
    _, price, accumulate, reduce = COST_MODELS[model]
    inner = price(apot_shift_add_cost(bits, kind, reduce)) + accumulate
    edge = 1.0  # float first/last layers: one multiply-accumulate, priced as 1
    if first_last_bits:
        edge = price(apot_shift_add_cost(first_last_bits, "uniform", reduce)) + accumulate
    total = 0.0
    for i, layer in enumerate(macs):
        is_edge = i in (0, len(macs) - 1)
        if is_edge and not include_first_last:
            continue
        total += layer.macs * (edge if is_edge else inner)
    return total


def compare_resnet50(bits: int = 4, include_first_last: bool = True, net: nn.Module | None = None,
                     macs: list[LayerMACs] | None = None) -> dict:
    """Relative cost APoT / uniform for ResNet-50 (``create("resnet50", kind="conv")``, 224×224) under
    every model of :data:`COST_MODELS`: ``{model: (apot_ops, uniform_ops, reduction_percent)}``.
    ``net`` (or its precomputed ``macs``) replaces ResNet-50."""
    if macs is None:
        macs = layer_macs(net if net is not None else create("resnet50", kind="conv"))
    result = {}
    for name in COST_MODELS:
        a = network_cost(macs, bits, "apot", name, include_first_last=include_first_last)
        u = network_cost(macs, bits, "uniform", name, include_first_last=include_first_last)
        result[name] = (a, u, 100.0 * (1 - a / u))
    return result


def _level_table(bits: int, kind: str) -> list[tuple[float, int]]:
    """(magnitude level, terms) pairs — for documentation and tests."""
    lv = levels(bits, kind, signed=True, dtype=torch.float64)
    t = terms_per_level(bits, kind, signed=True)
    n = lv.numel() // 2
    return list(zip(lv[n:].tolist(), t[n:].tolist(), strict=True))
