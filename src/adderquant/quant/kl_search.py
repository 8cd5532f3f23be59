"""Loss-aware range search (``QuantConfig.range_search_metric="kl"``): each adder layer's activation
range chosen by what the whole model then predicts, not by the layer's own output error.

Why: the MSE search scores a candidate range by one layer's output error on float inputs, but which
error the prediction can afford is decided downstream — by the BatchNorm that rescales a channel, the
ReLU that cuts it, the residual sum, the classifier — and on held-out images the layer MSE and the
model's KL disagree (at 4 bits the groups formed by the search have the lower MSE and the higher KL,
docs/results/ptq_select.md). Here, layer after layer (in module order), each starts from the MSE search's choice
and tries the other candidates — one coordinate pass over its groups when the range is per group —
with the layers before it at their final choice and the layers after it still float. It keeps the
candidate whose model predicts closest to the float model on the search images: the lowest
KL(p_fp ‖ p) (ties: the MSE choice, then the earlier candidate). With a BatchNorm correction set, every
candidate model is scored after that correction on the same images, starting again from the float
statistics each time, because that corrected model is what the choice ends up in (BN re-estimation,
random crops over many batches, is not repeated per candidate: with it, candidates are scored before it).

Cost: one forward pass over the search images per candidate and group — minutes for ResNet-20 on a
CPU, so it belongs to the slow preset, not the fast path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import progress_bar, set_submodule
from .bn import _batchnorms, bn_input_moments, correct_bn


class _Scorer:
    """KL(p_fp ‖ p) of a model on fixed images, after the BatchNorm correction when one is set."""

    def __init__(self, qmodel: nn.Module, fp_model: nn.Module, x: torch.Tensor, bn_mode: str | None):
        self.qmodel, self.fp_model, self.x, self.bn_mode = qmodel, fp_model.eval(), x, bn_mode
        with torch.no_grad():
            self.fp_log_p = F.log_softmax(self.fp_model(x), 1)
        self.fp_moments = bn_input_moments(self.fp_model, x) if bn_mode else None
        self.stats = [(bn, bn.running_mean.clone(), bn.running_var.clone()) for bn in _batchnorms(qmodel)]

    def restore(self) -> None:
        for bn, mean, var in self.stats:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)

    @torch.no_grad()
    def __call__(self) -> float:
        if self.bn_mode:
            self.restore()
            out = correct_bn(self.qmodel, self.fp_model, self.x, self.bn_mode, fp_moments=self.fp_moments)
        else:
            out = self.qmodel.eval()(self.x)
        return float(F.kl_div(F.log_softmax(out, 1), self.fp_log_p, log_target=True, reduction="batchmean"))


def kl_refine(qmodel: nn.Module, fp_model: nn.Module, start: dict[str, tuple[float | list[float], object]],
              candidates: dict[str, list[float]], build: Callable[[str, float | list[float], object], nn.Module],
              x: torch.Tensor, bn_mode: str | None = None, progress: bool = False) -> dict[str, dict]:
    """Refine the ranges of the adder layers named in ``start`` (in this order; each still float in
    ``qmodel``) by the model's KL on ``x`` (module docstring), setting each layer in place.

    ``start[name] = (r_x, group_of)``: the MSE search's choice (a float, or one range per group) and its
    group labels; ``candidates[name]``: the candidate ranges; ``build(name, r_x, group_of)`` returns the
    quantized layer. Returns per layer the indices of the chosen candidates (one, or one per group), the
    KL of the MSE choice and the KL of the final one. ``qmodel``'s BatchNorm statistics are left as
    they were."""
    score = _Scorer(qmodel, fp_model, x, bn_mode)
    report = {}
    try:
        for name, (r_x, group_of) in progress_bar(list(start.items()), "KL range search", progress, unit="layer"):
            ranges = candidates[name]
            per_group = isinstance(r_x, list)
            chosen = [ranges.index(r) for r in r_x] if per_group else [ranges.index(r_x)]

            def trial(picks, name=name, ranges=ranges, group_of=group_of, per_group=per_group):
                r = [ranges[i] for i in picks] if per_group else ranges[picks[0]]
                set_submodule(qmodel, name, build(name, r, group_of))
                return score()

            first = best = trial(chosen)
            for g in range(len(chosen)):
                for i in range(len(ranges)):
                    if i == chosen[g]:
                        continue
                    kl = trial([*chosen[:g], i, *chosen[g + 1:]])
                    if kl < best:
                        best, chosen = kl, [*chosen[:g], i, *chosen[g + 1:]]
            r = [ranges[i] for i in chosen] if per_group else ranges[chosen[0]]
            set_submodule(qmodel, name, build(name, r, group_of))
            report[name] = {"chosen": chosen, "kl_mse_choice": first, "kl": best}
    finally:
        score.restore()
    return report


__all__ = ["kl_refine"]
