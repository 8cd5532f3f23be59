"""The integer graph executed with PyTorch integer tensors (int8 operands, int32/int64 accumulators).

Same node semantics as the NumPy runtime (``docs/format.md``); the adder layers go through
``adderquant.kernels.int_adder_conv2d`` (the fastest registered backend that takes int8), the 8-bit
convolutions through a float64 convolution of integer values, which is exact because every product
and partial sum is an integer below 2^53 (|x|, |w| ≤ 128, K·2^14 ≪ 2^53).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import int_adder_conv2d
from .graph import IntegerGraph
from .runtime_numpy import load_aqz, quant_thresholds

_INT64_LIMIT = 2**62


def _check_range(v: torch.Tensor, m: int, what: str) -> None:
    if m and v.numel():
        lo, hi = torch.aminmax(v)
        if max(-int(lo), int(hi)) > _INT64_LIMIT // m:
            raise OverflowError(f"{what}: |value| {max(-int(lo), int(hi))} times multiplier {m} leaves int64")


def requant(v: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, bias: torch.Tensor, what: str) -> torch.Tensor:
    """``floor((v·M + 2^(sh−1)) / 2^sh) + C`` in int64."""
    _check_range(v, int(mult.abs().max()) if mult.numel() else 0, what)
    y = v.to(torch.int64) * mult
    y += (torch.ones_like(shift) << shift) >> 1
    y >>= shift
    y += bias
    return y


def div_round(z: torch.Tensor, lshift: int, divisor: int) -> torch.Tensor:
    """``round(z·2^lshift / divisor)``, ties to even, exactly.

    int64 division is slow in PyTorch on CPU, so the quotient is estimated in float64 and then made
    exact with integer remainders: ``r = z − q·D`` is computed exactly, a second estimate removes the
    estimate's error (a few units at most for |z| < 2^62), and ±1 steps bring ``r`` into [0, D).
    The NumPy runtime divides in int64 directly; the tests hold both to the same integers."""
    if lshift:
        _check_range(z, 1 << lshift, "quantize")
        z = z << lshift
    d = float(divisor)
    q = torch.floor(z.to(torch.float64) / d).to(torch.int64)
    r = z - q * divisor
    q2 = torch.floor(r.to(torch.float64) / d).to(torch.int64)
    q += q2
    r -= q2 * divisor
    neg = r < 0
    q -= neg.to(torch.int64)
    r += neg.to(torch.int64) * divisor
    big = r >= divisor
    q += big.to(torch.int64)
    r -= big.to(torch.int64) * divisor
    r *= 2
    return q + ((r > divisor) | ((r == divisor) & ((q & 1) == 1))).to(torch.int64)


def quantize_clamped(z: torch.Tensor, thresholds: torch.Tensor, qmin: int) -> torch.Tensor:
    """``clamp(round(z·2^k / D), qmin, qmax)`` as ``qmin + #{T_k ≤ z}`` (see ``quant_thresholds``)."""
    return torch.bucketize(z, thresholds, right=True).add_(qmin)


