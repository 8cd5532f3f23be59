"""Torch-free runtime for ``.aqz`` integer AdderNets: NumPy and the standard library only.

This file is self-contained on purpose (no package-relative imports): a deployment copies it next
to the ``.aqz`` file and loads it by path, without PyTorch and without the rest of ``adderquant``
(whose ``__init__`` imports torch)::

    import importlib.util
    spec = importlib.util.spec_from_file_location("aq_runtime", "runtime_numpy.py")
    rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
    logits = rt.NumpyRuntime("model.aqz").logits(images_uint8_nchw)     # int64, unit 2^-frac_bits

or runs it as a script: ``python runtime_numpy.py model.aqz data.npz``. Where torch is installed,
``adderquant.integer.runtime_numpy`` is the same module. The format and the exact semantics of every
node are specified in ``docs/format.md``; the PyTorch engine (``adderquant.integer.engine``)
implements the same semantics and the tests hold both to identical logits.

Every node computes on integers. One kernel uses IEEE float arithmetic purely as an exact integer
accumulator: the 8-bit convolution/linear layer (a float64 GEMM of integers: every product and partial
sum is an integer below 2^53, so the result is exact whatever the summation order).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

MAGIC = b"\x89AQZ\r\n\x1a\n"
FORMAT_VERSION = 2  # the newest this runtime reads; 1 (no grouped layers) still loads, and is still written
GROUPED_VERSION = 2  # the first version whose `adder`/`conv` nodes may carry attrs.groups (grouped/depthwise)
# magic (8 bytes) | format version u32 | flags u32 | payload length u64 | SHA-256 of the payload (32 bytes)
HEADER = struct.Struct("<8sIIQ32s")
HEADER_SIZE = HEADER.size  # 56
GRAPH_FORMAT = "adderquant-integer-graph"
MAX_SAFETENSORS_HEADER = 100 * 2**20

_ST_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
              "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "F16": np.float16, "F32": np.float32,
              "F64": np.float64}
_INT64_LIMIT = 2**62  # |value · multiplier| must stay below this (checked before every multiply)


# ---------------------------------------------------------------------------------------------- file


class AQZ:
    """A parsed ``.aqz`` file: the JSON graph (a dict) and its tensors (read-only NumPy arrays)."""

    def __init__(self, graph: dict, tensors: dict[str, np.ndarray]):
        self.graph, self.tensors = graph, tensors

    @property
    def meta(self) -> dict:
        return self.graph.get("meta", {})


def required_version(graph: dict) -> int:
    """The oldest format version that describes ``graph``: 2 when a node is grouped (``attrs.groups`` ≠ 1),
    else 1 — so a file without grouped layers stays readable by a version-1 runtime."""
    grouped = any(int(n.get("attrs", {}).get("groups", 1)) != 1 for n in graph.get("nodes", []))
    return GROUPED_VERSION if grouped else 1


def pack_aqz(graph: dict, safetensors_bytes: bytes) -> bytes:
    """The whole ``.aqz`` file for a graph and its tensors already serialised as safetensors."""
    graph_bytes = json.dumps(graph, sort_keys=True, separators=(",", ":")).encode("utf-8")
    payload = struct.pack("<Q", len(graph_bytes)) + graph_bytes + safetensors_bytes
    version = required_version(graph)
    return HEADER.pack(MAGIC, version, 0, len(payload), hashlib.sha256(payload).digest()) + payload


def parse_aqz(data: bytes, source: str = "<bytes>") -> AQZ:
    """Verify and parse the bytes of an ``.aqz`` file; ``ValueError`` names the check that failed."""
    data = memoryview(data)
    if len(data) < HEADER_SIZE:
        raise ValueError(f"{source}: truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, flags, length, digest = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        one_off = sum(a != b for a, b in zip(bytes(magic), MAGIC, strict=True)) == 1
        raise ValueError(f"{source}: bad magic bytes {bytes(magic)!r}: "
                         + ("one byte off an .aqz file's, so its header is damaged" if one_off else "not an .aqz file"))
    # The header has no checksum of its own, but the payload does: when the payload is intact and this
    # runtime reads its graph, a version, flags or length field that disagrees is a damaged header —
    # reported as such, not as a format this runtime lacks or a truncated file.
    payload = data[HEADER_SIZE:]
    intact = hashlib.sha256(payload).digest() == digest
    damaged = f"{source}: corrupted header (its payload is intact: the SHA-256 matches): "
    if not 1 <= version <= FORMAT_VERSION:
        readable = _readable_version(payload) if intact else None
        if readable is not None:
            raise ValueError(damaged + f"the version field reads {version}, but the graph is a version-{readable} "
                             f"document, which this runtime reads (1–{FORMAT_VERSION})")
        if intact and 0 < version <= FORMAT_VERSION + 16:  # plausibly a real, newer format
            raise ValueError(f"{source}: unsupported format version {version} (this runtime reads 1–{FORMAT_VERSION})")
        raise ValueError(f"{source}: corrupted file: its version field reads {version} and the payload's SHA-256 "
                         "does not match the header's" if not intact else
                         f"{source}: corrupted header: its version field reads {version}")
    if flags != 0:
        raise ValueError(damaged + f"the flags field reads {flags:#x}, and no flags are defined" if intact else
                         f"{source}: corrupted file: unknown header flags {flags:#x} and a payload checksum mismatch")
    actual = len(data) - HEADER_SIZE
    if actual != length and intact:
        raise ValueError(damaged + f"the length field reads {length}, the payload holds {actual} bytes")
    if actual < length:
        raise ValueError(f"{source}: truncated: header declares a {length}-byte payload, file holds {actual}")
    if actual > length:
        raise ValueError(f"{source}: length mismatch: header declares a {length}-byte payload, file holds {actual}")
    if not intact:
        raise ValueError(f"{source}: checksum mismatch: the payload's SHA-256 differs from the header's (corrupted)")
    if length < 8:
        raise ValueError(f"{source}: payload too short for the graph length field")
    (graph_len,) = struct.unpack_from("<Q", payload, 0)
    if 8 + graph_len > length:
        raise ValueError(f"{source}: graph length {graph_len} runs past the payload")
    try:
        graph = json.loads(bytes(payload[8 : 8 + graph_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: graph JSON is invalid: {err}") from err
    if not isinstance(graph, dict) or graph.get("format") != GRAPH_FORMAT:
        raise ValueError(f"{source}: graph is not an {GRAPH_FORMAT!r} document")
    if required_version(graph) > version:
        raise ValueError(f"{source}: format version {version} file holds grouped layers (attrs.groups), which "
                         f"need version {GROUPED_VERSION}")
    tensors = read_safetensors(bytes(payload[8 + graph_len :]), source)
    missing = sorted({name for node in graph["nodes"] for name in node.get("params", {}).values()} - set(tensors))
    if missing:
        raise ValueError(f"{source}: graph refers to tensors absent from the file: {missing[:5]}")
    return AQZ(graph, tensors)


def _readable_version(payload) -> int | None:
    """The format version an (intact) payload's graph needs when this runtime reads it, else None:
    the graph parses, is an adderquant integer graph, declares no ``format_version`` beyond this
    runtime's, and needs no feature newer than it (:func:`required_version`)."""
    try:
        (graph_len,) = struct.unpack_from("<Q", payload, 0)
        graph = json.loads(bytes(payload[8 : 8 + graph_len]).decode("utf-8"))
        if not isinstance(graph, dict) or graph.get("format") != GRAPH_FORMAT:
            return None
        needed = max(required_version(graph), int(graph.get("format_version", 1)))
    except (struct.error, UnicodeDecodeError, ValueError, TypeError, AttributeError):
        return None
    return needed if needed <= FORMAT_VERSION else None


