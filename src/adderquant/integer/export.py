"""Write a fake-quantized model as one ``.aqz`` file (layout: ``docs/format.md``)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from safetensors.numpy import save as safetensors_bytes
from torch import nn

from ..quant import QuantResult
from ..utils import atomic_write
from .graph import DEFAULT_FRAC_BITS, IntegerGraph, convert
from .runtime_numpy import pack_aqz


def write_aqz(graph: IntegerGraph, path: str | os.PathLike) -> Path:
    """Serialise ``graph`` (temp file + rename, so a reader never sees half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = pack_aqz(graph.to_json(), safetensors_bytes(graph.tensors, metadata={"format": "adderquant-integer"}))
    return atomic_write(p, lambda tmp: Path(tmp).write_bytes(data))


def export(quantized: QuantResult | nn.Module, path: str | os.PathLike, *, name: str, normalization,
           meta: dict | None = None, input_shape=(3, 32, 32), frac_bits: int = DEFAULT_FRAC_BITS) -> Path:
    """Convert a fake-quantized model (first/last layers quantized too) and write it to ``path``.

    ``quantized`` is what ``adderquant.quantize`` returned (its config is recorded in the file as
    ``quant_config``) or the bare quantized module. ``normalization = (mean, std)`` is the one the float
    model is evaluated with; it is folded into the first layer. ``meta`` (JSON-serialisable) is stored
    under the graph's ``meta`` with ``name``.
    """
    info = {"name": name}
    qmodel = quantized
    if isinstance(quantized, QuantResult):
        qmodel = quantized.model
        info["quant_config"] = asdict(quantized.config)
    info.update(meta or {})
    graph = convert(qmodel, normalization, input_shape=input_shape, frac_bits=frac_bits, meta=info)
    return write_aqz(graph, path)
