"""Quantization-aware training of a fake-quantized AdderNet (paper Sec. 4.1).

The paper's recipe: the full-precision recipe with lr 1e-4 and 50 epochs on CIFAR (lr 1e-3, 20
epochs on ImageNet); scales stay as calibrated, rounding passes gradients straight through (STE)
and the adder layers keep the AdderNet backward with its adaptive η scaling.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import batches, normalize, random_crop_flip
from ..evaluate import evaluate, show_progress


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


def qat(qmodel: nn.Module, dataset, normalization, config: QATConfig | None = None, device=None,
        progress: bool = True) -> list[dict]:
    """Fine-tune ``qmodel`` in place; returns the per-epoch log."""
    config = config or QATConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    qmodel.to(device)
    torch.manual_seed(config.seed)
    x, y = dataset.x_train, dataset.y_train
    if config.limit_train:
        x, y = x[: config.limit_train], y[: config.limit_train]
    opt = torch.optim.SGD(qmodel.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / config.epochs)))
    log, steps = [], 0
    mean, std = normalization
    for epoch in range(config.epochs):
        qmodel.train()
        gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        loss_sum = correct = seen = 0
        start = time.perf_counter()
        loader = batches(x, y, config.batch_size, shuffle=True, generator=gen, device=device)
        for xb, yb in tqdm(loader, desc=f"qat {epoch + 1}/{config.epochs}", leave=False,
                           disable=not show_progress(progress)):
            aug = torch.Generator(device=xb.device).manual_seed(config.seed * 1000 + epoch + steps)
            logits = qmodel(normalize(random_crop_flip(xb, generator=aug), mean, std))
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(qmodel.parameters(), config.clip_grad_norm)
            opt.step()
            steps += 1
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            if config.max_steps and steps >= config.max_steps:
                break
        sched.step()
        n_eval = config.eval_limit or len(dataset.y_test)
        result = evaluate(qmodel, dataset.x_test[:n_eval], dataset.y_test[:n_eval], normalization,
                          device=device, progress=progress)
        entry = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
                 "train_acc": 100.0 * correct / max(seen, 1), "test_top1": result.top1, "test_n": result.n,
                 "seconds": time.perf_counter() - start}
        log.append(entry)
        if config.log_path:
            Path(config.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(config.log_path, "a") as fh:
                fh.write(json.dumps({**entry, "config": asdict(config)} if epoch == 0 else entry) + "\n")
        if config.max_steps and steps >= config.max_steps:
            break
    qmodel.eval()
    return log
