"""Top-1/top-5 evaluation of a classifier on uint8 images, and paired comparison of two models.

``evaluate`` keeps every prediction, so two results on the same images can be compared image by
image with :func:`paired` (how many predictions a quantized model changes, and in which direction),
which says more than the difference of two accuracies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import batches, normalize
from .utils import progress_bar


@dataclass
class EvalResult:
    """Accuracies in percent over ``n`` images; ``predictions`` holds the top-1 class of each image."""

    top1: float
    top5: float
    n: int
    predictions: torch.Tensor = field(repr=False)
    seconds: float
    loss: float | None = None  # mean cross-entropy (a finer score than top-1 where top-1 saturates)

    def summary(self) -> dict:
        """The scalars, JSON-ready (predictions left out)."""
        return {"top1": self.top1, "top5": self.top5, "n": self.n, "seconds": self.seconds}


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def show_progress(progress: bool) -> bool:
    """Kept for callers of earlier versions: whether to show progress at all. The display itself
    (a bar on a terminal, one line per stage in a log) is :func:`adderquant.utils.progress_bar`'s."""
    return bool(progress)


def evaluate(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, normalization,
             batch_size: int = 500, device=None, progress: bool = False) -> EvalResult:
    """Evaluate ``model`` on uint8 NCHW images normalised with ``normalization = (mean, std)``.

    Runs under ``torch.inference_mode`` in eval mode (the model's mode is restored afterwards), on
    ``device`` (default: where the model's parameters are; the model is not moved). ``progress``:
    a bar on stderr (:func:`adderquant.utils.progress_bar`; off by default, the CLI turns it on).
    """
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"evaluate expects uint8 images, got {x_uint8.dtype}")
    if len(x_uint8) != len(y):
        raise ValueError(f"evaluate: {len(x_uint8)} images but {len(y)} labels")
    if len(y) == 0:
        raise ValueError("evaluate: no images")
    device = torch.device(device) if device is not None else _model_device(model)
    mean, std = normalization
    was_training = model.training
    model.eval()
    preds, correct1, correct5, loss_sum = [], 0, 0, 0.0
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            loader = batches(x_uint8, y, batch_size, shuffle=False, device=device)
            for xb, yb in progress_bar(loader, "eval", progress, total=len(loader)):
                logits = model(normalize(xb, mean, std))
                k = min(5, logits.shape[1])
                topk = logits.topk(k, dim=1).indices
                hits = topk.eq(yb[:, None])
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), yb, reduction="sum"))
                preds.append(topk[:, 0].cpu())
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    n = len(y)
    predictions = torch.cat(preds).to(torch.int64)
    return EvalResult(100.0 * correct1 / n, 100.0 * correct5 / n, n, predictions, seconds, loss_sum / n)


def paired(a: EvalResult, b: EvalResult, y: torch.Tensor) -> dict:
    """Compare ``b`` against ``a`` on the same images with labels ``y``.

    ``delta`` is ``b.top1 - a.top1`` in points; ``right_to_wrong`` counts images ``a`` classifies
    correctly and ``b`` does not, ``wrong_to_right`` the reverse, ``changed`` all images whose top-1
    class differs (including wrong → other wrong).
    """
    y = torch.as_tensor(y).cpu()
    pa, pb = a.predictions.cpu(), b.predictions.cpu()
    if not (len(pa) == len(pb) == len(y)):
        raise ValueError(f"paired: results over different images ({len(pa)}, {len(pb)} predictions, "
                         f"{len(y)} labels)")
    ra, rb = pa.eq(y), pb.eq(y)
    return {
        "n": len(y),
        "top1_a": a.top1,
        "top1_b": b.top1,
        "delta": b.top1 - a.top1,
        "right_to_wrong": int((ra & ~rb).sum()),
        "wrong_to_right": int((~ra & rb).sum()),
        "changed": int(pa.ne(pb).sum()),
    }


__all__ = ["EvalResult", "evaluate", "paired"]
