"""Post-training quantization of AdderNets (paper Sec. 3) and the QSSF baseline.

``quantize_adder`` calibrates on full-precision activations, then replaces every ``AdderConv2d`` with a
``QuantAdderConv2d`` whose groups, ranges and clamp bias follow the ``QuantConfig``; it returns a
:class:`QuantResult` (the model plus what was decided on the way), never attributes on the module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import calibration_tensor, tensor_batches
from ..nn import AdderConv2d
from ..utils import hooked, set_submodule
from .adder_layer import QuantAdderConv2d
from .bn import correct_bn, reestimate_bn
from .config import QSSF_OVERRIDES, QuantConfig
from .first_last import QuantFirstLast
from .grouping import group_channels
from .observers import AbsRangeObserver
from .rounding import learn_rounding
from .uniform import int_range, scale_for_range


@dataclass
class QuantResult:
    """What ``quantize`` returns: the quantized copy and the facts of how it was made."""

    model: nn.Module
    config: QuantConfig  # as applied (for QSSF 'best': the winning variant)
    layers: dict[str, dict] = field(default_factory=dict)  # per adder layer: r_x, signed, group ranges …
    calibration_scores: dict[str, float] | None = None  # QSSF 'best': each variant's calibration score
    rounding: dict[str, dict] | None = None  # learned_rounding: per block, errors and codes changed


def first_last_names(model: nn.Module) -> list[str]:
    """Names of the conventional first and last layers (stem conv and classifier)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [names[0], names[-1]] if names else []


def check_finite(calib) -> None:
    """ValueError when calibration images (a tensor) hold NaN or ±inf; other iterables are checked
    batch by batch where they are read."""
    if isinstance(calib, torch.Tensor) and calib.is_floating_point() and not bool(torch.isfinite(calib).all()):
        bad = int((~torch.isfinite(calib)).sum())
        raise ValueError(f"calibration data holds {bad} NaN/inf value(s)")


@torch.no_grad()
def calibrate(model: nn.Module, calib, config: QuantConfig, batch_size: int = 256,
              progress: bool = False, min_alpha: float | None = None) -> dict[str, AbsRangeObserver]:
    """Observe |input| of every adder layer (and first/last layer) on the full-precision model.

    The observers answer any α ≥ ``min_alpha`` (default ``config.alpha``), so one calibration pass
    serves a whole sweep of configurations.
    """
    targets = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
    if config.quantize_first_last:
        targets.update({n: model.get_submodule(n) for n in first_last_names(model)})
    check_finite(calib)
    total = calib.shape[0] if isinstance(calib, torch.Tensor) else None
    batch_alpha = config.alpha if config.act_clamp_mode == "batch_max" else None
    if batch_alpha is not None:  # the authors' per-batch statistic: batches of act_batch_size images
        batch_size = config.act_batch_size
    observers = {n: AbsRangeObserver(min(config.alpha, min_alpha or 1.0), batch_alpha=batch_alpha) for n in targets}
    batches = list(tensor_batches(calib, batch_size))
    if not isinstance(calib, torch.Tensor):  # an iterable's batches, before any work
        for xb in batches:
            check_finite(xb)

    def observe(name, _module, inputs):
        x = inputs[0]
        if total is not None and observers[name].total is None:
            observers[name].total = x[0].numel() * total
        observers[name].observe(x)

    with hooked(model, targets, observe):
        for xb in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
            model(xb)
    return observers


