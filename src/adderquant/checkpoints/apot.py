"""Importer for the APoT authors' CIFAR ResNet checkpoints (``apot-resnet20-cifar10-{fp32,4bit}.pth.tar``).

Registered as ``"apot"`` by the ``adderquant.checkpoints`` package ``__init__`` (after the official
AdderNet importer), so ``checkpoints.load`` always knows the format.

Detection (the state_dict after the loader has stripped ``module.``):

- quantized files: any ``*.act_alpha`` / ``*.wgt_alpha`` key. The bit width is not stored; the caller
  must pass it (``bits=`` / ``--bits``) — the same weights and thresholds are served at any of 2..6
  bits. Every conv carrying alphas becomes a :class:`QuantConv2d` (in the 4-bit file that includes the
  1×1 down-sampling convs ``layerN.0.downsample.0``); convs without alphas stay float.
- the fp32 file: a conventional CIFAR ResNet — ``conv1.weight`` and ``layer1.0.conv1.weight`` 4-D,
  ``fc.weight`` 2-D with ``fc.bias``, no ``.adder`` keys, no ``layer4``. The APoT authors' fp32 model
  still quantizes its first conv and last fc to 8 bits by ``w.max()``, so it is imported that way with
  float inner layers (``bits`` omitted or 32). With ``bits`` 2..6 it is turned into an APoT model with
  the authors' initial thresholds (3.0 / 8.0): the start of their QAT, not an accurate model — a
  warning says so. NOTE: any plain state_dict of such a ResNet matches this pattern; pass
  ``format="state_dict"`` (any value other than ``"apot"``) in the loader options to skip this importer.

Normalisation: ``CIFAR_APOT_NORM`` from ``adderquant.data.normalization`` (the authors' training script:
mean (0.491, 0.482, 0.447), std (0.247, 0.243, 0.262)), unless the options give ``normalization``.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from ..data.normalization import CIFAR_APOT_NORM  # ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))
from ..models import REGISTRY, create
from ..quant.apot_layers import LAYER_BITS, apot_quantize
from ..utils import check_bits
from .core import Checkpoint, load_into

ALPHA_SUFFIXES = (".act_alpha", ".weight_quant.wgt_alpha")


class APoTBitsMissing(ValueError):
    """A quantized APoT checkpoint loaded without its bit width (the file does not store it)."""


def _is_conventional_cifar_resnet(state: dict) -> bool:
    def dims(key):
        v = state.get(key)
        return None if v is None else v.dim()

    return (dims("conv1.weight") == 4 and dims("layer1.0.conv1.weight") == 4 and dims("fc.weight") == 2
            and "fc.bias" in state and not any(k.endswith(".adder") for k in state)
            and not any(k.startswith("layer4.") for k in state))


def _depth(state: dict) -> int:
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.", k))}
    return 6 * len(blocks) + 2


def _check_bits(bits) -> int | None:
    """``None`` for the fp32 file (``bits`` omitted or 32), else ``bits`` checked against 2..6."""
    if bits is None or bits == 32:
        return None
    return check_bits(bits, *LAYER_BITS, what="APoT checkpoint: bits (or 32 for the fp32 file)")


def import_apot(state: dict, name: str | None, options: dict) -> Checkpoint | None:
    """The ``"apot"`` importer: a :class:`Checkpoint` for the authors' files, ``None`` for anything else."""
    if options.get("format", "apot") != "apot":
        return None
    has_alphas = any(k.endswith(ALPHA_SUFFIXES) for k in state)
    if not _is_conventional_cifar_resnet({k: v for k, v in state.items() if not k.endswith(ALPHA_SUFFIXES)}):
        if has_alphas:
            raise ValueError("checkpoint has APoT clipping thresholds (act_alpha / wgt_alpha) but is not a "
                             "conventional CIFAR ResNet with a Linear fc: unsupported APoT architecture")
        return None
    bits = _check_bits(options.get("bits"))
    if has_alphas and bits is None:
        raise APoTBitsMissing("this is a quantized APoT checkpoint (it has act_alpha / wgt_alpha) but its bit "
                         "width is not stored in the file: pass it with --bits (bits=2..6; the authors' "
                         "file is 4-bit)")
    name = name or f"resnet{_depth(state)}"
    if name not in REGISTRY:
        raise ValueError(f"APoT checkpoint looks like {name!r}, which is not a registered model")
    num_classes = state["fc.weight"].shape[0]
    model = create(name, num_classes=num_classes, kind="conv", head="linear")
    quantized = sorted(k[: -len(".act_alpha")] for k in state if k.endswith(".act_alpha"))
    if has_alphas:
        model = apot_quantize(model, bits, layers=quantized)
        fmt_bits = bits
    elif bits is not None:
        warnings.warn(f"fp32 APoT checkpoint imported at {bits} bits: its clipping thresholds are the "
                      "authors' initial values (wgt_alpha 3.0, act_alpha 8.0), not trained — a starting "
                      "point for QAT, not an accurate model", stacklevel=2)
        model = apot_quantize(model, bits)
        fmt_bits = bits
    else:
        model = apot_quantize(model, 2, layers=())  # first/last 8-bit only; inner layers stay float
        fmt_bits = 32
    load_into(model, _fill_missing_alphas(model, state), "APoT checkpoint")
    model.eval()
    norm = options.get("normalization") or CIFAR_APOT_NORM
    meta = {"bits": fmt_bits, "quantized_layers": quantized, "first_last_bits": 8}
    return Checkpoint(model, name, "conv", num_classes, norm, "apot", meta)


def _fill_missing_alphas(model: nn.Module, state: dict) -> dict:
    """The fp32 file imported at b bits has no thresholds: keep the model's initial ones."""
    own = model.state_dict()
    return {**{k: v for k, v in own.items() if k.endswith(ALPHA_SUFFIXES) and k not in state}, **state}


__all__ = ["APoTBitsMissing", "CIFAR_APOT_NORM", "import_apot"]
