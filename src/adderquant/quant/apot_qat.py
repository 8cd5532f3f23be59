"""Progressive APoT quantization-aware training (the authors' recipe: fp32 → 4 → 3 → 2 bits, each
stage initialised from the previous one).

The APoT authors give the clipping thresholds their own learning rates (``act_alpha`` and
``wgt_alpha`` parameter groups in their CIFAR script; the defaults below are those values as
recalled, not re-verified here), so a stage builds its own parameter groups and a per-step cosine
schedule, then steps through the package's one loop (:func:`adderquant.loop.sgd_epoch`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data import CIFAR_APOT_NORM, batches, normalize
from ..evaluate import evaluate
from ..loop import cosine_schedule, crop_flip, epoch_summary, sgd_epoch
from .apot_layers import (
    FirstLastConv2d,
    FirstLastLinear,
    QuantConv2d,
    QuantLinear,
    apot_quantize,
    check_layer_bits,
)

__all__ = ["APoTStage", "apot_progressive_qat", "train_stage"]


@dataclass
class APoTStage:
    """One stage of the schedule: its model (a copy) and its test top-1 (None unless evaluated)."""

    model: nn.Module
    top1: float | None = None


def _param_groups(model: nn.Module, weight_decay: float, alpha_lr: tuple[float, float] | None,
                  alpha_weight_decay: float):
    act, wgt, rest = [], [], []
    for name, p in model.named_parameters():
        (act if name.endswith("act_alpha") else wgt if name.endswith("wgt_alpha") else rest).append(p)
    groups = [{"params": rest, "weight_decay": weight_decay}]
    for params, lr in ((act, None if alpha_lr is None else alpha_lr[0]),
                       (wgt, None if alpha_lr is None else alpha_lr[1])):
        if params:
            extra = {"lr": lr} if lr else {}
            groups.append({"params": params, "weight_decay": alpha_weight_decay, **extra})
    return groups


def train_stage(model: nn.Module, dataset, epochs: int, lr: float, *, norm=CIFAR_APOT_NORM,
                batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 1e-4,
                alpha_lr: tuple[float, float] | None = (0.1, 0.02), alpha_weight_decay: float = 1e-4,
                augment: bool = True, max_steps: int | None = None, seed: int = 0,
                log: Callable[[str], None] | None = None) -> nn.Module:
    """Train ``model`` in place for ``epochs`` on ``dataset.x_train``/``y_train`` (uint8 NCHW)."""
    device = next(model.parameters()).device
    opt = torch.optim.SGD(_param_groups(model, weight_decay, alpha_lr, alpha_weight_decay), lr=lr, momentum=momentum)
    steps_per_epoch = math.ceil(len(dataset.x_train) / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    sched = cosine_schedule(opt, total)  # stepped once per batch
    gen = torch.Generator().manual_seed(seed)
    augment = crop_flip(4, seed=lambda s: seed + s) if augment else None
    step = 0
    for epoch in range(epochs):
        loader = batches(dataset.x_train, dataset.y_train, batch_size, shuffle=True, generator=gen, device=device)
        stats = sgd_epoch(model, opt, loader, norm, augment=augment, step=step, scheduler=sched, max_steps=total,
                          desc=f"apot epoch {epoch + 1}/{epochs}")
        step = stats["step"]
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {epoch_summary(stats)['train_loss']:.4f}")
    model.eval()
    return model


def _is_apot(model: nn.Module) -> bool:
    return any(isinstance(m, QuantConv2d | QuantLinear) for m in model.modules())


def apot_progressive_qat(model: nn.Module, dataset, schedule: Sequence[int] = (32, 4, 3, 2),
                         epochs_per_stage: int | Sequence[int] = 1, lr: float | Sequence[float] = 0.04, *,
                         norm=CIFAR_APOT_NORM, init: str = "data", calib_images: int = 512,
                         evaluate_each: bool = True, log: Callable[[str], None] | None = None,
                         **train_options) -> dict[int, APoTStage]:
    """Train ``model`` through ``schedule`` (32 = float inner layers, else APoT bits 2..6); each stage
    starts from the previous stage's weights and thresholds (a quantized model changes width in place
    via ``set_bits``; a float one is converted with :func:`apot_quantize`, thresholds from ``init``:
    ``"data"`` = MSE-fit on ``calib_images`` training images, ``"authors"`` = 3.0 / 8.0).

    First and last layers are 8-bit by ``w.max()`` in every stage (the fp32 stage too, as the authors'
    fp32 model). ``dataset``: an ``adderquant.data.Dataset`` (uint8 NCHW). Returns ``{bits: APoTStage}``
    (copies; ``model`` is untouched), each with its test accuracy when ``evaluate_each``.
    ``train_options`` go to :func:`train_stage`.
    """
    if init not in ("data", "authors"):
        raise ValueError(f"init must be 'data' or 'authors', got {init!r}")
    for b in schedule:
        if b != 32:
            check_layer_bits(b)
    if isinstance(epochs_per_stage, int):
        epochs = [epochs_per_stage] * len(schedule)
    else:
        epochs = list(epochs_per_stage)
    lrs = [lr] * len(schedule) if isinstance(lr, int | float) else list(lr)
    if len(epochs) != len(schedule) or len(lrs) != len(schedule):
        raise ValueError("epochs_per_stage and lr must be scalars or have one entry per stage")
    results: dict[int, APoTStage] = {}
    current = copy.deepcopy(model)
    for bits, n_epochs, stage_lr in zip(schedule, epochs, lrs, strict=True):
        if bits == 32:
            if _is_apot(current):
                raise ValueError("a 32-bit stage cannot follow a quantized stage")
            if not isinstance(_first(current), FirstLastConv2d | FirstLastLinear):
                current = apot_quantize(current, 4, layers=())  # first/last 8-bit only
        elif _is_apot(current):
            current = copy.deepcopy(current)
            for m in current.modules():
                if isinstance(m, QuantConv2d | QuantLinear):
                    m.set_bits(bits)
        else:
            calib = None
            if init == "data":
                device = next(current.parameters()).device
                calib = normalize(dataset.x_train[:calib_images].to(device), *norm)
            current = apot_quantize(current, bits, calib=calib)
        if log:
            log(f"stage {bits} bits: {n_epochs} epochs, lr {stage_lr}")
        train_stage(current, dataset, n_epochs, stage_lr, norm=norm, log=log, **train_options)
        top1 = None
        if evaluate_each:
            top1 = evaluate(current, dataset.x_test, dataset.y_test, norm, progress=False).top1
            if log:
                log(f"stage {bits} bits: test accuracy {top1:.2f} %")
        results[bits] = APoTStage(current, top1)
    return results


def _first(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
