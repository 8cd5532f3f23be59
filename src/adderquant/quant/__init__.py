"""Quantizers, observers, grouping, PTQ and QAT for AdderNets (and APoT for CNNs)."""

from __future__ import annotations

from torch import nn

from .adder_layer import QuantAdderConv2d
from .config import QuantConfig, preset
from .ptq import calibrate, choose_qssf, quantize_adder
from .qat import QATConfig, qat


def quantize(model: nn.Module, calib, bits: int | None = None, config: QuantConfig | None = None, *,
             method: str | None = None, labels=None, batch_size: int = 256, progress: bool = True) -> nn.Module:
    """Quantized copy of ``model`` calibrated on ``calib`` (normalised images: a tensor or an iterable).

    ``adderquant.quantize(model, calib, bits=4)`` applies the paper's method; ``config`` selects any
    variant (``QuantConfig.qssf("weights")``, ``QuantConfig.apot(4)``, …) and ``method="qssf"`` picks
    the better of the two QSSF variants on the calibration set (by ``labels`` when given).
    """
    if method is not None and config is not None:
        raise ValueError("pass either method= or config=, not both")
    bits = bits if bits is not None else (config.bits if config is not None else 4)
    if method == "qssf":
        return choose_qssf(model, calib, bits, labels=labels, batch_size=batch_size, progress=progress)
    config = preset(method, bits) if method is not None else (config or QuantConfig.paper(bits))
    config = config.with_(bits=bits)
    if config.method == "apot":
        from .apot_layers import apot_quantize

        return apot_quantize(model, config.bits, calib=calib, first_last_bits=config.first_last_bits)
    return quantize_adder(model, calib, config, batch_size=batch_size, progress=progress)


__all__ = ["QATConfig", "QuantAdderConv2d", "QuantConfig", "calibrate", "choose_qssf", "preset", "qat", "quantize",
           "quantize_adder"]
