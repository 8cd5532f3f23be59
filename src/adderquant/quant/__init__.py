"""Quantization only: quantizer maths, quantized layers, observers, grouping, PTQ and QAT for AdderNets,
and APoT for CNNs. ``quantize(model, calib, config)`` is the one entry point; the config's type picks
the workflow (torchao style)."""

from __future__ import annotations

from torch import nn

from .adder_layer import QuantAdderConv2d
from .config import APoTConfig, QuantConfig, preset
from .ptq import QuantResult, calibrate, quantize_adder
from .qat import QATConfig, qat


def quantize(model: nn.Module, calib, config: QuantConfig | APoTConfig | None = None, *, labels=None,
             batch_size: int = 256, progress: bool = False, tensor_images: int = 1024) -> QuantResult:
    """Quantized copy of ``model`` calibrated on ``calib`` (normalised images: a tensor, or an iterable
    of tensors / ``(x, y)`` batches such as a ``DataLoader``); ``model`` itself is left untouched.

    ``config`` defaults to the fast path at 4 bits (``QuantConfig.ours_fast(4)``: seconds);
    ``QuantConfig.ours(b)`` adds learned rounding where it was chosen (the best measured, slower);
    ``QuantConfig.paper(b)``,
    ``QuantConfig.authors(b)``, ``QuantConfig.qssf("best", b)`` (scored on ``labels`` when given) and
    ``APoTConfig(b)`` select the others. Returns a :class:`QuantResult`: ``.model`` is the quantized network.
    An iterable is read once, streaming, in bounded memory; the steps that need the images as one
    tensor use its first ``tensor_images`` (:func:`adderquant.quant.ptq.quantize_adder`).
    """
    config = QuantConfig.ours_fast(4) if config is None else config
    if isinstance(config, APoTConfig):
        from .apot_layers import apot_quantize

        qmodel = apot_quantize(model, config.bits, calib=calib, first_last_bits=config.first_last_bits)
        return QuantResult(qmodel, config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or APoTConfig, got {type(config).__name__}")
    return quantize_adder(model, calib, config, batch_size=batch_size, progress=progress, labels=labels,
                          tensor_images=tensor_images)


__all__ = ["APoTConfig", "QATConfig", "QuantAdderConv2d", "QuantConfig", "QuantResult", "calibrate", "preset",
           "qat", "quantize", "quantize_adder"]
