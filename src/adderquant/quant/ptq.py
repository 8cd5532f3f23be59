"""Post-training quantization of AdderNets (paper Sec. 3) and the QSSF baseline.

``quantize_adder`` calibrates on full-precision activations, then replaces every ``AdderConv2d`` with a
``QuantAdderConv2d`` whose groups, ranges and clamp bias follow the ``QuantConfig``; it returns a
:class:`QuantResult` (the model plus what was decided on the way), never attributes on the module.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import calibration_tensor, tensor_batches
from ..nn import AdderConv2d
from ..utils import hooked, progress_bar, set_submodule
from .adder_layer import QuantAdderConv2d
from .bn import correct_bn, reestimate_bn
from .config import QSSF_OVERRIDES, QuantConfig
from .first_last import QuantFirstLast
from .grouping import error_groups, group_channels, per_group_errors
from .kl_search import kl_refine
from .observers import AbsRangeObserver
from .rounding import learn_rounding
from .sensitivity import output_sensitivity
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


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def check_calibration(x, model: nn.Module, what: str = "calibration images") -> None:
    """Refuse, with one line, calibration images the model cannot take as they are: not a tensor, raw
    pixels (uint8) or another dtype than the model's, not (N, C, H, W) with the first layer's C
    channels, empty, or holding NaN/inf. Called on a tensor before any work, on an iterable's batches
    as they are read."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be tensors (N, C, H, W), got {type(x).__name__}")
    _, dtype = _model_device_dtype(model)
    if not x.is_floating_point():
        hint = " (raw pixels: normalise them first, adderquant.data.normalize(x, mean, std))" \
            if x.dtype == torch.uint8 else ""
        raise TypeError(f"{what} are {x.dtype}, the model takes normalised {dtype} images{hint}")
    if x.dtype != dtype:
        raise TypeError(f"{what} are {x.dtype} but the model computes in {dtype}: convert one of them")
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, AdderConv2d, nn.Linear))), None)
    if isinstance(first, (nn.Conv2d, AdderConv2d)):
        if x.dim() != 4:
            raise ValueError(f"{what} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != first.in_channels:
            hint = " (channels last? permute to N, C, H, W)" if x.shape[-1] == first.in_channels else ""
            raise ValueError(f"{what} have {x.shape[1]} channels, the model's first layer takes "
                             f"{first.in_channels}: shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} hold no images")
    check_finite(x)


def _check_source(calib) -> None:
    if isinstance(calib, torch.Tensor):
        return
    if isinstance(calib, (str, bytes)) or not hasattr(calib, "__iter__"):
        raise TypeError(f"calibration images must be a tensor or an iterable of tensor batches, got "
                        f"{type(calib).__name__}")
    if type(calib).__module__ == "numpy":
        raise TypeError("calibration images must be a torch tensor or an iterable of tensor batches, got a NumPy "
                        "array: pass torch.from_numpy(...)")


def _images_bound(calib) -> int | None:
    """An upper bound of the images a ``DataLoader`` yields (its sampler's length), else ``None``."""
    from torch.utils.data import DataLoader

    if isinstance(calib, DataLoader):
        try:
            return len(calib.sampler)
        except TypeError:  # an IterableDataset: no length
            return None
    return None


@torch.no_grad()
def calibrate(model: nn.Module, calib, config: QuantConfig, batch_size: int = 256,
              progress: bool = False, min_alpha: float | None = None, *, images: int | None = None,
              max_kept: int | None = None) -> dict[str, AbsRangeObserver]:
    """Observe |input| of every adder layer (and first/last layer) on the full-precision model.

    The observers answer any α ≥ ``min_alpha`` (default ``config.alpha``), so one calibration pass
    serves a whole sweep of configurations. ``calib`` is a tensor (cut into ``batch_size`` batches) or
    any iterable of tensors / ``(x, y)`` batches, streamed: batches are moved to the model's device one
    at a time and nothing but the observers' bounded state outlives a batch (``images``: an upper bound
    of the images an iterable yields, default a ``DataLoader``'s sampler length; ``max_kept``: the
    observers' cap without one — :mod:`adderquant.quant.observers`).
    """
    targets = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
    if config.quantize_first_last:
        targets.update({n: model.get_submodule(n) for n in first_last_names(model)})
    _check_source(calib)
    tensor = isinstance(calib, torch.Tensor)
    if tensor:
        check_calibration(calib, model)
    total = calib.shape[0] if tensor else None
    bound = None if tensor else (images if images is not None else _images_bound(calib))
    batch_alpha = config.alpha if config.act_clamp_mode == "batch_max" else None
    if batch_alpha is not None:  # the authors' per-batch statistic: batches of act_batch_size images
        batch_size = config.act_batch_size
    cap = {} if max_kept is None else {"max_kept": max_kept}
    observers = {n: AbsRangeObserver(min(config.alpha, min_alpha or 1.0), batch_alpha=batch_alpha, **cap)
                 for n in targets}
    for n, obs in observers.items():
        obs.name = n
    device, _ = _model_device_dtype(model)

    def observe(name, _module, inputs):
        x, obs = inputs[0], observers[name]
        if total is not None and obs.total is None:
            obs.total = x[0].numel() * total
        if bound is not None and obs.bound is None:
            obs.bound = x[0].numel() * bound
        obs.observe(x)

    seen = 0
    with hooked(model, targets, observe):
        bar = progress_bar(tensor_batches(calib, batch_size, device=device), "calibrate", progress,
                           total=-(-total // batch_size) if total else None)
        for xb in bar:
            if not tensor:
                check_calibration(xb, model, f"calibration batch {seen + 1}")
            model(xb)
            seen += 1
    if not seen:
        raise ValueError("no calibration images: the iterable yielded no batch")
    return observers


class _Head:
    """Passes an iterable's batches through while keeping a copy of its first ``limit`` images: what
    the steps after calibration that need the images as one tensor work on."""

    def __init__(self, limit: int):
        self.limit, self.kept, self.count, self.seen = limit, [], 0, 0

    def tee(self, calib):
        for xb in tensor_batches(calib):
            if isinstance(xb, torch.Tensor) and xb.dim() > 0:
                self.seen += len(xb)
                if self.count < self.limit:
                    part = xb[: self.limit - self.count].detach().clone()
                    self.kept.append(part)
                    self.count += len(part)
            yield xb

    def tensor(self) -> torch.Tensor | None:
        return torch.cat(self.kept) if self.kept else None


def _images_needed(config: QuantConfig, tensor_images: int) -> tuple[int, list[str]]:
    """How many calibration images the steps after calibration read as one tensor, and which steps
    read all of them (range search reads its own ``range_search_images`` first images)."""
    steps = [name for name, on in (("QSSF scoring", config.scale_source == "best"),
                                   ("learned rounding", config.learned_rounding),
                                   ("BN re-estimation", config.bn_recalibration),
                                   ("BN correction", config.bn_correction)) if on]
    need = tensor_images if steps else 0
    if config.range_search:
        need = max(need, config.range_search_images)
    return need, steps


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
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, AdderConv2d))), None)
    if config.bn_recalibration and isinstance(config.bn_pad, tuple) and len(config.bn_pad) != first.in_channels:
        raise ValueError(f"bn_pad has {len(config.bn_pad)} values, the model takes {first.in_channels} input channels")


