"""Activation-range observers for calibration (paper Sec. 3.2, "Outliers Clamp for Activations").

``r_x = sorted(|X|)[ceil(α·(n−1))]`` over every input value the layer sees on the calibration set,
computed exactly: only the top ``n − ceil(α(n−1))`` magnitudes can matter, so the observer keeps a
running top-k (with ``n`` known from the calibration-set size) instead of every activation.
"""

from __future__ import annotations

import math

import torch


def percentile_index(n: int, alpha: float) -> int:
    """0-based index into the ascending sort: ``ceil(α·(n−1))``."""
    if n < 1:
        raise ValueError("no activations observed")
    return min(n - 1, math.ceil(alpha * (n - 1)))


class AbsRangeObserver:
    """Tracks max|X| and the exact α-percentile of |X| for one layer's input."""

    def __init__(self, alpha: float, total: int | None = None):
        self.alpha = alpha
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
        """The activation range r_x: percentile / α·max when clamping outliers, else max|X|."""
        alpha = self.alpha if alpha is None else alpha
        if not clamp:
            return self.max
        return self.percentile(alpha) if mode == "percentile" else alpha * self.max
