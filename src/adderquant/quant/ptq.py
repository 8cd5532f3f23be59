"""Post-training quantization of AdderNets (paper Sec. 3) and the QSSF baseline.

``quantize`` calibrates on full-precision activations, then replaces every ``AdderConv2d`` with a
``QuantAdderConv2d`` whose groups, ranges and clamp bias follow the ``QuantConfig``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import AdderConv2d
from .adder_layer import QuantAdderConv2d
from .config import QuantConfig
from .first_last import QuantConvLinear8
from .grouping import group_channels
from .observers import AbsRangeObserver
from .uniform import int_range, scale_for_range


def _batches(calib, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(calib, torch.Tensor):
        for i in range(0, calib.shape[0], batch_size):
            yield calib[i : i + batch_size]
        return
    for item in calib:
        yield item[0] if isinstance(item, (tuple, list)) else item


def _first_last(model: nn.Module) -> list[str]:
    """Names of the conventional first and last layers (stem conv and classifier)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [names[0], names[-1]] if names else []


@torch.no_grad()
def calibrate(model: nn.Module, calib, config: QuantConfig, batch_size: int = 256,
              progress: bool = True, min_alpha: float | None = None) -> dict[str, AbsRangeObserver]:
    """Observe |input| of every adder layer (and first/last layer) on the full-precision model.

    The observers answer any α ≥ ``min_alpha`` (default ``config.alpha``), so one calibration pass
    serves a whole sweep of configurations.
    """
    targets = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
    if config.quantize_first_last:
        targets.update({n: model.get_submodule(n) for n in _first_last(model)})
    total = calib.shape[0] if isinstance(calib, torch.Tensor) else None
    observers = {n: AbsRangeObserver(min(config.alpha, min_alpha or 1.0)) for n in targets}
    sizes: dict[str, int] = {}

    def hook(name):
        def fn(_, inputs):
            x = inputs[0]
            if total is not None and observers[name].total is None:
                observers[name].total = x[0].numel() * total
            observers[name].observe(x)
            sizes[name] = x[0].numel()
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    was_training = model.training
    model.eval()
    try:
        for xb in tqdm(list(_batches(calib, batch_size)), desc="calibrate", disable=not progress, leave=False):
            model(xb)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return observers


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


def quantize_adder(model: nn.Module, calib, config: QuantConfig, batch_size: int = 256,
                   progress: bool = True, observers: dict[str, AbsRangeObserver] | None = None) -> nn.Module:
    """Fake-quantized copy of an AdderNet under ``config`` (the original is untouched).

    ``observers`` from an earlier :func:`calibrate` call skip the calibration pass."""
    q = copy.deepcopy(model).eval()
    if observers is None:
        observers = calibrate(q, calib, config, batch_size, progress)
    stats = {}
    for name, obs in observers.items():
        module = q.get_submodule(name)
        if not isinstance(module, AdderConv2d) and not config.quantize_first_last:
            continue
        if isinstance(module, AdderConv2d):
            r_x = obs.range(config.act_clamp, config.act_clamp_mode, config.alpha)
            signed = not (config.unsigned_activations and obs.min >= 0)
            w, group_of, ranges, bias = layer_parameters(module.weight, r_x, config, signed)
            new = QuantAdderConv2d(w, module.stride, module.padding, module.dilation, bits=config.bits,
                                   group_of=group_of, ranges=ranges, clamp_bias=bias,
                                   lossless_act_clamp=config.lossless_act_clamp, eta=module.eta, signed=signed,
                                   grid=config.grid)
            stats[name] = {"r_x": r_x, "max_abs_x": obs.max, "signed": signed, "ranges": ranges.tolist(),
                           "max_abs_w": float(module.weight.detach().abs().max())}
        else:
            new = QuantConvLinear8(module, obs.max, config.first_last_bits)
        _set_submodule(q, name, new)
    q.quant_config = config
    q.quant_stats = stats
    return q


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def _calibration_score(model: nn.Module, calib: torch.Tensor, labels, reference, batch_size: int) -> float:
    preds = torch.cat([model(xb).argmax(1) for xb in _batches(calib, batch_size)])
    target = labels if labels is not None else reference
    return float((preds == target.to(preds.device)).float().mean())


def choose_qssf(model: nn.Module, calib: torch.Tensor, bits: int, labels=None, batch_size: int = 256,
                progress: bool = True, observers=None, **overrides) -> nn.Module:
    """QSSF = the better of ``qssf-w`` and ``qssf-a`` on the calibration set (labels if given, else
    agreement with the full-precision predictions). The winner is recorded in ``quant_config``."""
    reference = None
    if labels is None:
        with torch.no_grad():
            reference = torch.cat([model.eval()(xb).argmax(1) for xb in _batches(calib, batch_size)])
    best, best_score = None, -1.0
    scores = {}
    for source in ("weights", "activations"):
        config = QuantConfig.qssf(source, bits, **overrides)
        cand = quantize_adder(model, calib, config, batch_size, progress, observers=observers)
        scores[cand.quant_config.method] = score = _calibration_score(cand, calib, labels, reference, batch_size)
        if score > best_score:
            best, best_score = cand, score
    best.qssf_calibration_scores = scores
    return best