def layer_parameters(weight: torch.Tensor, r_x: float | list[float], config: QuantConfig, signed: bool = True,
                     group_of: torch.Tensor | None = None):
    """Groups, per-group shared ranges and the clamp bias for one adder layer (Sec. 3.1–3.2); ``r_x`` is
    the layer's activation range, or one per group (``range_search_scope="group"``); ``group_of``
    (a label per output channel) replaces the clustering (``range_search_scope="regroup"``).

    The weight clamp folds ``-Σ dist(W_c, [q_n·s_j, q_p·s_j])`` into the bias: Theorem 1 for the
    interval the quantized activations actually occupy. The paper's literal ``[-r_x, r_x]`` is not
    representable (``q_p·s = r_x·(1 − 1/(2^b−1))``), and rounding the clamped weights back inside
    would leave a per-channel constant error that BatchNorm amplifies (see docs/quantization.md).
    """
    w = weight.detach().to(torch.float64)
    if group_of is None:
        group_of = group_channels(w, config.groups, config.group_feature)
    ranges = []
    for j in range(int(group_of.max()) + 1):
        r_w = float(w[group_of == j].abs().max())
        r_xj = r_x[j] if isinstance(r_x, list) else r_x
        r = {"min": min(r_w, r_xj), "weights": r_w, "activations": r_xj}[config.scale_source]
        ranges.append(max(r, 1e-8))
    ranges = torch.tensor(ranges, dtype=torch.float32)  # the layer's buffer: scales derive from it
    clamp_bias = None
    interval = fold_interval(ranges, group_of, r_x, config, signed)
    if interval is not None:
        clamped = torch.minimum(torch.maximum(w, interval[0]), interval[1])
        clamp_bias = -(w - clamped).abs().flatten(1).sum(1)
        w = clamped
    return w.to(weight.dtype), group_of, ranges, clamp_bias


