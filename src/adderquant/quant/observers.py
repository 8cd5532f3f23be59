"""Activation-range observers for calibration (paper Sec. 3.2, "Outliers Clamp for Activations").

``r_x = sorted(|X|)[ceil(α·(n−1))]`` over every input value the layer sees on the calibration set,
computed exactly: only the top ``n − ceil(α(n−1))`` magnitudes can matter, so the observer keeps a
running top-k (with ``n`` known from the calibration-set size) instead of every activation.

The authors' code instead takes, per calibration batch of n values, ``sorted(|X|)[int((round(n·α) − 1)·α)]``
and keeps the running maximum over batches (``batch_alpha``, mode ``batch_max``).
"""

from __future__ import annotations

import math

import torch


def percentile_index(n: int, alpha: float) -> int:
    """0-based index into the ascending sort: ``ceil(α·(n−1))``."""
    if n < 1:
        raise ValueError("no activations observed")
    return min(n - 1, math.ceil(alpha * (n - 1)))


def batch_percentile_index(n: int, alpha: float) -> int:
    """The authors' per-batch index into the ascending sort: ``int((round(n·α) − 1)·α)`` (in [0, n−1])."""
    if n < 1:
        raise ValueError("no activations observed")
    return min(n - 1, max(0, int((round(n * alpha) - 1) * alpha)))


class AbsRangeObserver:
    """Tracks max|X| and the exact α-percentile of |X| for one layer's input."""

    def __init__(self, alpha: float, total: int | None = None, batch_alpha: float | None = None):
        self.alpha = alpha
        self.batch_alpha = batch_alpha  # also track the authors' running per-batch maximum
        self.batch_max: float | None = None
        self.total = total  # values the layer will see in all; None → keep every value
        self.count = 0
        self.max = 0.0
        self.min = float("inf")  # of X itself: ≥ 0 means the layer only ever sees non-negative inputs
        self._top: torch.Tensor | None = None

    def _keep(self) -> int | None:
        if self.total is None:
            return None
        return self.total - percentile_index(self.total, self.alpha) + 1

    def observe(self, x: torch.Tensor) -> None:
        if x.numel():
            self.min = min(self.min, float(x.detach().min()))
        if self.batch_alpha is not None and x.numel():
            a = x.detach().abs().flatten().float()
            v = float(torch.kthvalue(a.cpu(), batch_percentile_index(a.numel(), self.batch_alpha) + 1).values)
            self.batch_max = v if self.batch_max is None else max(self.batch_max, v)
        a = x.detach().abs().flatten().float().cpu()
        self.count += a.numel()
        self.max = max(self.max, float(a.max())) if a.numel() else self.max
        merged = a if self._top is None else torch.cat([self._top, a])
        keep = self._keep()
        self._top = merged if keep is None or merged.numel() <= keep else torch.topk(merged, keep).values

    def percentile(self, alpha: float | None = None) -> float:
        """Exact ``sorted|X|[ceil(α(n−1))]`` for any α ≥ the α the observer was built with."""
        alpha = self.alpha if alpha is None else alpha
        n = self.count
        if self.total is not None and self.total != n:
            raise RuntimeError(f"observer expected {self.total} values, saw {n}")
        if alpha < self.alpha and self.total is not None:
            raise ValueError(f"observer kept the top values for α ≥ {self.alpha}, asked for {alpha}")
        idx = percentile_index(n, alpha)
        # rank from the top (0-based) of the wanted value
        from_top = n - 1 - idx
        top = torch.sort(self._top, descending=True).values
        return float(top[from_top])

    def range(self, clamp: bool, mode: str, alpha: float | None = None) -> float:
        """The activation range r_x: percentile / α·max / per-batch maximum when clamping outliers,
        else max|X|."""
        alpha = self.alpha if alpha is None else alpha
        if not clamp:
            return self.max
        if mode == "batch_max":
            if self.batch_alpha is None or self.batch_max is None or alpha != self.batch_alpha:
                raise ValueError(f"observer tracked no per-batch maximum for α = {alpha} "
                                 f"(calibrate with act_clamp_mode='batch_max')")
            return self.batch_max
        return self.percentile(alpha) if mode == "percentile" else alpha * self.max
