"""adderquant: multiplication-free networks (AdderNets) and their low-bit quantization."""

__version__ = "0.1.0"

from . import kernels, nn  # noqa: E402

__all__ = ["kernels", "nn", "__version__"]