def check_adder_model(model: nn.Module, config: QuantConfig) -> None:
    """Refuse, before any work, a model this quantizer would return unchanged or quantize other than asked."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adders = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
    if not adders:
        raise ValueError(f"{type(model).__name__} has no adder layers (AdderConv2d) to quantize; "
                         "for a CNN use APoTConfig")
    name, fewest = min(adders.items(), key=lambda kv: kv[1].out_channels)
    if config.groups > fewest.out_channels:
        raise ValueError(f"groups={config.groups} but adder layer {name} has only {fewest.out_channels} "
                         "output channels")


def layer_parameters(weight: torch.Tensor, r_x: float, config: QuantConfig, signed: bool = True):
    """Groups, per-group shared ranges and the clamp bias for one adder layer (Sec. 3.1–3.2).

    The weight clamp folds ``-Σ dist(W_c, [q_n·s_j, q_p·s_j])`` into the bias: Theorem 1 for the
    interval the quantized activations actually occupy. The paper's literal ``[-r_x, r_x]`` is not
    representable (``q_p·s = r_x·(1 − 1/(2^b−1))``), and rounding the clamped weights back inside
    would leave a per-channel constant error that BatchNorm amplifies (see docs/quantization.md).
    """
    w = weight.detach().to(torch.float64)
    group_of = group_channels(w, config.groups, config.group_feature)
    ranges = []
    for j in range(int(group_of.max()) + 1):
        r_w = float(w[group_of == j].abs().max())
        r = {"min": min(r_w, r_x), "weights": r_w, "activations": r_x}[config.scale_source]
        ranges.append(max(r, 1e-8))
    ranges = torch.tensor(ranges, dtype=torch.float32)  # the layer's buffer: scales derive from it
    clamp_bias = None
    if config.weight_clamp:
        qn, qp = int_range(config.bits, signed)
        s = scale_for_range(ranges, config.bits, signed).double()[group_of].view(-1, 1, 1, 1)
        literal = ((-r_x if signed else 0.0) + 0 * s, r_x + 0 * s)  # the paper's [-r_x, r_x], for the ablation
        lo, hi = (qn * s, qp * s) if config.clamp_to == "representable" else literal
        if config.grid == "apot":  # APoT levels span exactly [-r_j, r_j] (or [0, r_j])
            r_c = ranges.double()[group_of].view(-1, 1, 1, 1)
            lo, hi = (-r_c if signed else 0 * r_c), r_c
        clamped = torch.minimum(torch.maximum(w, lo), hi)
        clamp_bias = -(w - clamped).abs().flatten(1).sum(1)
        w = clamped
    return w.to(weight.dtype), group_of, ranges, clamp_bias


def _quant_layer(module: AdderConv2d, r_x: float, config: QuantConfig, signed: bool) -> QuantAdderConv2d:
    double = config.weight_grid == "double_step"
    w, group_of, ranges, bias = layer_parameters(module.weight, r_x, config, signed or double)
    return QuantAdderConv2d(w, module.stride, module.padding, module.dilation, bits=config.bits,
                            group_of=group_of, ranges=ranges, clamp_bias=bias,
                            lossless_act_clamp=config.lossless_act_clamp, eta=module.eta, signed=signed,
                            grid=config.grid, weight_grid=config.weight_grid)


@torch.no_grad()
def _adder_inputs(model: nn.Module, calib, images: int) -> dict[str, torch.Tensor]:
    """The full-precision inputs of every adder layer on the first ``images`` calibration images."""
    x = calibration_tensor(calib, images)
    adders = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
    seen = {}
    with hooked(model, adders, lambda name, _m, inputs: seen.__setitem__(name, inputs[0].detach())):
        model(x)
    return seen


@torch.no_grad()
def search_range(module: AdderConv2d, x: torch.Tensor, obs: AbsRangeObserver, config: QuantConfig,
                 signed: bool) -> tuple[float, dict[float, float]]:
    """The activation range r_x, among the observer's percentiles at ``config.range_alphas``, whose
    quantized layer — groups, shared scales and the Theorem-1 fold all rebuilt for that r_x — gives the
    smallest mean squared error against the full-precision layer's output on ``x``. Returns it and the
    error of every candidate (by α)."""
    target = module(x)
    errors, best = {}, None
    for alpha in config.range_alphas:
        r_x = obs.percentile(alpha) if alpha < 1 else obs.max
        errors[alpha] = err = float((_quant_layer(module, r_x, config, signed).eval()(x) - target).square().mean())
        if best is None or err < errors[best[0]]:
            best = (alpha, r_x)
    return best[1], errors


def quantize_adder(model: nn.Module, calib, config: QuantConfig, batch_size: int = 256, progress: bool = False,
                   observers: dict[str, AbsRangeObserver] | None = None, labels=None) -> QuantResult:
    """Fake-quantized copy of an AdderNet under ``config`` (the original is untouched).

    ``observers`` from an earlier :func:`calibrate` call skip the calibration pass. QSSF ``best`` builds
    both variants from the same observers and keeps the one that scores better on ``calib`` (by
    ``labels`` when given, else agreement with the full-precision predictions). With
    ``config.learned_rounding`` the adder weights' rounding is then learned block by block
    (:func:`adderquant.quant.rounding.learn_rounding`). Last, with ``config.bn_recalibration`` the
    BatchNorm statistics are re-estimated on augmented batches of ``calib`` through the quantized copy
    (:func:`adderquant.quant.bn.reestimate_bn`), or with ``config.bn_correction`` corrected.

    Learned rounding runs before the BatchNorm options: its target is the float block, BatchNorm
    included, so it reconstructs with the float model's statistics (the ones the target used), and the
    BatchNorm step then measures the model whose codes are final — re-estimating or correcting first
    would be undone by every code the rounding changes afterwards."""
    check_adder_model(model, config)
    if observers is None:  # calibrate checks the images for NaN/inf
        min_alpha = min(config.range_alphas) if config.range_search else None
        observers = calibrate(model, calib, config, batch_size, progress, min_alpha=min_alpha)
    else:
        check_finite(calib)
    if config.scale_source == "best":
        return _best_qssf(model, calib, config, batch_size, observers, labels)
    q = copy.deepcopy(model).eval()
    stats = {}
    inputs = _adder_inputs(model, calib, config.range_search_images) if config.range_search else {}
    for name, obs in observers.items():
        module = q.get_submodule(name)
        if not isinstance(module, AdderConv2d) and not config.quantize_first_last:
            continue
        if isinstance(module, AdderConv2d):
            double = config.weight_grid == "double_step"  # unsigned activations, signed weights at 2·s
            signed = False if double else not (config.unsigned_activations and obs.min >= 0)
            if config.range_search:
                r_x, searched = search_range(module, inputs[name], obs, config, signed)
            else:
                r_x, searched = obs.range(config.act_clamp, config.act_clamp_mode, config.alpha), None
            new = _quant_layer(module, r_x, config, signed)
            stats[name] = {"r_x": r_x, "max_abs_x": obs.max, "signed": signed, "ranges": new.ranges.tolist(),
                           "max_abs_w": float(module.weight.detach().abs().max()), "range_search": searched}
        else:
            new = QuantFirstLast(module, obs.max, config.first_last_bits)
        set_submodule(q, name, new)
    rounding = None
    if config.learned_rounding:  # before the BatchNorm options (docstring)
        rounding = learn_rounding(q, model, calib, config.learned_rounding, batch_size=config.rounding_batch_size,
                                  lr=config.rounding_lr, progress=progress)
    if config.bn_recalibration:  # on the quantized model, augmented calibration batches (quant/bn.py)
        reestimate_bn(q, calib, config.bn_recalibration, momentum=config.bn_momentum,
                      batch_size=config.bn_batch_size)
        q.eval()
    if config.bn_correction:
        correct_bn(q, model, calibration_tensor(calib), config.bn_correction)
    return QuantResult(q, config, stats, rounding=rounding)


@torch.no_grad()
def _predictions(model: nn.Module, calib, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(xb).argmax(1) for xb in tensor_batches(calib, batch_size)])


def _best_qssf(model: nn.Module, calib, config: QuantConfig, batch_size: int, observers, labels) -> QuantResult:
    """QSSF = the better of ``qssf-w`` and ``qssf-a`` on the calibration images."""
    target = labels if labels is not None else _predictions(model, calib, batch_size)
    best, scores = None, {}
    for source in ("weights", "activations"):
        variant = QuantConfig.qssf(source, config.bits, **{k: getattr(config, k) for k in QSSF_OVERRIDES})
        cand = quantize_adder(model, calib, variant, batch_size, observers=observers)
        preds = _predictions(cand.model, calib, batch_size)
        scores[variant.method] = float((preds == target.to(preds.device)).float().mean())
        if best is None or scores[variant.method] > scores[best.config.method]:
            best = cand
    best.calibration_scores = scores
    return best
