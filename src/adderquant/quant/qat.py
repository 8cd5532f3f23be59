"""Quantization-aware training of a fake-quantized AdderNet (paper Sec. 4.1, and beyond it).

The paper's recipe: the full-precision recipe with lr 1e-4 and 50 epochs on CIFAR (lr 1e-3, 20
epochs on ImageNet); scales stay as calibrated, rounding passes gradients straight through (STE)
and the adder layers keep the AdderNet backward with its adaptive η scaling.

What this module adds, each a :class:`QATConfig` field:

- ``latent`` (default on, needs the full-precision model): every adder layer trains its *unclamped*
  weights, the straight-through estimator through the Theorem-1 fold
  (:meth:`QuantAdderConv2d.unfold`). Without it QAT of the unsigned-grid presets diverges: the
  clamped weights' HardTanh input gradient grows ~1.3× per adder layer towards the input
  (``scripts/qat_gradient_norms.py``).
- ``distill``: knowledge distillation from the full-precision model (Hinton et al. 2015), loss
  ``(1 − α)·CE + α·T²·KL(softmax(t/T) ‖ softmax(s/T))`` on the same augmented batch.
- ``schedule="step"``: the cosine decay stepped after every batch instead of every epoch.
- ``range_lr``: the shared ranges learn (LSQ, Esser et al. 2020; one parameter per set of groups that
  share a range, so the one-shared-scale constraint holds), with their own learning rate and no weight
  decay (:meth:`QuantAdderConv2d.learn_ranges`).
- ``bn_reestimate``: exact BatchNorm statistics re-estimated on that many training batches at the end.
- ``freeze_bn``: the BatchNorms normalise with the running statistics the PTQ model came with (their
  affine parameters still train), so every step trains the function that is evaluated and exported.
  In training mode they would switch to batch statistics, which amounts to re-estimating them: on
  held-out images that is worse than the corrected statistics ``ours`` chooses at 8–4 bits
  (docs/results/ptq_select.md), and the first epoch would start by giving that up.
- ``holdout``: training images kept out of QAT and scored after every epoch (the validation score
  that chooses recipes; the test split only reports).
- ``keep_best``: hand back the state, the quantized starting point included, with the best held-out
  score (top-1, ties: lower loss, then the earlier state; a non-finite loss never wins), so
  fine-tuning never returns a model that is worse on held-out images than the one it was given.
- ``checkpoint``: the whole state written atomically after every epoch; ``resume`` continues from it
  to the same result as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import batches, normalize, normalized_black
from ..evaluate import evaluate, show_progress
from ..loop import cosine_schedule, crop_flip, epoch_summary, sgd_epoch
from ..utils import default_device, json_dumps
from .adder_layer import QuantAdderConv2d
from .bn import reestimate_bn


@dataclass
class QATConfig:
    epochs: int = 50
    lr: float = 3e-4  # with freeze_bn; scripts/qat_select.py (docs/results/qat_select_4bit_frozen_bn.json)
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    limit_train: int | None = None  # first N training images (smoke runs, tests)
    max_steps: int | None = None  # stop after this many optimizer steps in all
    eval_limit: int | None = None  # test images evaluated after each epoch (None: all; 0: none)
    log_path: str | None = None  # JSON lines, one object per epoch
    clip_grad_norm: float | None = None  # total gradient norm cap (None: the paper's recipe, no cap)
    latent: bool = True  # STE through the weight fold (needs the float model); False: the paper's literal QAT
    distill: float = 0.5  # weight α of the distillation term (0: plain cross-entropy); scripts/qat_select.py
    temperature: float = 4.0  # distillation temperature T
    schedule: str = "step"  # cosine decay stepped per "step" or per "epoch" (the paper's)
    range_lr: float = 0.0  # learning rate of the shared ranges (LSQ; 0: frozen as calibrated, the paper's)
    bn_reestimate: int = 0  # batches of training images for exact BN statistics at the end (0: off)
    freeze_bn: bool = True  # BatchNorms keep the PTQ model's running statistics (affine parameters train)
    holdout: int = 0  # training images held out of QAT and scored after every epoch
    keep_best: bool = False  # return the best held-out state, the PTQ start included (needs holdout)
    checkpoint: str | None = None  # file for the state after every epoch (atomic)
    resume: bool = False  # continue from ``checkpoint``

    def __post_init__(self):
        problems = []
        if self.epochs < 1:
            problems.append(f"QAT epochs must be ≥ 1, got {self.epochs}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            problems.append(f"QAT lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 2:
            problems.append(f"QAT batch_size must be ≥ 2 (BatchNorm), got {self.batch_size}")
        if self.limit_train is not None and self.limit_train < 2:
            problems.append(f"QAT limit_train must be ≥ 2 images, got {self.limit_train}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            problems.append(f"clip_grad_norm must be a finite number > 0, got {self.clip_grad_norm}")
        if not (math.isfinite(self.distill) and 0.0 <= self.distill <= 1.0):
            problems.append(f"distill must be a weight in [0, 1], got {self.distill}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.schedule not in ("epoch", "step"):
            problems.append(f"schedule must be 'epoch' or 'step', got {self.schedule!r}")
        if not (math.isfinite(self.range_lr) and self.range_lr >= 0):
            problems.append(f"range_lr must be a finite number ≥ 0, got {self.range_lr}")
        if self.range_lr > 0 and not self.latent:
            problems.append("learnable ranges (range_lr > 0) need latent weights: the fold follows the range")
        if self.bn_reestimate < 0 or self.holdout < 0:
            problems.append("bn_reestimate and holdout must be ≥ 0")
        if self.keep_best and not self.holdout:
            problems.append("keep_best chooses on held-out images: it needs holdout > 0")
        if self.resume and not self.checkpoint:
            problems.append("resume needs a checkpoint path")
        if problems:
            raise ValueError("; ".join(problems))


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """``(1 − α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``, batch mean; the T² keeps the soft
    term's gradient on the scale of the hard one (Hinton et al. 2015)."""
    hard = F.cross_entropy(logits, labels)
    if alpha == 0:
        return hard
    t = temperature
    soft = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
                    log_target=True, reduction="batchmean")
    return (1 - alpha) * hard + alpha * t * t * soft


