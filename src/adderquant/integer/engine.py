"""The integer graph executed with PyTorch integer tensors (int8 operands, int32/int64 accumulators).

Same node semantics as the NumPy runtime (``docs/format.md``); the adder layers go through
``adderquant.kernels.int_adder_conv2d`` (the fastest registered backend that takes int8), the 8-bit
convolutions through a float64 convolution of integer values, which is exact because every product
and partial sum is an integer below 2^53 (|x|, |w| ≤ 128, K·2^14 ≪ 2^53).

Speed: a ``requant`` followed by ``relu``, or by an ``add`` (then optionally ``relu``) that nothing
else reads, runs as one fused ``kernels.int_requant`` pass, and activations are quantised by
``kernels.int_quantize``; the C backend does each in one pass over memory instead of a chain of
int64 tensor ops. The graph and its integers are unchanged by this (the tests compare the results).

Fast path: where the C extension is built, the ``cpu`` backend serves the int8 kernels and the graph
has the shape ``integer.cpu_plan`` takes (the CIFAR ResNets, for one), the whole batch runs in one
call of the C network runner instead — same integers, without int64 tensors between layers.
``IntegerEngine(graph, fast=False)`` keeps the op-by-op path.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import backend_name, int_adder_conv2d, int_quantize, int_requant
from ..kernels.reference import check_int64_range
from ..utils import conv_output_size
from . import cpu_plan
from .graph import IntegerGraph
from .runtime_numpy import load_aqz, quant_thresholds


def div_round(z: torch.Tensor, lshift: int, divisor: int) -> torch.Tensor:
    """``round(z·2^lshift / divisor)``, ties to even, exactly.

    int64 division is slow in PyTorch on CPU, so the quotient is estimated in float64 and then made
    exact with integer remainders: ``r = z − q·D`` is computed exactly, a second estimate removes the
    estimate's error (a few units at most for |z| < 2^62), and ±1 steps bring ``r`` into [0, D).
    The NumPy runtime divides in int64 directly; the tests hold both to the same integers."""
    if lshift:
        check_int64_range(z, 1 << lshift, "quantize")
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


def _box_sum(v: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    s = v.sum(1, keepdim=True, dtype=torch.int64).to(torch.float64)  # exact: integers < 2^53
    ones = torch.ones(1, 1, *kernel, dtype=torch.float64)
    return F.conv2d(s, ones, stride=stride, padding=padding, dilation=dilation).round().to(torch.int64)


def _max_pool(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    h, w = x.shape[2:]
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=torch.iinfo(x.dtype).min)
    ho, wo = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            out = patch.clone() if out is None else torch.maximum(out, patch)
    return out


def _conv_plan(rows: torch.Tensor | None, out_channels: int, groups: int) -> list:
    """For the output channels ``rows`` (None: all) of a grouped layer: ``(g, positions in rows, rows)`` per
    conv group g that holds some of them."""
    rows = torch.arange(out_channels) if rows is None else rows
    owner = torch.div(rows, out_channels // groups, rounding_mode="floor")
    plan = []
    for g in torch.unique(owner).tolist():
        sel = (owner == g).nonzero().flatten()
        plan.append((g, sel, rows[sel]))
    return plan


def _grouped_adder(xq, w, plan, cg: int, geo, excess=None) -> torch.Tensor:
    """The accumulators of a grouped adder layer's channels in ``plan`` (:func:`_conv_plan`): the dense int
    kernel on each conv group's input slice (``cg`` channels), minus that slice's box sum of ``excess``."""
    out = None
    for g, sel, rows in plan:
        acc = int_adder_conv2d(xq[:, g * cg : (g + 1) * cg], w[rows], *geo)
        if excess is not None:
            acc = acc.to(torch.int64) - _box_sum(excess[:, g * cg : (g + 1) * cg], tuple(w.shape[2:]), *geo)
        if out is None:
            out = torch.empty((xq.shape[0], sum(len(s) for _, s, _ in plan)) + tuple(acc.shape[2:]), dtype=acc.dtype)
        out[:, sel] = acc
    return out


_I8 = torch.zeros(1, 1, 1, 1, dtype=torch.int8)  # what backend_name needs to pick the int8 kernels' backend


def _narrowest(qmin: int, qmax: int) -> torch.dtype:
    """The dtype the int8 kernels take when it holds [qmin, qmax] (uint8 for the unsigned 8-bit grid)."""
    if -128 <= qmin and qmax <= 127:
        return torch.int8
    return torch.uint8 if 0 <= qmin and qmax <= 255 else torch.int16


def _fuse(nodes: list[dict]) -> list[dict]:
    """Merge ``requant → relu`` and ``requant → add [→ relu]`` chains into one ``requant`` step.

    A chain is merged only when each intermediate value has exactly one reader, the next node, so no
    other node can observe the skipped intermediates."""
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node["inputs"]:
            readers[name] = readers.get(name, 0) + 1
    fused, i = [], 0
    while i < len(nodes):
        node = dict(nodes[i], residual=False, relu=False)
        i += 1
        if node["op"] == "requant":
            nxt = nodes[i] if i < len(nodes) else None
            if nxt and nxt["op"] == "add" and readers.get(node["output"]) == 1 and node["output"] in nxt["inputs"]:
                other = next(n for n in nxt["inputs"] if n != node["output"])  # one reader: not add(r, r)
                node.update(inputs=node["inputs"] + [other], output=nxt["output"], residual=True)
                i += 1
                nxt = nodes[i] if i < len(nodes) else None
            if nxt and nxt["op"] == "relu" and readers.get(node["output"]) == 1 and nxt["inputs"] == [node["output"]]:
                node.update(output=nxt["output"], relu=True)
                i += 1
        fused.append(node)
    return fused


class IntegerEngine:
    """Runs an :class:`IntegerGraph` (or an ``.aqz`` file) on uint8 NCHW images.

    ``engine(x)`` returns int64 logits on the grid ``2^-frac_bits`` (a NumPy array for a NumPy input, as
    the NumPy runtime does); ``predict`` their argmax.
    Images run ``chunk`` at a time: every op is per image, so the result does not depend on it, and
    small chunks keep the int64 activations in cache (and out of the allocator's page-faulting
    ``mmap`` range): 64 was fastest for ResNet-20 on the 2-core development machine (16–512 tried).
    """

    def __init__(self, graph: IntegerGraph | str | os.PathLike, chunk: int = 64, fast: bool = True):
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of images, got {chunk}")
        self.chunk = chunk
        self.fast = fast
        self._cpu_plans: dict = {}  # input shape (C, H, W) -> cpu_plan.CpuPlan, or None where it does not apply
        if not isinstance(graph, IntegerGraph):
            aqz = load_aqz(graph)
            graph = IntegerGraph.from_json(aqz.graph, aqz.tensors)
        self.graph = graph
        self._params = []
        for node in graph.nodes:
            p = {k: torch.from_numpy(np.array(graph.tensors[v])) for k, v in node.get("params", {}).items()}
            if node["op"] == "adder":
                a = node["attrs"]
                p["x_dtype"] = _narrowest(a["qmin"], a["qmax"])
                keys = [(int(k), int(d)) for k, d in zip(p["lshift"], p["divisor"], strict=True)]
                channel_key = [keys[g] for g in p["group_of"].tolist()]
                unique = list(dict.fromkeys(channel_key))
                p["by_key"] = [(k, None if len(unique) == 1 else
                                torch.tensor([c for c, ck in enumerate(channel_key) if ck == k])) for k in unique]
                if int(a.get("groups", 1)) != 1:  # grouped: per scale key, the conv groups its channels lie in
                    p["conv_plan"] = {k: _conv_plan(idx, p["weight"].shape[0], int(a["groups"])) for k, idx in
                                      p["by_key"]}
                p["thresholds"] = {k: torch.from_numpy(quant_thresholds(*k, a["qmin"], a["qmax"])) for k in unique}
            if node["op"] == "quantize":
                a = node["attrs"]
                p["thresholds"] = torch.from_numpy(quant_thresholds(a["lshift"], a["divisor"], a["qmin"], a["qmax"]))
                p["x_dtype"] = _narrowest(a["qmin"], a["qmax"])
            if node["op"] in ("conv", "linear"):
                p["weight_f64"] = p["weight"].to(torch.float64)
            self._params.append(p)
        by_name = dict(zip((n["name"] for n in graph.nodes), self._params, strict=True))
        self._steps = _fuse(graph.nodes)
        self._params = [by_name[n["name"]] for n in self._steps]
        self._last_use = {}
        for i, node in enumerate(self._steps):
            for name in node["inputs"]:
                self._last_use[name] = i

    @property
    def frac_bits(self) -> int:
        return self.graph.frac_bits

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if isinstance(x, np.ndarray):
            return self(torch.from_numpy(x)).numpy()
        spec = self.graph.input
        dtype = getattr(torch, spec["dtype"])
        if x.dtype != dtype:
            raise TypeError(f"the integer engine takes {spec['dtype']} input, got {x.dtype}")
        if x.dim() != len(spec["shape"]) or any(d is not None and d != n for d, n in zip(spec["shape"][1:], x.shape[1:],
                                                                                           strict=True)):
            raise ValueError(f"input of shape {tuple(x.shape)}, the model takes {spec['shape']} (None: any)")
        x = x.cpu()
        plan = self.cpu_plan(x.shape[1:])
        if plan is not None and x.shape[0]:
            try:
                return plan.run(x.contiguous())
            except cpu_plan.PlanOverflow:
                pass  # the op-by-op path raises, naming the node
        if x.shape[0] > self.chunk:
            return torch.cat([self._run(x[i : i + self.chunk]) for i in range(0, x.shape[0], self.chunk)])
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.graph.input["name"]: x}
        out_name = self.graph.output["name"]
        for i, (node, p) in enumerate(zip(self._steps, self._params, strict=True)):
            env[node["output"]] = getattr(self, "_" + node["op"])(node, p, *(env[n] for n in node["inputs"]))
            for n in node["inputs"]:
                if self._last_use[n] == i and n != out_name:
                    env.pop(n, None)
        return env[out_name]

    logits = __call__

    def cpu_plan(self, shape) -> cpu_plan.CpuPlan | None:
        """The C network runner's plan for inputs of shape (C, H, W), when it is in use: ``fast``, the
        ``cpu`` backend serving the int8 kernels, and a graph it takes (``integer.cpu_plan``)."""
        if not self.fast or not cpu_plan.available() or backend_name("int_forward", _I8, _I8) != "cpu":
            return None
        key = tuple(int(v) for v in shape)
        if key not in self._cpu_plans:
            self._cpu_plans[key] = cpu_plan.compile_plan(self.graph, self._steps, key)
        return self._cpu_plans[key]

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
        return int_quantize(x, p["thresholds"], a["qmin"], p["x_dtype"])

    @staticmethod
    def _conv(node, p, x):
        a = node["attrs"]
        y = F.conv2d(x.to(torch.float64), p["weight_f64"], stride=a["stride"], padding=a["padding"],
                     dilation=a["dilation"], groups=a.get("groups", 1))
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
        for key, idx in p["by_key"]:  # groups that share a scale share one quantised input: one kernel call
            if a["lossless_act_clamp"]:  # the unclamped value is needed for the excess
                wide = div_round(x, *key)
                xq = wide.clamp(a["qmin"], a["qmax"]).to(p["x_dtype"])
            else:
                xq = int_quantize(x, p["thresholds"][key], a["qmin"], p["x_dtype"])
            if "conv_plan" in p:  # grouped layer: one dense kernel call per conv group, on channel slices
                excess = ((wide - a["qmax"]).clamp_min_(0) + (a["qmin"] - wide).clamp_min_(0)
                          if a["lossless_act_clamp"] else None)
                acc = _grouped_adder(xq, w, p["conv_plan"][key], x.shape[1] // int(a["groups"]), geo, excess)
                if idx is None:
                    return acc
                if out is None:
                    out = torch.empty((x.shape[0], w.shape[0]) + tuple(acc.shape[2:]), dtype=acc.dtype)
                out[:, idx] = acc
                continue
            acc = int_adder_conv2d(xq, w if idx is None else w[idx], *geo)
            if a["lossless_act_clamp"]:  # the excess term can leave int32
                excess = (wide - a["qmax"]).clamp_min_(0) + (a["qmin"] - wide).clamp_min_(0)
                acc = acc.to(torch.int64) - _box_sum(excess, tuple(w.shape[2:]), *geo)
            if idx is None:
                return acc
            if out is None:
                out = torch.empty((x.shape[0], w.shape[0]) + tuple(acc.shape[2:]), dtype=acc.dtype)
            out[:, idx] = acc
        return out

    @staticmethod
    def _requant(node, p, x, residual=None):
        try:
            return int_requant(x, p["mult"], p["shift"], p["bias"], residual, relu=node["relu"])
        except OverflowError as e:
            raise OverflowError(f"{node['name']}: {e}") from e

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
