"""APoT layers for CNNs (the authors' ``quant_layer.py``) and ``apot_quantize(model, bits)``.

- :class:`QuantConv2d` / :class:`QuantLinear`: drop-ins for ``nn.Conv2d`` / ``nn.Linear``. Parameter
  names follow the authors' checkpoints: ``act_alpha`` on the layer, ``weight_quant.wgt_alpha`` on the
  ``weight_quant`` submodule, so ``load_state_dict`` of an authors' file works after stripping
  ``module.``. Weight path (b bits): ``(w − mean)/std`` (detached statistics, unbiased std), divide by
  ``wgt_alpha``, clamp to [−1, 1], project |·| onto Q(b − 1) (uniform {0, 1} at b = 2), restore the
  sign, multiply by ``wgt_alpha``; the weight gradient is not clipped (as the authors). Activation path:
  divide by ``act_alpha``, clamp above at 1 only, project onto Q(b), multiply by ``act_alpha``; the
  input gradient is zero above the threshold. Both thresholds get the paper's reparameterised gradient
  (:class:`adderquant.quant.apot.APoTQuantize`).
- :class:`FirstLastConv2d` / :class:`FirstLastLinear`: the authors' ``first_conv`` / ``last_fc``:
  weights ``round(w / w.max() · 127) / 127 · w.max()`` with the SIGNED maximum (straight-through
  gradient), bias and activations left in floating point. (With the signed maximum, weights below
  ``−w.max()`` map to codes beyond −127; that is what the authors' checkpoints were trained with.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import tensor_batches
from ..utils import check_bits, hooked, set_submodule
from .apot import BIT_RANGE, act_levels, apot_fake_quant, normalize_weight, weight_levels
from .bn import reestimate_bn

# Model bit widths the APoT layers support: activations use Q(b), weights sign + Q(b − 1).
LAYER_BITS = BIT_RANGE["apot"]
AUTHORS_WGT_ALPHA = 3.0
AUTHORS_ACT_ALPHA = 8.0


def check_layer_bits(bits) -> int:
    """APoT layer widths: activations Q(b), weights sign + Q(b−1); the authors' level sets exist up to Q(6)."""
    return check_bits(bits, *LAYER_BITS, "APoT layer bits")


class WeightQuantizer(nn.Module):
    """The authors' ``weight_quantize_fn``: normalise, then b-bit signed APoT with threshold ``wgt_alpha``."""

    def __init__(self, bits: int, wgt_alpha: float = AUTHORS_WGT_ALPHA):
        super().__init__()
        self.wgt_alpha = nn.Parameter(torch.tensor(float(wgt_alpha)))
        self.set_bits(bits)

    def set_bits(self, bits: int) -> None:
        self.bits = check_layer_bits(bits)
        a = self.wgt_alpha
        self.register_buffer("levels", weight_levels(bits, dtype=a.dtype, device=a.device), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return apot_fake_quant(normalize_weight(weight), self.wgt_alpha, self.levels, signed=True,
                               clip_input_grad=False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class _APoTLayer:
    """Shared state of QuantConv2d / QuantLinear: ``bits``, ``act_alpha``, ``weight_quant``."""

    def _init_apot(self, bits: int, act_alpha: float, wgt_alpha: float) -> None:
        check_layer_bits(bits)
        self.weight_quant = WeightQuantizer(bits, wgt_alpha)
        self.act_alpha = nn.Parameter(torch.tensor(float(act_alpha)))
        self.set_bits(bits)

    def set_bits(self, bits: int) -> None:
        """Change the bit width in place (thresholds and weights kept: progressive QAT's initialisation)."""
        self.bits = check_layer_bits(bits)
        self.weight_quant.set_bits(bits)
        a = self.act_alpha
        self.register_buffer("act_levels", act_levels(bits, dtype=a.dtype, device=a.device), persistent=False)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return apot_fake_quant(x, self.act_alpha, self.act_levels, signed=False, clip_input_grad=True)


class QuantConv2d(_APoTLayer, nn.Conv2d):
    """``nn.Conv2d`` with b-bit APoT weights and activations (inputs expected non-negative)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *, bits: int = 4,
                 act_alpha: float = AUTHORS_ACT_ALPHA, wgt_alpha: float = AUTHORS_WGT_ALPHA):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           bias, padding_mode, device, dtype)
        self._init_apot(bits, act_alpha, wgt_alpha)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int, **alphas) -> QuantConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, bits=bits, **alphas)
        _copy_params(conv, q)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}"


class QuantLinear(_APoTLayer, nn.Linear):
    """``nn.Linear`` with b-bit APoT weights and activations (inputs expected non-negative)."""

    def __init__(self, in_features, out_features, bias: bool = True, device=None, dtype=None, *,
                 bits: int = 4, act_alpha: float = AUTHORS_ACT_ALPHA, wgt_alpha: float = AUTHORS_WGT_ALPHA):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_apot(bits, act_alpha, wgt_alpha)

    @classmethod
    def from_float(cls, fc: nn.Linear, bits: int, **alphas) -> QuantLinear:
        q = cls(fc.in_features, fc.out_features, fc.bias is not None, bits=bits, **alphas)
        _copy_params(fc, q)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}"


def max_quantize_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``round(w / w.max() · n) / n · w.max()``, n = 2^(bits−1) − 1, signed max, straight-through grad."""
    check_bits(bits, 2, 16, "first/last-layer bits")
    top = w.detach().max()
    if top == 0:
        raise ValueError("cannot quantize by w.max(): the largest weight is 0")
    n = 2 ** (bits - 1) - 1
    wq = w.div(top).mul(n).round().div(n).mul(top)
    return (wq - w).detach() + w


class FirstLastConv2d(nn.Conv2d):
    """The authors' ``first_conv``: weights to ``bits`` (8) bits by ``w.max()``, input not quantized."""

    def __init__(self, *args, bits: int = 8, **kw):
        super().__init__(*args, **kw)
        self.bits = bits

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int = 8) -> FirstLastConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, bits=bits)
        _copy_params(conv, q)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, max_quantize_weight(self.weight, self.bits), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits} (by w.max())"


