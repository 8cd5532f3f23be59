"""Layers and autograd: the adder convolution and its quantized relatives."""

from . import functional
from .adder import AdderConv2d
from .adderize import adderize

__all__ = ["AdderConv2d", "adderize", "functional"]
