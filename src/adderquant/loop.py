"""The one SGD loop: training from scratch (``train``), QAT (``quant.qat``) and APoT QAT
(``quant.apot_qat``) all step through :func:`sgd_epoch`, and their one learning-rate schedule is
:func:`cosine_schedule`.

Callers keep what differs between them outside the loop: which batches an epoch sees (their
shuffling and sharding streams), how a batch is augmented (a function of the batch and the global
step, so each stream is reproducible) and when the schedule steps (per epoch or per step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import normalize, random_crop_flip
from .utils import progress_bar


def cosine_schedule(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr = base · ½(1 + cos(π·t/total))`` for every parameter group, ``t`` counting scheduler steps."""
    if total < 1:
        raise ValueError(f"the schedule needs at least one step, got {total}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))


def crop_flip(padding: int = 4, *, generator: torch.Generator | None = None,
              seed: Callable[[int], int] | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Random crop (``padding`` zero pixels) + horizontal flip of a uint8 batch, drawn from one
    ``generator`` for the whole epoch, or from a fresh generator seeded by ``seed(step)`` per batch."""
    def augment(xb: torch.Tensor, step: int) -> torch.Tensor:
        gen = generator if seed is None else torch.Generator(device=xb.device).manual_seed(seed(step))
        return random_crop_flip(xb, padding, generator=gen)
    return augment


def sgd_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, normalization, *,
              augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None, step: int = 0,
              scheduler=None, clip_grad_norm: float | None = None, max_steps: int | None = None,
              amp: bool = False, loss_fn: Callable = F.cross_entropy, teacher: nn.Module | None = None,
              frozen_bn: bool = False, desc: str = "train", progress: bool = False) -> dict:
    """One pass over ``batches`` (uint8 images, labels) in training mode: augment, normalise, forward,
    loss, backward, optional gradient-norm cap, optimizer step; ``scheduler`` (if given) steps after
    every batch. With a ``teacher`` the loss is ``loss_fn(logits, labels, teacher_logits)``, the
    teacher run without gradients on the same augmented batch. Batches of one image are skipped
    (BatchNorm cannot train on them); with ``frozen_bn`` the BatchNorms stay in evaluation mode (they
    normalise with their running statistics and leave them alone; their affine parameters still
    train). Stops early when the global ``step`` reaches ``max_steps``. Returns the epoch's mean loss,
    accuracy, images, steps done so far (global) and seconds; the sums stay on the device (no sync per
    step).
    """
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    device = next(model.parameters()).device
    mean, std = normalization
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, start = 0, time.perf_counter()
    bar = progress_bar(batches, desc, progress, total=len(batches) if hasattr(batches, "__len__") else None)
    for xb, yb in bar:
        if max_steps is not None and step >= max_steps:
            break
        if len(xb) < 2:
            continue
        inputs = normalize(augment(xb, step) if augment is not None else xb, mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(inputs)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
        if teacher is None:
            loss = loss_fn(logits.float(), yb)
        else:
            loss = loss_fn(logits.float(), yb, teacher_logits.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step += 1
        loss_sum += loss.detach().double() * len(yb)
        correct += logits.detach().argmax(1).eq(yb).sum()
        seen += len(yb)
        if not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return {"loss_sum": loss_sum, "correct": correct, "images": seen, "step": step,
            "seconds": time.perf_counter() - start}


def epoch_summary(stats: dict) -> dict:
    """Mean loss and accuracy (%) of an :func:`sgd_epoch` result (summed over ranks beforehand if needed)."""
    n = max(stats["images"], 1)
    return {"train_loss": float(stats["loss_sum"]) / n, "train_acc": 100.0 * float(stats["correct"]) / n}


__all__ = ["cosine_schedule", "crop_flip", "epoch_summary", "sgd_epoch"]
