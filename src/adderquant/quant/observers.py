"""Activation-range observers for calibration (paper Sec. 3.2, "Outliers Clamp for Activations").

``r_x = sorted(|X|)[ceil(α·(n−1))]`` over every input value the layer sees on the calibration set,
computed exactly: only the top ``n − ceil(α(n−1))`` magnitudes can matter, so the observer keeps a
running top-k instead of every activation. Memory is bounded either way:

- calibration images as one tensor: ``n`` is known from the set's size, so exactly the top
  ``n − ceil(α(n−1)) + 1`` magnitudes are kept (what the published numbers were computed with);
- a ``DataLoader``: its sampler's length bounds ``n`` from above (``bound``), and keeping the top
  values for that bound is exact for any smaller ``n`` (the count needed never shrinks as ``n`` grows);
- any other iterable (a generator): ``n`` is known only at the end, so the observer keeps the top
  ``max_kept`` magnitudes (default :data:`DEFAULT_MAX_KEPT`, 16 MiB of float32 per layer) and stays
  exact while the percentile needs no more than that — ``(1 − α)·n + 1 ≤ max_kept``, i.e. up to about
  4·10⁹ input values per layer at α = 0.999 (250,000 CIFAR images at the first stage of a ResNet-20).

Past what it keeps an observer raises at once (``ValueError``) rather than return an approximation.
The maximum, the minimum and the authors' per-batch statistic are running values in every case.

The authors' code instead takes, per calibration batch of n values, ``sorted(|X|)[int((round(n·α) − 1)·α)]``
and keeps the running maximum over batches (``batch_alpha``, mode ``batch_max``).
"""

from __future__ import annotations

import math

import torch

DEFAULT_MAX_KEPT = 2**22  # magnitudes an observer keeps for an iterable of unknown length (module docstring)


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

    def __init__(self, alpha: float, total: int | None = None, batch_alpha: float | None = None,
                 max_kept: int = DEFAULT_MAX_KEPT):
        self.alpha = alpha
        self.batch_alpha = batch_alpha  # also track the authors' running per-batch maximum
        self.batch_max: float | None = None
        self.total = total  # values the layer will see in all; None → unknown: keep the top max_kept
        self.max_kept = max_kept
        self.bound: int | None = None  # total None: an upper bound of the values to come, when known
        self.name = ""  # for messages: the layer observed
        self.count = 0
        self.max = 0.0
        self.min = float("inf")  # of X itself: ≥ 0 means the layer only ever sees non-negative inputs
        self._top: torch.Tensor | None = None

    def _keep(self) -> int:
        if self.total is None:
            if self.bound is None:
                return self.max_kept
            return min(self.max_kept, self.bound - percentile_index(self.bound, self.alpha) + 1)
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
        keep = self._keep()
        if self.total is None:
            needed = self.count - percentile_index(self.count, self.alpha)
            if needed > keep:
                raise ValueError(f"calibration: the exact {self.alpha} percentile of the {self.count:,} input values "
                                 f"{self.name or 'a layer'} has seen needs their top {needed:,} magnitudes, more than "
                                 f"the {keep:,} an observer keeps for an iterable (max_kept, or what the loader's "
                                 "length allows): pass fewer images, a larger alpha, or the images as one tensor")
            if self._top is not None and self._top.numel() >= keep:
                a = a[a >= self._top.min()]  # below the kept minimum: can never enter the top `keep`
        merged = a if self._top is None else torch.cat([self._top, a])
        self._top = merged if merged.numel() <= keep else torch.topk(merged, keep).values

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
        if self._top is None or from_top >= self._top.numel():
            raise ValueError(f"observer kept the top {0 if self._top is None else self._top.numel():,} of {n:,} "
                             f"values, too few for the {alpha} percentile")
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
