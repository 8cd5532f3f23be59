"""adderquant: multiplication-free networks (AdderNets) and their low-bit quantization.

    import adderquant
    ck = adderquant.load_checkpoint("addernet-resnet20-cifar10.pth")
    qmodel = adderquant.quantize(ck.model, calib_images, bits=4)
"""

__version__ = "0.1.0"

from . import kernels, models, nn, quant  # noqa: E402
from .models import create as create_model  # noqa: E402
from .models.checkpoint import load as load_checkpoint  # noqa: E402
from .models.checkpoint import save as save_checkpoint  # noqa: E402
from .quant import QuantConfig, quantize  # noqa: E402

__all__ = ["QuantConfig", "__version__", "create_model", "kernels", "load_checkpoint", "models", "nn", "quant",
           "quantize", "save_checkpoint"]