class FirstLastLinear(nn.Linear):
    """The authors' ``last_fc``: weights to ``bits`` (8) bits by ``w.max()``; bias and input float."""

    def __init__(self, *args, bits: int = 8, **kw):
        super().__init__(*args, **kw)
        self.bits = bits

    @classmethod
    def from_float(cls, fc: nn.Linear, bits: int = 8) -> FirstLastLinear:
        q = cls(fc.in_features, fc.out_features, fc.bias is not None, bits=bits)
        _copy_params(fc, q)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, max_quantize_weight(self.weight, self.bits), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits} (by w.max())"


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    w = src.weight
    dst.to(device=w.device, dtype=w.dtype)  # alphas and level buffers follow the layer's device/dtype
    with torch.no_grad():
        dst.weight.copy_(w)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.train(src.training)


APOT_TYPES = (QuantConv2d, QuantLinear, FirstLastConv2d, FirstLastLinear)


def _compute_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def apot_quantize(model: nn.Module, bits: int, calib=None, first_last_bits: int | None = 8, *,
                  layers: Iterable[str] | None = None, max_calib_batches: int = 8,
                  recalibrate_bn: bool = True) -> nn.Module:
    """APoT copy of a CNN (``model`` is left untouched).

    The first and the last ``nn.Conv2d``/``nn.Linear`` (in registration order — the stem and the
    classifier in every registered model) become :class:`FirstLastConv2d`/:class:`FirstLastLinear` at
    ``first_last_bits`` (``None`` keeps them float); every other one becomes :class:`QuantConv2d` /
    :class:`QuantLinear` at ``bits`` (2..6), or only those named in ``layers`` when given.

    Thresholds: without ``calib``, the authors' initial values (``wgt_alpha = 3.0``, ``act_alpha =
    8.0``) — the starting point of their QAT, not a usable post-training model. With ``calib``
    (normalised images: a tensor, or an iterable of tensors / ``(x, y)`` batches), each threshold is
    set from data: the value minimising the layer's quantization MSE (of its normalised weights, and of
    its inputs recorded from the float model on ≤ ``max_calib_batches`` batches) on a grid.

    Weight normalisation changes each layer's output scale by 1/std(w) (×20–60 on a trained ResNet-20),
    so a float model's BatchNorm statistics no longer fit: with ``calib`` and ``recalibrate_bn`` the
    BatchNorm running statistics are re-estimated on the calibration batches (their exact statistics,
    quantized forward) — post-training use. Without it, the model only makes sense after QAT (which is
    how the authors use it: their BatchNorms are trained with normalised weights).
    """
    check_layer_bits(bits)
    if any(type(m).__name__ == "AdderConv2d" for m in model.modules()):
        raise TypeError("apot_quantize is for CNNs; the model has adder layers (use quantize_adder)")
    compute = _compute_layers(model)
    if len(compute) < 2:
        raise ValueError("apot_quantize needs at least two conv/linear layers (first and last stay 8-bit)")
    first, last = compute[0][0], compute[-1][0]
    inner = [n for n, _ in compute[1:-1]]
    chosen = set(inner) if layers is None else set(layers)
    unknown = chosen - set(inner)
    if unknown:
        raise ValueError(f"layers {sorted(unknown)} are not inner conv/linear layers of the model")
    done = sorted(n for n, m in compute if n in chosen and isinstance(m, QuantConv2d | QuantLinear))
    if done:
        raise ValueError(f"layers {done[:4]} are already APoT-quantized (use set_bits to change the width)")

    acts = _record_inputs(model, chosen, calib, max_calib_batches) if calib is not None else {}
    q = copy.deepcopy(model)
    for name, m in _compute_layers(q):
        if name in (first, last):
            if first_last_bits is not None and not isinstance(m, FirstLastConv2d | FirstLastLinear):
                cls = FirstLastConv2d if isinstance(m, nn.Conv2d) else FirstLastLinear
                set_submodule(q, name, cls.from_float(m, first_last_bits))
        elif name in chosen:
            cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
            layer = cls.from_float(m, bits)
            if calib is not None:
                with torch.no_grad():
                    wn = normalize_weight(layer.weight.detach())
                    layer.weight_quant.wgt_alpha.fill_(mse_threshold(wn, layer.weight_quant.levels, True))
                    if name in acts:
                        layer.act_alpha.fill_(mse_threshold(acts[name], layer.act_levels, False))
            set_submodule(q, name, layer)
    if calib is not None and recalibrate_bn:
        _recalibrate_bn(q, calib, max_calib_batches)
    return q