def fold_interval(ranges: torch.Tensor, group_of: torch.Tensor, r_x: float | list[float], config: QuantConfig,
                  signed: bool):
    """Per output channel ``(lo, hi)`` (float64, shape (O, 1, 1, 1)) the weight clamp folds into, or
    ``None`` without the clamp: the grid's representable edges, the paper's literal ``[-r_x, r_x]``
    (``[0, r_x]`` unsigned), or ``[-r_j, r_j]`` for APoT levels."""
    if not config.weight_clamp:
        return None
    qn, qp = int_range(config.bits, signed)
    s = scale_for_range(ranges, config.bits, signed).double()[group_of].view(-1, 1, 1, 1)
    if config.grid == "apot":  # APoT levels span exactly [-r_j, r_j] (or [0, r_j])
        r_c = ranges.double()[group_of].view(-1, 1, 1, 1)
        return (-r_c if signed else 0 * r_c), r_c
    if config.clamp_to == "representable":
        return qn * s, qp * s
    r_c = torch.tensor(r_x, dtype=torch.float64)[group_of].view(-1, 1, 1, 1) if isinstance(r_x, list) else r_x
    return (-r_c if signed else 0.0) + 0 * s, r_c + 0 * s  # the paper's [-r_x, r_x], for the ablation


def _quant_layer(module: AdderConv2d, r_x: float | list[float], config: QuantConfig, signed: bool,
                 group_of: torch.Tensor | None = None) -> QuantAdderConv2d:
    double = config.weight_grid == "double_step"
    w, group_of, ranges, bias = layer_parameters(module.weight, r_x, config, signed or double, group_of)
    return QuantAdderConv2d(w, module.stride, module.padding, module.dilation, bits=config.bits,
                            group_of=group_of, ranges=ranges, clamp_bias=bias,
                            clamp_interval=fold_interval(ranges, group_of, r_x, config, signed or double),
                            lossless_act_clamp=config.lossless_act_clamp, eta=module.eta, signed=signed,
                            grid=config.grid, weight_grid=config.weight_grid, conv_groups=module.groups)


@torch.no_grad()
def _adder_inputs(model: nn.Module, calib, images: int) -> dict[str, torch.Tensor]:
    """The full-precision inputs of every adder layer on the first ``images`` calibration images."""
    x = calibration_tensor(calib, images)
    adders = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
    seen = {}
    with hooked(model, adders, lambda name, _m, inputs: seen.__setitem__(name, inputs[0].detach())):
        model(x)
    return seen


def grid_signed(config: QuantConfig, obs: AbsRangeObserver) -> bool:
    """Whether an adder layer's quantized grid is signed: the authors' double step puts unsigned
    activations against signed weights; otherwise signed unless the unsigned grid is on and the
    calibration inputs were all ≥ 0."""
    return False if config.weight_grid == "double_step" else not (config.unsigned_activations and obs.min >= 0)


def candidate_ranges(obs: AbsRangeObserver, config: QuantConfig) -> list[float]:
    """The range search's candidates: the observer's percentiles at ``config.range_alphas`` (1: its max)."""
    return [obs.percentile(a) if a < 1 else obs.max for a in config.range_alphas]


@torch.no_grad()
def candidate_errors(module: AdderConv2d, x: torch.Tensor, obs: AbsRangeObserver, config: QuantConfig,
                     signed: bool, weight: torch.Tensor | None = None
                     ) -> tuple[list[float], list[float], torch.Tensor, torch.Tensor]:
    """The layer quantized at each candidate range (the observer's percentiles at ``config.range_alphas``)
    against the float layer on ``x``: the ranges, the output MSE of each, each output channel's summed
    squared error (float64, candidates × channels) and the k-means group labels the candidates share.
    ``weight`` (the output's shape) weighs each element's squared error (the ``fisher`` metric)."""
    target = module(x)
    ranges = candidate_ranges(obs, config)
    mse, per_channel, group_of = [], [], None
    for r_x in ranges:
        layer = _quant_layer(module, r_x, config, signed).eval()
        diff = layer(x) - target
        if config.range_search_metric == "centered":
            diff = diff - diff.mean((0, 2, 3), keepdim=True)
        squared = diff.square()
        if weight is not None:
            squared = squared * weight
        mse.append(float(squared.mean()))
        per_channel.append(squared.double().sum((0, 2, 3)))
        group_of = layer.group_of
    return ranges, mse, torch.stack(per_channel), group_of


