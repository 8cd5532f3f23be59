"""The integer graph compiled for the C network runner (``csrc/int_net.c``), the engine's fast path.

``compile_plan(graph, steps, (C, H, W))`` turns the engine's fused steps into one C plan that runs a
whole batch in one call: the images are spread over the threads and each thread takes one image at a
time through every layer, its activations in an arena of buffers that stays in the core's cache.
Between layers the values are kept as the next layer needs them — uint8 codes (``x̄ − q_min``, NCHWc8
with the consumer's padding as halo) for every adder layer that reads them, and the int64 fixed-point
``Z`` only where a residual add or the global sum reads it — so nothing goes through int64 tensors
that nobody reads. Every layer is one fused pass: SAD kernel, requantisation (+ residual, ReLU), the
next layers' quantisation. Same integers as the op-by-op path and the NumPy runtime (see the C file
for how the quantisation stays exact; the tests compare all three on every ISA path).

It takes graphs of the form ``lut → conv (8-bit) → requant``, then adder layers whose accumulator
goes to one ``requant`` (with or without residual and ReLU) and whose input is one such requant's
output, and the head ``global_sum → [flatten] → quantize → conv 1×1 | linear → [flatten] → requant``
— the CIFAR ResNets and ``adderize``d CNNs of that shape. Anything else (max-pooling, the lossless
activation clamp, groups with different scales in one adder layer, grouped convolutions, …) raises
:class:`Unsupported` and the engine runs op by op instead.
"""

from __future__ import annotations

import ctypes
import threading
from fractions import Fraction

import numpy as np
import torch

from ..kernels import cpu as _cpu
from ..utils import conv_output_size
from .runtime_numpy import quant_thresholds

_LIB = _cpu._LIB
_LIMIT = 2**62
_MAX_MARGIN = 2.0**-8  # margins beyond this: the estimate is too coarse to be worth it (never in practice)


class Unsupported(Exception):
    """The graph (or this input shape) has something the C runner does not take."""


class PlanOverflow(OverflowError):
    """A requantised product left int64 at run time (the op-by-op path reports which)."""


def available() -> bool:
    return _LIB is not None and hasattr(_LIB, "aq_plan_new")


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.int64))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _dptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_double))


def _geom(c, h, w, o, k, stride, padding, dilation):
    ho = conv_output_size(h, k[0], stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, k[1], stride[1], padding[1], dilation[1])
    if ho <= 0 or wo <= 0:
        raise Unsupported("empty output")
    return [1, c, h, w, o, k[0], k[1], *stride, *padding, *dilation, ho, wo], (o, ho, wo)


def _check(ok, what):
    if not ok:
        raise Unsupported(what)


def _margin_v(c: Fraction, vmax: int, a: float, b: float) -> float:
    """Bound of |estimate − Z·2^k/D| for the v-mode estimate fma(v, a, b) (csrc/int_net.c): the floor of
    the requantisation (½·c) plus the roundings of a, b and the fma, for |v| ≤ vmax."""
    return max(2.0**-30, 0.5 * float(c) + 2.0**-51 * (vmax * abs(a) + abs(b) + 4096.0))


def _margin_exact(c: Fraction) -> float:
    return max(2.0**-30, 2.0**-50 * (8192.0 + 2.0**33 * float(c)))


def _v_tables(thr, M, sh, B, relu: bool, alpha: int, beta, tlo, thi, width: int):
    """Integer code tables in the domain of the kernel's tile values ``T`` (csrc/int_net.c, v mode).

    With ``v = alpha·T + beta_c`` the accumulator, the code of channel c is
    ``f_c(T) = #{thr ≤ relu(requant(v))}``, monotone in T (direction: the sign of alpha·M_c); with
    ``key = ±T`` oriented so that f is non-decreasing, ``f_c = #{t : key ≥ U[c, t]}`` where U[c, t] is the
    least key (in the channel's range [tlo_c, thi_c] of T) with f ≥ t+1 — found exactly by a binary
    search on the same integer formulas the runtimes use. Returns (neg (C,) uint8, U (C, width) int32)."""
    n, O = len(thr), len(M)
    M, sh, B, beta = (np.asarray(v, dtype=np.int64) for v in (M, sh, B, beta))
    neg = alpha * np.sign(M) < 0
    klo = np.where(neg, -np.asarray(thi), np.asarray(tlo)).astype(np.int64)
    khi = np.where(neg, -np.asarray(tlo), np.asarray(thi)).astype(np.int64)
    t = np.arange(1, n + 1, dtype=np.int64)[None, :]
    col = (slice(None), None)

    def f(key):
        v = alpha * np.where(neg[col], -key, key) + beta[col]
        z = ((v * M[col] + ((np.int64(1) << sh[col]) >> 1)) >> sh[col]) + B[col]
        return np.searchsorted(thr, np.maximum(z, 0) if relu else z, side="right")

    lo = np.repeat(klo[col], n, 1)
    hi = np.repeat(khi[col] + 1, n, 1)
    while (lo < hi).any():
        mid = (lo + hi) // 2
        ok = f(mid) >= t
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
    tab = np.full((O, width), np.iinfo(np.int32).max, dtype=np.int64)
    tab[:, :n] = np.where(lo > khi[col], np.iinfo(np.int32).max, lo)
    return neg.astype(np.uint8), np.ascontiguousarray(tab, dtype=np.int32)