def load_aqz(path) -> AQZ:
    """Read and verify an ``.aqz`` file (magic, version, payload length, SHA-256), then parse it."""
    p = Path(path)
    return parse_aqz(p.read_bytes(), str(p))


def read_safetensors(buf: bytes, source: str = "<bytes>") -> dict[str, np.ndarray]:
    """Parse safetensors bytes: u64 little-endian header length N, N bytes of JSON, then the raw data."""
    if len(buf) < 8:
        raise ValueError(f"{source}: safetensors section truncated")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > min(len(buf) - 8, MAX_SAFETENSORS_HEADER):
        raise ValueError(f"{source}: safetensors header length {n} is invalid")
    header = json.loads(buf[8 : 8 + n].decode("utf-8"))
    data = memoryview(buf)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{source}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        dt = np.dtype(dtype).newbyteorder("<")
        if not 0 <= start <= end <= len(data) or end - start != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise ValueError(f"{source}: tensor {name!r} has inconsistent offsets {start}..{end}")
        out[name] = np.frombuffer(data[start:end], dtype=dt).reshape(shape)
    return out


# ------------------------------------------------------------------------------------- arithmetic


def _check_range(v: np.ndarray, mult: np.ndarray, what: str) -> None:
    m = int(np.abs(mult).max()) if mult.size else 0
    if m and v.size and max(-int(v.min()), int(v.max())) > _INT64_LIMIT // m:
        raise OverflowError(f"{what}: |value| {int(np.abs(v).max())} times multiplier {m} leaves int64")


