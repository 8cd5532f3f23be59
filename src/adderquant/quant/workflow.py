"""The quantize command as one API call: load, calibrate, quantize, (QAT), evaluate paired with FP.

Kept out of the CLI so that scripts and notebooks get the same numbers as ``adderquant quantize``.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ..data import calibration_indices, normalize
from ..evaluate import evaluate, paired
from . import quantize
from .config import QuantConfig, preset


def ptq_run(ckpt, dataset, *, bits: int = 4, method: str = "paper", groups: int | None = None,
            alpha: float | None = None, calib_size: int = 1024, seed: int = 0, quantize_first_last: bool = False,
            lossless_act_clamp: bool | None = None, qat_epochs: int = 0, qat_lr: float = 1e-4,
            qat_limit_train: int | None = None, qat_clip_grad_norm: float | None = None, limit: int | None = None,
            device=None, progress: bool = True):
    """Quantize ``ckpt.model`` on ``calib_size`` training images and evaluate both on the test split.

    Returns ``(qmodel, summary)``; ``summary`` holds accuracy, the paired comparison with full
    precision (delta, changed predictions), the configuration and timings; with QAT also the PTQ
    accuracy it started from (``ptq_top1``) and the per-epoch log.
    """
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {k: v for k, v in {"groups": groups, "alpha": alpha, "lossless_act_clamp": lossless_act_clamp,
                                   "quantize_first_last": quantize_first_last or None}.items() if v is not None}
    idx = calibration_indices(dataset, calib_size, seed)
    mean, std = ckpt.normalization
    calib = normalize(dataset.x_train[idx], mean, std).to(device)
    model = ckpt.model.to(device).eval()
    n = len(dataset.x_test) if limit is None else min(limit, len(dataset.x_test))
    x_test, y_test = dataset.x_test[:n], dataset.y_test[:n]
    fp = evaluate(model, x_test, y_test, ckpt.normalization, device=device, progress=progress)
    t0 = time.perf_counter()
    if method == "qssf":
        qmodel = quantize(model, calib, bits, method="qssf", labels=dataset.y_train[idx].to(device), progress=progress)
        if overrides:
            raise ValueError("qssf takes no --groups/--alpha/--lossless-act-clamp: it is one scale, no clamps")
    else:
        qmodel = quantize(model, calib, config=preset(method, bits, **overrides), progress=progress)
    ptq_seconds = time.perf_counter() - t0
    qat_log, ptq_top1 = [], None
    if qat_epochs:
        from .qat import QATConfig, qat

        ptq_top1 = evaluate(qmodel, x_test, y_test, ckpt.normalization, device=device, progress=progress).top1
        qat_log = qat(qmodel, dataset, ckpt.normalization,
                      QATConfig(epochs=qat_epochs, lr=qat_lr, limit_train=qat_limit_train, eval_limit=n,
                                clip_grad_norm=qat_clip_grad_norm),
                      device=device, progress=progress)
    q = evaluate(qmodel, x_test, y_test, ckpt.normalization, device=device, progress=progress)
    config: QuantConfig = qmodel.quant_config if hasattr(qmodel, "quant_config") else preset(method, bits)
    summary = {
        "model": ckpt.name, "method": config.method if method != "qssf" else f"qssf ({config.method})",
        "bits": bits, "groups": config.groups, "alpha": config.alpha, "calib_size": calib_size,
        "fp_top1": fp.top1, "top1": q.top1, "top5": q.top5, "n": q.n, **{k: v for k, v in paired(fp, q, y_test).items()
                                                                         if k not in ("n", "top1_a", "top1_b")},
        "qat_epochs": qat_epochs, "ptq_top1": ptq_top1, "qat_log": qat_log, "config": asdict(config),
        "qssf_calibration_scores": getattr(qmodel, "qssf_calibration_scores", None),
        "ptq_seconds": ptq_seconds, "eval_seconds": q.seconds, "seconds": time.perf_counter() - start,
    }
    return qmodel, summary
