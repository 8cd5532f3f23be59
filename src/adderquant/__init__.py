"""adderquant: multiplication-free networks (AdderNets) and their low-bit quantization.

    import adderquant
    ck = adderquant.load_checkpoint("addernet-resnet20-cifar10.pth")
    result = adderquant.quantize(ck.model, calib_images, adderquant.QuantConfig.ours(4))
    result.model  # the fake-quantized copy

The names below load on first use, so ``import adderquant.kernels`` (or ``.nn``, ``.models``,
``.data``) does not pull in the quantization, checkpoint or workflow layers above it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "quantize": ("quant", "quantize"),
    "QuantConfig": ("quant", "QuantConfig"),
    "QuantResult": ("quant", "QuantResult"),
    "create_model": ("models", "create"),
    "adderize": ("nn", "adderize"),
    "load_checkpoint": ("checkpoints", "load"),
    "save_checkpoint": ("checkpoints", "save"),
}
_SUBPACKAGES = ("analysis", "checkpoints", "data", "integer", "kernels", "models", "nn", "quant")


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'adderquant' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["QuantConfig", "QuantResult", "__version__", "adderize", "create_model", "load_checkpoint", "quantize",
           "save_checkpoint", *_SUBPACKAGES]
