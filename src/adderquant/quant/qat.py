"""Quantization-aware training of a fake-quantized AdderNet (paper Sec. 4.1).

The paper's recipe: the full-precision recipe with lr 1e-4 and 50 epochs on CIFAR (lr 1e-3, 20
epochs on ImageNet); scales stay as calibrated, rounding passes gradients straight through (STE)
and the adder layers keep the AdderNet backward with its adaptive η scaling.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import batches
from ..evaluate import evaluate, show_progress
from ..loop import cosine_schedule, crop_flip, epoch_summary, sgd_epoch
from ..utils import default_device


@dataclass
class QATConfig:
    epochs: int = 50
    lr: float = 1e-4
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    limit_train: int | None = None  # first N training images (smoke runs, tests)
    max_steps: int | None = None  # stop after this many optimizer steps in all
    eval_limit: int | None = None  # test images evaluated after each epoch (None: all)
    log_path: str | None = None  # JSON lines, one object per epoch
    clip_grad_norm: float | None = None  # total gradient norm cap (None: the paper's recipe, no cap)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"QAT epochs must be ≥ 1, got {self.epochs}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"QAT lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 2:
            raise ValueError(f"QAT batch_size must be ≥ 2 (BatchNorm), got {self.batch_size}")
        if self.limit_train is not None and self.limit_train < 2:
            raise ValueError(f"QAT limit_train must be ≥ 2 images, got {self.limit_train}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a finite number > 0, got {self.clip_grad_norm}")


def qat(qmodel: nn.Module, dataset, normalization, config: QATConfig | None = None, device=None,
        progress: bool = False) -> list[dict]:
    """Fine-tune ``qmodel`` in place; returns the per-epoch log."""
    config = config or QATConfig()
    device = default_device(device)
    qmodel.to(device)
    torch.manual_seed(config.seed)
    x, y = dataset.x_train, dataset.y_train
    if config.limit_train:
        x, y = x[: config.limit_train], y[: config.limit_train]
    opt = torch.optim.SGD(qmodel.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = cosine_schedule(opt, config.epochs)  # stepped once per epoch
    log, steps = [], 0
    for epoch in range(config.epochs):
        gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        loader = batches(x, y, config.batch_size, shuffle=True, generator=gen, device=device)
        stats = sgd_epoch(qmodel, opt, loader, normalization, step=steps, max_steps=config.max_steps,
                          augment=crop_flip(seed=lambda s, e=epoch: config.seed * 1000 + e + s),
                          clip_grad_norm=config.clip_grad_norm, desc=f"qat {epoch + 1}/{config.epochs}",
                          progress=show_progress(progress))
        steps = stats["step"]
        sched.step()
        n_eval = config.eval_limit or len(dataset.y_test)
        result = evaluate(qmodel, dataset.x_test[:n_eval], dataset.y_test[:n_eval], normalization,
                          device=device, progress=progress)
        entry = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **epoch_summary(stats),
                 "test_top1": result.top1, "test_n": result.n, "seconds": stats["seconds"] + result.seconds}
        log.append(entry)
        if config.log_path:
            Path(config.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(config.log_path, "a") as fh:
                fh.write(json.dumps({**entry, "config": asdict(config)} if epoch == 0 else entry) + "\n")
        if config.max_steps and steps >= config.max_steps:
            break
    qmodel.eval()
    return log
