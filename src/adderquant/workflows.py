"""Application workflows: one config in, one result out, the same numbers for the CLI, scripts and
notebooks. ``ptq_run`` = calibrate on training images, quantize, (QAT), evaluate paired with full
precision on the test split."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from torch import nn

from .data import calibration_indices, normalize
from .evaluate import evaluate, paired
from .quant import QuantConfig, QuantResult, quantize
from .quant.qat import QATConfig, qat
from .utils import default_device


@dataclass(frozen=True)
class PTQRun:
    """What a PTQ run does besides the quantizer's own switches: which calibration images, how much
    of the test split, optional QAT, where."""

    quant: QuantConfig = field(default_factory=QuantConfig.ours_fast)  # the fast path
    calib_size: int = 1024
    seed: int = 0  # chooses the calibration images
    limit: int | None = None  # evaluate the first N test images only
    qat: QATConfig | None = None
    device: str | None = None

    def __post_init__(self):
        if isinstance(self.calib_size, bool) or not isinstance(self.calib_size, int) or self.calib_size < 1:
            raise ValueError(f"calib_size must be a positive integer, got {self.calib_size!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1, got {self.limit}")


@dataclass
class PTQReport:
    """``model``: the quantized (and fine-tuned) network; ``quant``: how it was made; ``summary``: the
    JSON-ready record (accuracy, paired comparison with FP, configuration, timings)."""

    model: nn.Module
    quant: QuantResult
    summary: dict


def ptq_run(ckpt, dataset, run: PTQRun | None = None, *, progress: bool = False) -> PTQReport:
    """Quantize ``ckpt.model`` on ``run.calib_size`` training images and evaluate both on the test split.

    The summary holds accuracy, the paired comparison with full precision (delta, changed predictions),
    the configuration and timings; with QAT also the PTQ accuracy it started from (``ptq_top1``) and
    the per-epoch log.
    """
    run = run or PTQRun()
    start = time.perf_counter()
    device = default_device(run.device)
    idx = calibration_indices(dataset, run.calib_size, run.seed)
    calib = normalize(dataset.x_train[idx], *ckpt.normalization).to(device)
    model = ckpt.model.to(device).eval()
    n = len(dataset.x_test) if run.limit is None else min(run.limit, len(dataset.x_test))
    x_test, y_test = dataset.x_test[:n], dataset.y_test[:n]
    fp = evaluate(model, x_test, y_test, ckpt.normalization, device=device, progress=progress)
    t0 = time.perf_counter()
    result = quantize(model, calib, run.quant, labels=dataset.y_train[idx].to(device), progress=progress)
    ptq_seconds = time.perf_counter() - t0
    qat_log, ptq_top1 = [], None
    if run.qat is not None:
        ptq_top1 = evaluate(result.model, x_test, y_test, ckpt.normalization, device=device, progress=progress).top1
        qat_log = qat(result.model, dataset, ckpt.normalization, run.qat, device=device, progress=progress,
                      float_model=model)
    q = evaluate(result.model, x_test, y_test, ckpt.normalization, device=device, progress=progress)
    config = result.config
    method = f"qssf ({config.method})" if run.quant.method == "qssf" else config.method
    summary = {
        "model": ckpt.name, "method": method, "bits": config.bits, "groups": config.groups, "alpha": config.alpha,
        "calib_size": run.calib_size, "fp_top1": fp.top1, "top1": q.top1, "top5": q.top5, "n": q.n,
        **{k: v for k, v in paired(fp, q, y_test).items() if k not in ("n", "top1_a", "top1_b")},
        "qat_epochs": run.qat.epochs if run.qat else 0, "ptq_top1": ptq_top1, "qat_log": qat_log,
        "config": asdict(config), "qssf_calibration_scores": result.calibration_scores,
        "ptq_seconds": ptq_seconds, "eval_seconds": q.seconds, "seconds": time.perf_counter() - start,
    }
    return PTQReport(result.model, result, summary)


__all__ = ["PTQReport", "PTQRun", "ptq_run"]