def _channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def _box_sum(v: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    s = v.sum(1, keepdim=True, dtype=torch.int64).to(torch.float64)  # exact: integers < 2^53
    ones = torch.ones(1, 1, *kernel, dtype=torch.float64)
    return F.conv2d(s, ones, stride=stride, padding=padding, dilation=dilation).round().to(torch.int64)


def _max_pool(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    h, w = x.shape[2:]
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=torch.iinfo(x.dtype).min)
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            out = patch.clone() if out is None else torch.maximum(out, patch)
    return out


class IntegerEngine:
    """Runs an :class:`IntegerGraph` (or an ``.aqz`` file) on uint8 NCHW images.

    ``engine(x)`` returns int64 logits on the grid ``2^-frac_bits``; ``predict`` their argmax.
    """

    def __init__(self, graph: IntegerGraph | str | os.PathLike):
        if not isinstance(graph, IntegerGraph):
            aqz = load_aqz(graph)
            graph = IntegerGraph.from_json(aqz.graph, aqz.tensors)
        self.graph = graph
        self._params = []
        for node in graph.nodes:
            p = {k: torch.from_numpy(np.array(graph.tensors[v])) for k, v in node.get("params", {}).items()}
            if node["op"] == "adder":
                p["index"] = [torch.nonzero(p["group_of"] == g).flatten() for g in range(len(p["divisor"]))]
                a = node["attrs"]
                p["x_dtype"] = torch.int8 if -128 <= a["qmin"] and a["qmax"] <= 127 else torch.int16
                p["keys"] = [(int(k), int(d)) for k, d in zip(p["lshift"], p["divisor"], strict=True)]
                p["thresholds"] = {key: torch.from_numpy(quant_thresholds(*key, a["qmin"], a["qmax"]))
                                   for key in set(p["keys"])}
            if node["op"] == "quantize":
                a = node["attrs"]
                p["thresholds"] = torch.from_numpy(quant_thresholds(a["lshift"], a["divisor"], a["qmin"], a["qmax"]))
            if node["op"] in ("conv", "linear"):
                p["weight_f64"] = p["weight"].to(torch.float64)
            self._params.append(p)
        self._last_use = {}
        for i, node in enumerate(graph.nodes):
            for name in node["inputs"]:
                self._last_use[name] = i

    @property
    def frac_bits(self) -> int:
        return self.graph.frac_bits

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.graph.input
        dtype = getattr(torch, spec["dtype"])
        if x.dtype != dtype:
            raise TypeError(f"the integer engine takes {spec['dtype']} input, got {x.dtype}")
        if x.dim() != len(spec["shape"]) or any(d is not None and d != n for d, n in zip(spec["shape"][1:], x.shape[1:],
                                                                                           strict=True)):
            raise ValueError(f"input of shape {tuple(x.shape)}, the model takes {spec['shape']} (None: any)")
        env = {self.graph.input["name"]: x.cpu()}
        out_name = self.graph.output["name"]
        for i, (node, p) in enumerate(zip(self.graph.nodes, self._params, strict=True)):
            env[node["output"]] = getattr(self, "_" + node["op"])(node, p, *(env[n] for n in node["inputs"]))
            for n in node["inputs"]:
                if self._last_use[n] == i and n != out_name:
                    env.pop(n, None)
        return env[out_name]

    logits = __call__

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(1)

    # ------------------------------------------------------------------------------------- ops
    @staticmethod
    def _lut(node, p, x):
        table = p["table"].to(torch.int64)
        c = x.shape[1]
        flat = x.to(torch.int64) + (torch.arange(c) * 256).view(1, c, 1, 1)
        return table.flatten()[flat]

    @staticmethod
    def _quantize(node, p, x):
        a = node["attrs"]
        return quantize_clamped(x, p["thresholds"], a["qmin"])

    @staticmethod
    def _conv(node, p, x):
        a = node["attrs"]
        y = F.conv2d(x.to(torch.float64), p["weight_f64"], stride=a["stride"], padding=a["padding"],
                     dilation=a["dilation"])
        return y.round().to(torch.int64)

    @staticmethod
    def _linear(node, p, x):
        return (x.to(torch.float64) @ p["weight_f64"].T).round().to(torch.int64)

    @staticmethod
    def _adder(node, p, x):
        a = node["attrs"]
        geo = (a["stride"], a["padding"], a["dilation"])
        w = p["weight"]
        out = None
        cache = {}
        for g, idx in enumerate(p["index"]):
            if idx.numel() == 0:
                continue
            key = p["keys"][g]  # groups often share a scale: quantize once
            if key not in cache:
                if a["lossless_act_clamp"]:  # the unclamped value is needed for the excess
                    wide = div_round(x, *key)
                    cache = {key: (wide, wide.clamp(a["qmin"], a["qmax"]).to(p["x_dtype"]))}
                else:
                    cache = {key: (None, quantize_clamped(x, p["thresholds"][key], a["qmin"]).to(p["x_dtype"]))}
            wide, xq = cache[key]
            acc = int_adder_conv2d(xq, w[idx], *geo).to(torch.int64)
            if a["lossless_act_clamp"]:
                excess = (wide - a["qmax"]).clamp_min_(0) + (a["qmin"] - wide).clamp_min_(0)
                acc -= _box_sum(excess, tuple(w.shape[2:]), *geo)
            if out is None:
                out = torch.empty((x.shape[0], w.shape[0]) + tuple(acc.shape[2:]), dtype=torch.int64)
            out[:, idx] = acc
        return out

    @staticmethod
    def _requant(node, p, x):
        return requant(x, *(_channel(p[k], x.dim()) for k in ("mult", "shift", "bias")), node["name"])

    @staticmethod
    def _relu(node, p, x):
        return x.clamp_min(0)

    @staticmethod
    def _add(node, p, a, b):
        return a + b

    @staticmethod
    def _maxpool(node, p, x):
        a = node["attrs"]
        return _max_pool(x, a["kernel"], a["stride"], a["padding"])

    @staticmethod
    def _global_sum(node, p, x):
        return x.sum((2, 3), keepdim=True, dtype=torch.int64)

    @staticmethod
    def _flatten(node, p, x):
        return x.reshape(x.shape[0], -1)