def search_range(module: AdderConv2d, x: torch.Tensor, obs: AbsRangeObserver, config: QuantConfig,
                 signed: bool, weight: torch.Tensor | None = None
                 ) -> tuple[float | list[float], torch.Tensor | None, dict]:
    """The activation range r_x, among the observer's percentiles at ``config.range_alphas``, whose
    quantized layer — groups, shared scales and the Theorem-1 fold all rebuilt for that r_x — gives the
    smallest mean squared error against the full-precision layer's output on ``x``. Returns it, the
    group labels (``None``: the clustering's) and the error of every candidate (by α).

    ``range_search_scope="group"``: one r_x per weight group (a list, by group index), each the
    candidate with the smallest squared error summed over the group's own output channels — exact per
    group, because a group's outputs depend on its shared range alone. ``"regroup"``: the groups
    themselves follow the errors — at most ``config.groups`` candidates, each channel in the group of
    the one that serves it best (:func:`~adderquant.quant.grouping.error_groups`). The report then
    holds each group's chosen α under ``"group_alphas"``. ``weight`` weighs each output element's squared
    error (``range_search_metric="fisher"``: :func:`~adderquant.quant.sensitivity.output_sensitivity`)."""
    alphas = list(config.range_alphas)
    ranges, mse, per_channel, group_of = candidate_errors(module, x, obs, config, signed, weight)
    errors = dict(zip(alphas, mse, strict=True))
    if config.range_search_scope == "layer":
        return ranges[min(range(len(mse)), key=mse.__getitem__)], None, errors  # ties: the first candidate
    if config.range_search_scope == "group":
        chosen = per_group_errors(per_channel, group_of).argmin(0).tolist()  # ties: the first candidate
        group_of = None
    else:
        chosen, group_of = error_groups(per_channel, config.groups)
    errors["group_alphas"] = [alphas[i] for i in chosen]
    return [ranges[i] for i in chosen], group_of, errors


