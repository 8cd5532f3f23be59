"""Integer-only inference of quantized AdderNets, bit-exact between the PyTorch engine and the NumPy runtime.

``convert`` turns a fake-quantized model into an :class:`IntegerGraph`; :class:`IntegerEngine` runs it
with torch integer tensors; ``export`` writes it as one ``.aqz`` file that ``runtime_numpy`` (NumPy
only, loadable without torch: see :func:`runtime_path`) executes. Format and semantics:
``docs/format.md``.
"""

from __future__ import annotations

from pathlib import Path

from .engine import IntegerEngine
from .export import export, write_aqz
from .graph import IntegerGraph, convert, fixed_multiplier
from .runtime_numpy import AQZ, NumpyRuntime, evaluate_aqz, load_aqz


def runtime_path() -> Path:
    """The standalone runtime's source file: copy it next to an ``.aqz`` file to deploy without torch."""
    return Path(__file__).with_name("runtime_numpy.py")


__all__ = ["AQZ", "IntegerEngine", "IntegerGraph", "NumpyRuntime", "convert", "evaluate_aqz", "export",
           "fixed_multiplier", "load_aqz", "runtime_path", "write_aqz"]
