"""Layers and autograd: the adder convolution and its quantized relatives."""

from . import functional
from .adder import AdderConv2d

__all__ = ["AdderConv2d", "functional"]