class CpuPlan:
    """A compiled plan; ``run(x)`` gives the int64 logits of uint8 images (N, C, H, W)."""

    def __init__(self, graph, steps, in_shape):
        self._h = None
        self._lock = threading.Lock()
        self._keep = []
        self.layers: list[dict] = []  # per C op: name, kind, geometry, buffers (benchmarks)
        self._build(graph, steps, tuple(int(v) for v in in_shape))

    def __del__(self):
        if getattr(self, "_h", None) is not None and _LIB is not None:
            _LIB.aq_plan_free(self._h)
            self._h = None

    # ------------------------------------------------------------------------------------ analysis
    def _build(self, graph, steps, in_shape):
        T = graph.tensors
        inp = graph.input["name"]
        kind, shape, acc_src = {inp: "image"}, {inp: in_shape}, {}
        readers: dict[str, int] = {}
        for s in steps:
            for n in s["inputs"]:
                readers[n] = readers.get(n, 0) + 1
        ops, zprod, tail = [], {}, {}
        for i, s in enumerate(steps):
            op, ins, out, a = s["op"], s["inputs"], s["output"], s.get("attrs", {})
            _check(a.get("groups", 1) == 1, "grouped layers")
            x = ins[0] if ins else None
            if op == "lut":
                _check(i == 0 and ins == [inp], "a table lookup that is not the first step")
                kind[out], shape[out] = "lut", shape[inp]
            elif op == "conv" and kind.get(x) == "lut":
                w = T[s["params"]["weight"]]
                c, h, wd = shape[x]
                _check(w.shape[1] == c, "conv channels")
                geo, oshape = _geom(c, h, wd, w.shape[0], w.shape[2:], a["stride"], a["padding"], a["dilation"])
                kind[out], shape[out], acc_src[out] = "acc", oshape, ("stem", s, geo, steps[0])
            elif op == "adder" and kind.get(x) == "z":
                _check(not a["lossless_act_clamp"], "the lossless activation clamp")
                group_key = [(int(k), int(d)) for k, d in zip(T[s["params"]["lshift"]], T[s["params"]["divisor"]],
                                                                  strict=True)]
                chan_key = [group_key[g] for g in T[s["params"]["group_of"]].tolist()]
                keys = list(dict.fromkeys(chan_key))  # the distinct input scales, one code buffer each
                _check(len(keys) <= 16, "more than 16 input scales in one adder layer")
                key_of = np.array([keys.index(k) for k in chan_key], dtype=np.uint8)
                w = T[s["params"]["weight"]]
                c, h, wd = shape[x]
                _check(w.shape[1] == c and a["qmax"] - a["qmin"] <= 255 and a["qmin"] <= 0 <= a["qmax"], "adder grid")
                geo, oshape = _geom(c, h, wd, w.shape[0], w.shape[2:], a["stride"], a["padding"], a["dilation"])
                kind[out], shape[out], acc_src[out] = "acc", oshape, ("adder", s, geo, (keys, key_of))
            elif op == "requant" and kind.get(x) == "acc":
                _check(readers.get(x) == 1, "an accumulator read twice")
                res = ins[1] if s.get("residual") else None
                _check(res is None or (kind.get(res) == "z" and shape[res] == shape[x]), "residual")
                ops.append({"src": acc_src[x], "requant": s, "res": res, "out": out, "consumers": []})
                kind[out], shape[out], zprod[out] = "z", shape[x], len(ops) - 1
            elif op == "global_sum" and kind.get(x) == "z" and not tail:
                tail["z"] = x
                kind[out], shape[out] = "gsum", (shape[x][0], 1, 1)
            elif op == "flatten" and kind.get(x) in ("gsum", "tacc"):
                kind[out], shape[out] = kind[x], shape[x]
            elif op == "quantize" and kind.get(x) == "gsum":
                tail["quantize"] = s
                kind[out], shape[out] = "tq", shape[x]
            elif op in ("conv", "linear") and kind.get(x) == "tq":
                w = T[s["params"]["weight"]]
                _check(w.shape[1] == shape[x][0] and (op == "linear" or (w.shape[2:] == (1, 1) and
                                                                         list(a["padding"]) == [0, 0])), "head")
                tail["fc"] = s
                kind[out], shape[out] = "tacc", (w.shape[0], 1, 1)
            elif op == "requant" and kind.get(x) == "tacc" and not s.get("residual"):
                _check(out == graph.output["name"] and "fc" in tail, "the head's requantisation is not the output")
                tail["requant"] = s
                kind[out] = "logits"
            else:
                raise Unsupported(f"{op} on {kind.get(x)}")
        _check(kind.get(graph.output["name"]) == "logits" and {"z", "quantize", "fc", "requant"} <= set(tail),
               "the graph does not end in the global-sum head")
        # who reads each Z: adder layers (codes), residual adds and the global sum (the int64 values)
        keep_z = {tail["z"]} | {op["res"] for op in ops if op["res"] is not None}
        last_use: dict = {}
        for j, op in enumerate(ops):
            if op["src"][0] == "adder":
                x = op["src"][1]["inputs"][0]
                a = op["src"][1]["attrs"]
                for k in op["src"][3][0]:
                    key = (x, int(a["qmin"]), int(a["qmax"])) + k
                    ops[zprod[x]]["consumers"].append((key, a["padding"]))
                    last_use[("c", key)] = j
            if op["res"] is not None:
                last_use[("z", op["res"])] = j
        last_use[("z", tail["z"])] = len(ops)
        self._emit(T, ops, zprod, keep_z, last_use, tail, shape, in_shape)

    # ------------------------------------------------------------------------------------ emission
    def _emit(self, T, ops, zprod, keep_z, last_use, tail, shape, in_shape):
        lib = _LIB
        self._h = lib.aq_plan_new(*in_shape)
        if not self._h:
            raise MemoryError("aq_plan_new")
        bufs = {}  # ("z", name) or ("c", key) -> (id, defined at op, bytes)
        for j, op in enumerate(ops):
            out = op["out"]
            c, h, w = shape[out]
            if out in keep_z:
                res = op["res"]
                if res is not None and last_use.get(("z", res)) == j and shape[res] == shape[out]:
                    bufs[("z", out)] = (bufs[("z", res)][0], j)  # in place: the residual's last reader
                else:
                    bufs[("z", out)] = (lib.aq_plan_zbuf(self._h, c, h, w), j)
            halos: dict = {}
            for key, pad in op["consumers"]:
                hh, hw = halos.get(key, (0, 0))
                halos[key] = (max(hh, int(pad[0])), max(hw, int(pad[1])))
            for key, (hh, hw) in halos.items():
                bid = lib.aq_plan_codebuf(self._h, c, h, w, hh, hw, -key[1])
                bufs[("c", key)] = (bid, j)
            op["codes"] = list(halos)
        _check(all(b[0] >= 0 for b in bufs.values()), "too many buffers")
        arena = self._place(bufs, last_use)
        self.arena_bytes = int(arena)  # per thread
        for op in ops:
            self._emit_op(T, op, bufs, shape)
        self._emit_tail(T, tail, bufs)
        if lib.aq_plan_finalize(self._h, arena):
            raise Unsupported("plan finalisation")
        self.num_classes = int(T[tail["fc"]["params"]["weight"]].shape[0])
        self.bufs = {k: v[0] for k, v in bufs.items()}
        self.nbuf = max(self.bufs.values()) + 1

    def _place(self, bufs, last_use) -> int:
        """Arena offsets: a buffer lives from the op that writes it to the last op that reads it (a Z written
        in place over its residual carries both names); greedy first fit in order of definition (a buffer
        never shares bytes with one alive in the same op)."""
        span: dict[int, list[int]] = {}
        for key, (bid, first) in bufs.items():
            lo, hi = span.get(bid, (first, first))
            span[bid] = [min(lo, first), max(hi, last_use.get(key, first))]
        items = sorted(span.items(), key=lambda kv: (kv[1][0], -_LIB.aq_plan_buf_bytes(self._h, kv[0])))
        live: list[tuple[int, int, int]] = []  # (offset, end, last use)
        top = 0
        for bid, (first, last) in items:
            size = (_LIB.aq_plan_buf_bytes(self._h, bid) + 63) // 64 * 64
            live = [iv for iv in live if iv[2] >= first]
            off = 0
            for lo, hi, _ in sorted(live):
                if off + size <= lo:
                    break
                off = max(off, hi)
            live.append((off, off + size, last))
            top = max(top, off + size)
            if _LIB.aq_plan_place(self._h, bid, off):
                raise Unsupported("placement")
        return top

    def _emit_op(self, T, op, bufs, shape):
        lib, h = _LIB, self._h
        kind, node, geo, extra = op["src"]
        rq = op["requant"]
        M, sh, B = (_i64(T[rq["params"][k]]) for k in ("mult", "shift", "bias"))
        o = geo[4]
        _check(M.shape == (o,), "requant channels")
        g = (ctypes.c_int64 * 15)(*geo)
        w = T[node["params"]["weight"]].astype(np.int64)
        wk = w.reshape(o, -1)
        if kind == "stem":
            table = np.ascontiguousarray(T[extra["params"]["table"]], dtype=np.int8)
            _check(table.shape == (geo[1], 256) and np.abs(w).max(initial=0) <= 128, "stem table / weights")
            xmax = int(np.abs(table.astype(np.int64)).max(initial=0))
            vmax = np.abs(wk).sum(1) * xmax
            _check(int(vmax.max(initial=0)) < 2**31, "stem accumulator range")
            self._keep += [table, wb := np.ascontiguousarray(w, dtype=np.int8)]
            opi = lib.aq_plan_stem(h, g, _ptr(table), _ptr(wb))
        else:
            a = node["attrs"]
            qmin, qmax = int(a["qmin"]), int(a["qmax"])
            _check(np.abs(w).max(initial=0) < 2**15, "adder weights")
            vmax = np.maximum(np.abs(qmin - wk), np.abs(qmax - wk)).sum(1)
            _check(int(vmax.max(initial=0)) < 2**31, "adder accumulator range")
            x = node["inputs"][0]
            keys, key_of = extra
            ins = np.array([bufs[("c", (x, qmin, qmax) + k)][0] for k in keys], dtype=np.int32)
            wq = wk - qmin  # the weights as the kernel sees them: clamped to [0, 255] plus a constant
            cst = (np.maximum(-wq, 0) + np.maximum(wq - 255, 0)).sum(1)
            w16 = np.ascontiguousarray(w, dtype=np.int16)
            self._keep += [ins, key_of]
            opi = lib.aq_plan_adder(h, g, len(ins), _ptr(ins), _ptr(key_of), qmin, _ptr(w16))
        if opi < 0:
            raise Unsupported("C plan refused the layer")
        mabs = int(np.abs(M).max(initial=0))
        _check(mabs < 2**62, "requant multipliers")
        _check(mabs == 0 or int(vmax.max(initial=0)) <= _LIMIT // mabs, "requant range")
        res = bufs[("z", op["res"])][0] if op["res"] is not None else -1
        zout = bufs[("z", op["out"])][0] if ("z", op["out"]) in bufs else -1
        exact = int(res >= 0 or zout >= 0)
        if lib.aq_plan_epilogue(h, opi, _ptr(M), _ptr(sh), _ptr(B), int(bool(rq.get("relu"))), res, zout, exact):
            raise Unsupported("epilogue")
        for key in op["codes"]:
            _, cq, cx, k, d = key
            thr = _i64(quant_thresholds(k, d, cq, cx))
            c = Fraction(2**k, d)
            av = bv = mv = None
            if not exact:
                av = np.array([float(Fraction(int(m)) * c / 2 ** int(s)) for m, s in zip(M, sh, strict=True)])
                bv = np.array([float(Fraction(int(b)) * c) for b in B])
                mv = np.array([_margin_v(c, int(vm), aa, bb) for vm, aa, bb in zip(vmax, av, bv, strict=True)])
                _check(float(mv.max(initial=0)) < _MAX_MARGIN, "estimate margin")
                self._keep += [av, bv, mv]
            me = _margin_exact(c)
            _check(me < _MAX_MARGIN and c <= Fraction(1, 2**12), "estimate margin")  # |Z·c| < 2^52
            self._keep.append(thr)
            rc = lib.aq_plan_codeout(h, opi, bufs[("c", key)][0], cq, cx, _ptr(thr), len(thr), float(c), me,
                                     None if av is None else _dptr(av), None if bv is None else _dptr(bv),
                                     None if mv is None else _dptr(mv))
            if rc:
                raise Unsupported("code output")
            if not exact and len(thr) <= 31:
                if kind == "stem":
                    tabs = _v_tables(thr, M, sh, B, bool(rq.get("relu")), 1, np.zeros(o), -vmax, vmax,
                                     16 if len(thr) <= 15 else 32)
                else:
                    tabs = _v_tables(thr, M, sh, B, bool(rq.get("relu")), -1, -cst, np.zeros(o), vmax - cst,
                                     16 if len(thr) <= 15 else 32)
                self._keep += list(tabs)
                krange = int(vmax.max(initial=0)) if kind == "stem" else int((vmax - cst).max(initial=0))
                if lib.aq_plan_codeout_tables(h, opi, _ptr(tabs[1]), _ptr(tabs[0]), tabs[1].shape[1],
                                              int(krange <= 32766)):
                    raise Unsupported("code tables")
        c, hh, ww, oo, kh, kw, shh, sww, ph, pw, dh, dw, ho, wo = geo[1:]
        self.layers.append({"name": node["name"], "kind": kind, "op": opi, "C": c, "H": hh, "W": ww, "O": oo,
                            "k": (kh, kw), "stride": (shh, sww), "padding": (ph, pw), "dilation": (dh, dw),
                            "HO": ho, "WO": wo, "residual": op["res"] is not None, "relu": bool(rq.get("relu")),
                            "inputs": [int(b) for b in ins] if kind == "adder" else [],
                            "outputs": [bufs[("c", k)][0] for k in op["codes"]] + ([zout] if zout >= 0 else []),
                            "res_buf": res})

    def _emit_tail(self, T, tail, bufs):
        q, fc, rq = tail["quantize"], tail["fc"], tail["requant"]
        a = q["attrs"]
        thr = _i64(quant_thresholds(a["lshift"], a["divisor"], a["qmin"], a["qmax"]))
        w = T[fc["params"]["weight"]]
        wb = np.ascontiguousarray(w.reshape(w.shape[0], -1), dtype=np.int8)
        M, sh, B = (_i64(T[rq["params"][k]]) for k in ("mult", "shift", "bias"))
        self._keep += [thr, wb, M, sh, B]
        if _LIB.aq_plan_tail(self._h, bufs[("z", tail["z"])][0], _ptr(thr), len(thr), int(a["qmin"]), wb.shape[0],
                             _ptr(wb), _ptr(M), _ptr(sh), _ptr(B), int(bool(rq.get("relu")))):
            raise Unsupported("head")

    # ------------------------------------------------------------------------------------ running
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """int64 logits (N, classes) of contiguous uint8 images (N, C, H, W)."""
        out = torch.empty((x.shape[0], self.num_classes), dtype=torch.int64)
        with self._lock:  # the threads' arenas belong to the plan
            rc = _LIB.aq_plan_run(self._h, x.data_ptr(), x.shape[0], out.data_ptr(), torch.get_num_threads())
        if rc == 2:
            raise PlanOverflow("a requantised value left int64")
        if rc:
            raise MemoryError("adderquant._adder_cpu: out of memory")
        return out

    def run_layer(self, layer: dict, n: int, ext: dict[int, tuple[int, int]]) -> None:
        """Run one adder layer on ``n`` images whose buffers ``ext[id] = (address, bytes per image)`` lie
        outside the arena (benchmarks: a batch streamed through memory, as a batched layer would)."""
        bases = (ctypes.c_void_p * max(self.nbuf, 1))()
        strides = (ctypes.c_int64 * max(self.nbuf, 1))()
        for i, (ptr, stride) in ext.items():
            bases[i], strides[i] = ptr, stride
        with self._lock:
            rc = _LIB.aq_plan_run_op(self._h, layer["op"], n, bases, strides, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"aq_plan_run_op: {rc}")

    def buffer_bytes(self, bid: int) -> int:
        return int(_LIB.aq_plan_buf_bytes(self._h, bid))


def compile_plan(graph, steps, in_shape) -> CpuPlan | None:
    """The plan for images of shape ``in_shape`` (C, H, W), or None when the runner does not take the graph."""
    if not available():
        return None
    try:
        return CpuPlan(graph, steps, in_shape)
    except (Unsupported, KeyError, OverflowError, ValueError):
        return None