def quantize_adder(model: nn.Module, calib, config: QuantConfig, batch_size: int = 256, progress: bool = False,
                   observers: dict[str, AbsRangeObserver] | None = None, labels=None, *,
                   tensor_images: int = 1024) -> QuantResult:
    """Fake-quantized copy of an AdderNet under ``config`` (the original is untouched).

    ``calib``: normalised images as one tensor, or any iterable of tensor / ``(x, y)`` batches (a
    ``DataLoader``, a generator), read once. The ranges are observed over every image, streaming, in
    bounded memory (:func:`calibrate`); the steps that need the images as one tensor — range search,
    QSSF scoring, learned rounding, BN re-estimation and correction — then work on the iterable's first
    ``tensor_images`` images, kept while it streams (a warning says so when it yielded more). A tensor
    is used whole everywhere, on the model's device.

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
    _check_source(calib)
    device, _ = _model_device_dtype(model)
    need, steps = _images_needed(config, tensor_images)
    min_alpha = min(config.range_alphas) if config.range_search else None
    if isinstance(calib, torch.Tensor):
        check_calibration(calib, model)  # before any work
        if observers is None:
            observers = calibrate(model, calib, config, batch_size, progress, min_alpha=min_alpha)
        calib = calib.to(device)
    else:  # one streaming pass; keep the first `need` images for the steps below
        head = _Head(need)
        if observers is None:
            observers = calibrate(model, head.tee(calib), config, batch_size, progress, min_alpha=min_alpha,
                                  images=_images_bound(calib))
        elif need:
            for i, xb in enumerate(head.tee(calib)):
                check_calibration(xb, model, f"calibration batch {i + 1}")
                if head.count >= need:
                    break
        if need and steps and head.seen > head.count:
            kept = f"tensor_images={tensor_images}" if need == tensor_images else \
                f"range_search_images={config.range_search_images}"
            warnings.warn(f"quantize: {', '.join(steps)} used the first {head.count} of the {head.seen} calibration "
                          f"images (an iterable is kept up to {kept}; pass the images as one tensor to use "
                          "them all)", stacklevel=2)
        calib = head.tensor()
        if calib is None and need:
            raise ValueError("no calibration images: the iterable yielded no batch")
        if calib is not None:
            calib = calib.to(device)
            if labels is not None and len(labels) >= len(calib):
                labels = labels[: len(calib)]
    if config.scale_source == "best":
        return _best_qssf(model, calib, config, batch_size, observers, labels)
    q = copy.deepcopy(model).eval()
    stats, start, signed_of, searched_of = {}, {}, {}, {}
    inputs, weights = {}, {}
    if config.range_search and config.range_search_metric == "fisher":
        adders = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
        for n, (x, w) in output_sensitivity(model, calibration_tensor(calib, config.range_search_images),
                                            adders).items():
            inputs[n], weights[n] = x, w
    elif config.range_search:
        inputs = _adder_inputs(model, calib, config.range_search_images)
    for name, obs in progress_bar(list(observers.items()), "range search", progress and config.range_search,
                                  unit="layer"):
        module = q.get_submodule(name)
        if not isinstance(module, AdderConv2d) and not config.quantize_first_last:
            continue
        if isinstance(module, AdderConv2d):
            signed = grid_signed(config, obs)
            if config.range_search:
                r_x, group_of, searched = search_range(module, inputs[name], obs, config, signed, weights.get(name))
            else:
                r_x, group_of, searched = obs.range(config.act_clamp, config.act_clamp_mode, config.alpha), None, None
            if config.range_search_metric == "kl":  # built by the KL pass below, the layer float until then
                start[name], signed_of[name], searched_of[name] = (r_x, group_of), signed, searched
                continue
            new = _quant_layer(module, r_x, config, signed, group_of)
            stats[name] = _layer_stats(module, new, r_x, obs, signed, searched)
        else:
            new = QuantFirstLast(module, obs.max, config.first_last_bits)
        set_submodule(q, name, new)
    if start:
        floats = {n: q.get_submodule(n) for n in start}
        candidates = {n: candidate_ranges(observers[n], config) for n in start}
        refined = kl_refine(q, model, start, candidates,
                            lambda n, r, g: _quant_layer(floats[n], r, config, signed_of[n], g),
                            calibration_tensor(calib, config.range_search_images), config.bn_correction, progress)
        for n, report in refined.items():
            chosen = [candidates[n][i] for i in report["chosen"]]
            searched_of[n]["kl"] = {"alphas": [config.range_alphas[i] for i in report["chosen"]],
                                    "kl_mse_choice": report["kl_mse_choice"], "kl": report["kl"]}
            stats[n] = _layer_stats(floats[n], q.get_submodule(n), chosen if isinstance(start[n][0], list)
                                    else chosen[0], observers[n], signed_of[n], searched_of[n])
    rounding = None
    if config.learned_rounding:  # before the BatchNorm options (docstring)
        rounding = learn_rounding(q, model, calib, config.learned_rounding, batch_size=config.rounding_batch_size,
                                  lr=config.rounding_lr, progress=progress)
    if config.bn_recalibration:  # on the quantized model, augmented calibration batches (quant/bn.py)
        reestimate_bn(q, calib, config.bn_recalibration, momentum=config.bn_momentum,
                      batch_size=config.bn_batch_size, fill=pad_fill(config.bn_pad, calib), progress=progress)
        q.eval()
    if config.bn_correction:  # one pass of each model over all the images: a one-step "bar"
        for _ in progress_bar([calib], "BN correction", progress, unit="pass"):
            correct_bn(q, model, calibration_tensor(calib), config.bn_correction)
    return QuantResult(q, config, stats, rounding=rounding)


def _layer_stats(module: AdderConv2d, new: QuantAdderConv2d, r_x, obs: AbsRangeObserver, signed: bool,
                 searched: dict | None) -> dict:
    per_group = r_x if isinstance(r_x, list) else None
    return {"r_x": max(per_group) if per_group else r_x, "r_x_groups": per_group, "max_abs_x": obs.max,
            "signed": signed, "ranges": new.ranges.tolist(), "max_abs_w": float(module.weight.detach().abs().max()),
            "range_search": searched}


def pad_fill(pad, calib: torch.Tensor) -> torch.Tensor | None:
    """The per-channel value the BN re-estimation's crops pad with (``QuantConfig.bn_pad``): the
    calibration images' smallest value per channel (``darkest``), none (``zero``), or the given values."""
    if pad == "zero":
        return None
    if pad == "darkest":
        return calib.amin(dim=[d for d in range(calib.dim()) if d != 1])
    return torch.tensor(pad, dtype=calib.dtype, device=calib.device)


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