def requant(v: np.ndarray, mult: np.ndarray, shift: np.ndarray, bias: np.ndarray, what: str = "requant"):
    """``floor((v·M + 2^(sh−1)) / 2^sh) + C``: the product rounded half up, then the integer bias (int64)."""
    _check_range(v, mult, what)
    return ((v.astype(np.int64) * mult + ((np.int64(1) << shift) >> 1)) >> shift) + bias


def round_div(n: int, d: int) -> int:
    """``round(n / d)`` for Python integers (d > 0), ties to even — the rounding of ``torch.round``."""
    q, r = divmod(n, d)
    return q + (2 * r > d or (2 * r == d and q % 2 == 1))


def div_round(z: np.ndarray, lshift, divisor) -> np.ndarray:
    """``round(z·2^lshift / divisor)`` with ties to even, exactly (int64 floor division and remainder)."""
    lshift, divisor = np.int64(lshift), np.int64(divisor)
    if lshift:
        _check_range(z, np.array([1 << int(lshift)]), "quantize")
        z = z << lshift
    q = np.floor_divide(z, divisor)
    r2 = 2 * (z - q * divisor)  # twice the remainder, in [0, 2·divisor)
    return q + ((r2 > divisor) | ((r2 == divisor) & ((q & 1) == 1)))


def quant_thresholds(lshift: int, divisor: int, qmin: int, qmax: int) -> np.ndarray:
    """``T_k`` (k = qmin+1 … qmax): the least Z with ``round(Z·2^lshift / divisor) ≥ k``.

    ``clamp(round(Z·2^lshift / divisor), qmin, qmax) = qmin + #{k : T_k ≤ Z}`` exactly, because the
    rounding is monotone in Z; a binary search in T replaces the division when only the clamped value
    is needed."""
    out = []
    for k in range(qmin + 1, qmax + 1):
        z = (((2 * k - 1) * divisor) >> (lshift + 1)) - 2  # strictly below the threshold
        while round_div(z << lshift, divisor) < k:
            z += 1
        out.append(z)
    if out and max(abs(out[0]), abs(out[-1])) >= _INT64_LIMIT:
        raise OverflowError(f"quantization thresholds for divisor {divisor} leave int64")
    return np.array(out, dtype=np.int64)


def quantize_clamped(z: np.ndarray, thresholds: np.ndarray, qmin: int) -> np.ndarray:
    return qmin + np.searchsorted(thresholds, z, side="right").astype(np.int64)