def adder_layers(model: nn.Module) -> dict[str, QuantAdderConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantAdderConv2d)}


def unfold_weights(qmodel: nn.Module, float_model: nn.Module) -> int:
    """Give every uniform-grid adder layer of ``qmodel`` the unclamped weights of the same-named layer
    of ``float_model`` (QAT's latent weights); returns how many layers were unfolded."""
    source = dict(float_model.named_modules())
    done = 0
    for name, layer in adder_layers(qmodel).items():
        if layer.grid != "uniform":
            continue
        if name not in source or getattr(source[name], "weight", None) is None:
            raise ValueError(f"the float model has no layer {name!r} to take latent weights from")
        layer.unfold(source[name].weight.detach().to(layer.weight.device))
        done += 1
    return done


def _learn_ranges(qmodel: nn.Module) -> list[QuantAdderConv2d]:
    layers = [m for m in adder_layers(qmodel).values() if m.latent]
    for m in layers:
        m.learn_ranges()
    return layers


def fold_weights(qmodel: nn.Module) -> None:
    for layer in adder_layers(qmodel).values():
        layer.fold()


def holdout_split(n: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of ``n`` training indices into (train, held-out); the held-out part is the last
    ``holdout`` of one permutation, so it is the same for every recipe with the same seed."""
    if holdout >= n:
        raise ValueError(f"holdout of {holdout} images leaves nothing of {n} to train on")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    return perm[: n - holdout].sort().values, perm[n - holdout:].sort().values


def _save_state(path: str, state: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def qat(qmodel: nn.Module, dataset, normalization, config: QATConfig | None = None, device=None,
        progress: bool = False, float_model: nn.Module | None = None) -> list[dict]:
    """Fine-tune ``qmodel`` in place; returns the per-epoch log.

    ``float_model`` (the model ``qmodel`` was quantized from) supplies the latent weights and the
    distillation teacher; it is not changed. On return ``qmodel`` is in evaluation mode with folded
    weights, ready for :func:`adderquant.integer.export`.
    """
    config = config or QATConfig()
    device = default_device(device)
    needs_float = config.latent or config.distill > 0
    if needs_float and float_model is None:
        raise ValueError("QAT with latent weights or distillation needs the float model (float_model=...); "
                         "pass latent=False, distill=0 for the paper's literal QAT")
    check_qat_files(config)
    qmodel.to(device)
    if config.latent:
        unfold_weights(qmodel, float_model)
    learning = _learn_ranges(qmodel) if config.range_lr > 0 else []
    ranges = [m.range_values for m in learning]
    teacher = None
    if config.distill > 0:
        teacher = float_model.to(device).eval()  # run under no_grad by the loop
    torch.manual_seed(config.seed)
    x, y = dataset.x_train, dataset.y_train
    if config.limit_train:
        x, y = x[: config.limit_train], y[: config.limit_train]
    x_val = y_val = None
    if config.holdout:
        keep, held = holdout_split(len(y), config.holdout, config.seed)
        x_val, y_val, x, y = x[held], y[held], x[keep], y[keep]
    learned = {id(r) for r in ranges}
    groups = [{"params": [q for q in qmodel.parameters() if id(q) not in learned]}]
    if ranges:
        groups.append({"params": ranges, "lr": config.range_lr, "weight_decay": 0.0})
    opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(y) / config.batch_size)
    sched = cosine_schedule(opt, config.epochs * (per_epoch if config.schedule == "step" else 1))
    log, steps, start_epoch, best = [], 0, 0, None
    if config.resume and Path(config.checkpoint).exists():
        state = torch.load(config.checkpoint, map_location=device, weights_only=True)
        if state["config"] != _resumable(config):
            raise ValueError(f"{config.checkpoint} was written by a different QAT configuration; "
                             "resume with the same options or start afresh")
        qmodel.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        log, steps, start_epoch = state["log"], state["steps"], state["epoch"]
        best = state.get("best")
    if config.keep_best and best is None:
        r = evaluate(qmodel, x_val, y_val, normalization, device=device, progress=progress)
        best = _snapshot(qmodel, 0, r.top1, r.loss)
    loss_fn = None
    if teacher is not None:
        def loss_fn(logits, labels, teacher_logits):
            return distillation_loss(logits, labels, teacher_logits, config.distill, config.temperature)
    for epoch in range(start_epoch, config.epochs):
        gen = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        loader = batches(x, y, config.batch_size, shuffle=True, generator=gen, device=device)
        extra = {"loss_fn": loss_fn, "teacher": teacher} if teacher is not None else {}
        stats = sgd_epoch(qmodel, opt, loader, normalization, step=steps, max_steps=config.max_steps,
                          augment=crop_flip(seed=lambda s, e=epoch: config.seed * 1000 + e + s),
                          clip_grad_norm=config.clip_grad_norm, desc=f"qat {epoch + 1}/{config.epochs}",
                          scheduler=sched if config.schedule == "step" else None, frozen_bn=config.freeze_bn,
                          progress=show_progress(progress), **extra)
        steps = stats["step"]
        if config.schedule == "epoch":
            sched.step()
        entry = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **epoch_summary(stats),
                 "seconds": stats["seconds"]}
        if learning:  # how far the learned ranges moved: min and max of r / r_calibrated (the stored buffer)
            moved = torch.cat([m.current_ranges() / m.ranges for m in learning])
            entry["range_ratio"] = [float(moved.min()), float(moved.max())]
        last = epoch + 1 == config.epochs or bool(config.max_steps and steps >= config.max_steps)
        if last and config.bn_reestimate:
            _reestimate(qmodel, x, config, normalization, device)
            entry["bn_reestimated"] = config.bn_reestimate
        entry.update(_scores(qmodel, dataset, normalization, x_val, y_val, config, device, progress))
        if config.keep_best:
            if epoch == 0:  # best is still the start: a checkpoint exists only after an epoch
                entry.update(start_holdout_top1=best["top1"], start_holdout_loss=best["loss"])
            better = (entry["holdout_top1"], -entry["holdout_loss"]) > (best["top1"], -best["loss"])
            if better and math.isfinite(entry["holdout_loss"]):  # a diverged state never wins
                best = _snapshot(qmodel, epoch + 1, entry["holdout_top1"], entry["holdout_loss"])
            entry["best_epoch"] = best["epoch"]
        log.append(entry)
        if config.log_path:
            Path(config.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(config.log_path, "a") as fh:
                fh.write(json_dumps({**entry, "config": asdict(config)} if epoch == 0 else entry) + "\n")
        if config.checkpoint:
            _save_state(config.checkpoint, {"epoch": epoch + 1, "steps": steps, "log": log,
                                            "model": qmodel.state_dict(), "optimizer": opt.state_dict(),
                                            "scheduler": sched.state_dict(), "config": _resumable(config),
                                            "best": best})
        if last:
            break
    if best is not None and log and best["epoch"] != log[-1]["epoch"]:
        qmodel.load_state_dict(best["model"])
    if config.latent:
        fold_weights(qmodel)
    qmodel.eval()
    return log


def _snapshot(qmodel: nn.Module, epoch: int, top1: float, loss: float) -> dict:
    """What ``keep_best`` holds (and the checkpoint stores): a copy of the state and its held-out score."""
    return {"epoch": epoch, "top1": top1, "loss": loss,
            "model": {k: v.detach().clone() for k, v in qmodel.state_dict().items()}}


def check_qat_files(config: QATConfig) -> None:
    """Refuse, before any work, a fresh run whose checkpoint or log file already exists: a finished or
    interrupted run is continued with ``resume``, never overwritten silently."""
    if config.resume:
        return
    for path in (config.checkpoint, config.log_path):
        if path and Path(path).exists():
            raise FileExistsError(f"{path} exists (an earlier QAT run): resume it (--qat-resume) or remove the file")


def _resumable(config: QATConfig) -> dict:
    """The options a resumed run must share with the one that wrote the checkpoint."""
    return {k: v for k, v in asdict(config).items() if k not in ("resume", "log_path", "checkpoint", "eval_limit")}


def _reestimate(qmodel, x, config, normalization, device) -> None:
    gen = torch.Generator().manual_seed(config.seed + 77)
    idx = torch.randperm(len(x), generator=gen)[: config.bn_reestimate * config.batch_size]
    images = normalize(x[idx], *normalization).to(device)
    reestimate_bn(qmodel, images, config.bn_reestimate, batch_size=config.batch_size, seed=config.seed,
                  fill=normalized_black(*normalization))  # the training crops' padding


def _scores(qmodel, dataset, normalization, x_val, y_val, config, device, progress) -> dict:
    out = {}
    if x_val is not None:
        r = evaluate(qmodel, x_val, y_val, normalization, device=device, progress=progress)
        out.update(holdout_top1=r.top1, holdout_loss=r.loss, holdout_n=r.n)
    n_eval = len(dataset.y_test) if config.eval_limit is None else config.eval_limit
    if n_eval:
        r = evaluate(qmodel, dataset.x_test[:n_eval], dataset.y_test[:n_eval], normalization, device=device,
                     progress=progress)
        out.update(test_top1=r.top1, test_n=r.n, seconds_eval=r.seconds)
    return out