def _recalibrate_bn(model: nn.Module, calib, limit: int) -> None:
    """Re-estimate every BatchNorm's running mean/var on the first ``limit`` calibration batches (exact
    statistics over all of them, no augmentation): :func:`adderquant.quant.bn.reestimate_bn`."""
    reestimate_bn(model, calib, limit, momentum=None, batch_size=256, augment=False, cycle=False)


def mse_threshold(x: torch.Tensor, lv: torch.Tensor, signed: bool, steps: int = 80) -> float:
    """Clipping threshold in (0, max|x|] minimising ``‖x − α·Π(clip(x/α))‖²`` on a ``steps``-point grid."""
    x = x.detach().float().flatten()
    if x.numel() > 1 << 16:  # a fixed random sample keeps the grid search cheap
        x = x[torch.randint(x.numel(), (1 << 16,), generator=torch.Generator().manual_seed(0))]
    top = float(x.abs().max() if signed else x.clamp_min(0).max())
    if not math.isfinite(top) or top <= 0:
        return 1.0
    best, best_err = top, math.inf
    for i in range(1, steps + 1):
        a = top * i / steps
        err = float((apot_fake_quant(x, a, lv, signed=signed) - x).square().sum())
        if err < best_err:
            best, best_err = a, err
    return best


@torch.no_grad()
def _record_inputs(model: nn.Module, names: set[str], calib, limit: int,
                   per_layer: int = 1 << 16) -> dict[str, torch.Tensor]:
    """Inputs of the named layers on the calibration batches (a random sample of ≤ ``per_layer`` values)."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(0)

    def record(name, _module, inputs):
        x = inputs[0].detach().flatten().float().cpu()
        if x.numel() > per_layer // limit:
            x = x[torch.randint(x.numel(), (per_layer // limit,), generator=gen)]
        store[name].append(x)

    device = next(model.parameters()).device
    with hooked(model, {n: m for n, m in model.named_modules() if n in names}, record):
        for x in tensor_batches(calib, limit=limit, device=device):
            model(x)
    return {n: torch.cat(v) for n, v in store.items() if v}


def set_bits(model: nn.Module, bits: int) -> nn.Module:
    """Change every QuantConv2d/QuantLinear of ``model`` to ``bits`` in place (first/last unchanged)."""
    check_layer_bits(bits)
    for m in model.modules():
        if isinstance(m, QuantConv2d | QuantLinear):
            m.set_bits(bits)
    return model


__all__ = ["FirstLastConv2d", "FirstLastLinear", "QuantConv2d", "QuantLinear", "WeightQuantizer",
           "apot_quantize", "max_quantize_weight", "mse_threshold", "set_bits"]