def _channel(t: np.ndarray, ndim: int) -> np.ndarray:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length along one axis (this file's own copy of ``adderquant.utils.conv_output_size``:
    the runtime must import nothing but NumPy)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _im2col(x: np.ndarray, kernel, stride, padding, dilation) -> tuple[np.ndarray, int, int]:
    """(N, C, H, W) -> (N·Ho·Wo, C·kh·kw) in the weight's (C, kh, kw) order; padding is a real zero."""
    n, c, h, w = x.shape
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    cols = np.empty((n, ho, wo, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * ho * wo, c * kh * kw), ho, wo


def _rows_to_nchw(y: np.ndarray, n: int, ho: int, wo: int) -> np.ndarray:
    return np.ascontiguousarray(y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2))


def conv_int(x: np.ndarray, w: np.ndarray, stride, padding, dilation) -> np.ndarray:
    """``Σ x·w`` over each window, exact int64 (float64 GEMM of integers: all partial sums < 2^53)."""
    cols, ho, wo = _im2col(x.astype(np.float64), w.shape[2:], stride, padding, dilation)
    y = cols @ w.reshape(w.shape[0], -1).T.astype(np.float64)
    return _rows_to_nchw(y, x.shape[0], ho, wo).astype(np.int64)


_CHUNK_ELEMS = 2**22


def adder_int(x: np.ndarray, w: np.ndarray, stride, padding, dilation, qmin: int, qmax: int) -> np.ndarray:
    """``acc = −Σ|x − w|`` over each window (padding contributes |0 − w|), exact int64.

    Activations lie in [qmin, qmax] (0 included), weights there too except on the double-step grid
    (2·w_q); the differences are taken in the narrowest integer type that holds them (int8 up to 7
    bits, int16 beyond) and summed in int64.
    """
    n, o = x.shape[0], w.shape[0]
    lo, hi = (min(qmin, int(w.min())), max(qmax, int(w.max()))) if w.size else (qmin, qmax)
    narrow = np.int8 if hi - lo <= 127 else np.int16
    cols, ho, wo = _im2col(x.astype(narrow), w.shape[2:], stride, padding, dilation)
    wf = w.reshape(o, -1).astype(narrow)
    k = wf.shape[1]
    out = np.empty((cols.shape[0], o), dtype=np.int64)
    step = max(1, _CHUNK_ELEMS // (k * o))
    for r in range(0, cols.shape[0], step):
        c = cols[r : r + step]
        out[r : r + step] = -np.abs(c[:, None, :] - wf[None, :, :]).sum(2, dtype=np.int64)
    return _rows_to_nchw(out, n, ho, wo)


def box_sum(v: np.ndarray, kernel, stride, padding, dilation) -> np.ndarray:
    """Σ over every input channel and each window (zero padding), int64."""
    s = v.sum(1, keepdims=True, dtype=np.int64)
    cols, ho, wo = _im2col(s, kernel, stride, padding, dilation)
    return _rows_to_nchw(cols.sum(1, dtype=np.int64)[:, None], v.shape[0], ho, wo)


def max_pool(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """Max over windows; padding never wins (it is the dtype's minimum)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=np.iinfo(x.dtype).min)
    ho, wo = _out_size(h, kh, sh, ph), _out_size(w, kw, sw, pw)
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            out = patch.copy() if out is None else np.maximum(out, patch)
    return out


# ------------------------------------------------------------------------------------------- nodes


def _pairs(attrs: dict, *names):
    return [tuple(attrs[n]) for n in names]


def _op_lut(node, t, x):
    table = t["table"].astype(np.int64)
    return np.stack([table[c][x[:, c]] for c in range(x.shape[1])], axis=1)


def _op_quantize(node, t, x):
    a = node["attrs"]
    return quantize_clamped(x, quant_thresholds(a["lshift"], a["divisor"], a["qmin"], a["qmax"]), a["qmin"])


def _op_conv(node, t, x):
    geo, groups = _pairs(node["attrs"], "stride", "padding", "dilation"), int(node["attrs"].get("groups", 1))
    w = t["weight"]
    if groups == 1:
        return conv_int(x, w, *geo)
    cg, og = x.shape[1] // groups, w.shape[0] // groups  # grouped: one convolution per channel group
    return np.concatenate([conv_int(x[:, g * cg : (g + 1) * cg], w[g * og : (g + 1) * og], *geo)
                           for g in range(groups)], axis=1)


def _grouped_adder_int(xq, excess, w, idx, groups: int, geo, qmin: int, qmax: int) -> np.ndarray:
    """A grouped adder layer's accumulators of the output channels ``idx``: per conv group holding some of
    them, ``adder_int`` on that group's input channels (minus their box sum of ``excess``, when given)."""
    cg, owner = xq.shape[1] // groups, idx // (w.shape[0] // groups)
    out = None
    for g in np.unique(owner):
        sel = np.nonzero(owner == g)[0]
        acc = adder_int(xq[:, g * cg : (g + 1) * cg], w[idx[sel]], *geo, qmin, qmax)
        if excess is not None:
            acc = acc - box_sum(excess[:, g * cg : (g + 1) * cg], w.shape[2:], *geo)
        if out is None:
            out = np.empty((xq.shape[0], idx.size) + acc.shape[2:], dtype=np.int64)
        out[:, sel] = acc
    return out


def _op_linear(node, t, x):
    return (x.astype(np.float64) @ t["weight"].T.astype(np.float64)).astype(np.int64)


def _op_adder(node, t, x):
    a = node["attrs"]
    geo = _pairs(a, "stride", "padding", "dilation")
    w, group_of, lshift, divisor = t["weight"], t["group_of"], t["lshift"], t["divisor"]
    out = None
    cache = {}
    for g in range(len(divisor)):
        idx = np.nonzero(group_of == g)[0]
        if idx.size == 0:
            continue
        key = (int(lshift[g]), int(divisor[g]))  # groups often share a scale: quantize once
        if key not in cache:
            if a["lossless_act_clamp"]:  # the unclamped value is needed for the excess
                wide = div_round(x, *key)
                cache = {key: (wide, np.clip(wide, a["qmin"], a["qmax"]))}
            else:
                cache = {key: (None, quantize_clamped(x, quant_thresholds(*key, a["qmin"], a["qmax"]), a["qmin"]))}
        wide, xq = cache[key]
        excess = np.maximum(wide - a["qmax"], 0) + np.maximum(a["qmin"] - wide, 0) if a["lossless_act_clamp"] else None
        if int(a.get("groups", 1)) != 1:  # grouped (format version 2): each conv group on its own channels
            acc = _grouped_adder_int(xq, excess, w, idx, int(a["groups"]), geo, a["qmin"], a["qmax"])
        else:
            acc = adder_int(xq, w[idx], *geo, a["qmin"], a["qmax"])
            if excess is not None:
                acc = acc - box_sum(excess, w.shape[2:], *geo)
        if out is None:
            out = np.empty((x.shape[0], w.shape[0]) + acc.shape[2:], dtype=np.int64)
        out[:, idx] = acc
    return out


def _op_requant(node, t, x):
    return requant(x, *(_channel(t[k].astype(np.int64), x.ndim) for k in ("mult", "shift", "bias")), node["name"])


def _op_relu(node, t, x):
    return np.maximum(x, 0)


def _op_add(node, t, a, b):
    return a + b


def _op_maxpool(node, t, x):
    return max_pool(x, *_pairs(node["attrs"], "kernel", "stride", "padding"))


def _op_global_sum(node, t, x):
    return x.sum((2, 3), keepdims=True, dtype=np.int64)


def _op_flatten(node, t, x):
    return x.reshape(x.shape[0], -1)


OPS = {"lut": _op_lut, "quantize": _op_quantize, "conv": _op_conv, "linear": _op_linear, "adder": _op_adder,
       "requant": _op_requant, "relu": _op_relu, "add": _op_add, "maxpool": _op_maxpool,
       "global_sum": _op_global_sum, "flatten": _op_flatten}


# ----------------------------------------------------------------------------------------- runtime


class NumpyRuntime:
    """Executes an ``.aqz`` graph on uint8 NCHW images; ``logits`` are int64 on the 2^-frac_bits grid."""

    def __init__(self, model):
        self.model = model if isinstance(model, AQZ) else load_aqz(model)
        g = self.model.graph
        unknown = sorted({n["op"] for n in g["nodes"]} - set(OPS))
        if unknown:
            raise ValueError(f"graph uses ops this runtime does not know: {unknown}")
        self.frac_bits = int(g["output"]["frac_bits"])
        self._params = [{k: self.model.tensors[v] for k, v in n.get("params", {}).items()} for n in g["nodes"]]

    @property
    def meta(self) -> dict:
        return self.model.meta

    def logits(self, x: np.ndarray) -> np.ndarray:
        g = self.model.graph
        x = np.asarray(x)
        spec = g["input"]
        if x.dtype != np.dtype(spec["dtype"]):
            raise TypeError(f"the integer runtime takes {spec['dtype']} input, got {x.dtype}")
        if x.ndim != len(spec["shape"]) or any(d is not None and d != n for d, n in zip(spec["shape"][1:], x.shape[1:],
                                                                                        strict=True)):
            raise ValueError(f"input of shape {x.shape}, the model takes {spec['shape']} (None: any)")
        env = {spec["name"]: x}
        last_use = {}
        for i, node in enumerate(g["nodes"]):
            for name in node["inputs"]:
                last_use[name] = i
        for i, (node, params) in enumerate(zip(g["nodes"], self._params, strict=True)):
            env[node["output"]] = OPS[node["op"]](node, params, *(env[name] for name in node["inputs"]))
            for name in node["inputs"]:
                if last_use[name] == i and name != g["output"]["name"]:
                    env.pop(name, None)
        return env[g["output"]["name"]]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(1)


def topk_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Top-k classes per row, ties broken towards the lower class index (as ``argmax``)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def evaluate_aqz(path, x_uint8_nchw: np.ndarray, y: np.ndarray, batch_size: int = 500, *,
                 return_predictions: bool = False) -> dict:
    """Top-1/top-5 accuracy (percent) of an ``.aqz`` model on uint8 NCHW images with labels ``y``.

    ``path`` is the file (run by :class:`NumpyRuntime`) or any loaded runner with a
    ``logits(uint8 array) -> int64 array`` method (``NumpyRuntime``, ``IntegerEngine``).

    Returns ``{"top1", "top5", "n", "seconds"}`` (JSON-ready); ``return_predictions`` adds the top-1
    class of every image as ``"predictions"`` (an int64 array)."""
    rt = path if hasattr(path, "logits") else NumpyRuntime(path)
    x, y = np.asarray(x_uint8_nchw), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"evaluate_aqz: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise ValueError("evaluate_aqz: no images")
    correct1 = correct5 = 0
    preds = []
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        logits = rt.logits(x[i : i + batch_size])
        top = topk_indices(logits, min(5, logits.shape[1]))
        hits = top == y[i : i + batch_size, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(1).sum())
        preds.append(top[:, 0])
    seconds = time.perf_counter() - start
    n = len(y)
    result = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n, "seconds": seconds}
    if return_predictions:
        result["predictions"] = np.concatenate(preds)
    return result


def _load_images(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as d:
        key = "x_test" if "x_test" in d else "x"
        x, y = d[key], d["y_test" if key == "x_test" else "y"]
    if x.ndim == 4 and x.shape[-1] == 3:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x, y.astype(np.int64)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python runtime_numpy.py MODEL.aqz IMAGES.npz   (x/y or x_test/y_test, uint8 NHWC or NCHW)")
        return 2
    x, y = _load_images(args[1])
    print(json.dumps(evaluate_aqz(args[0], x, y)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
