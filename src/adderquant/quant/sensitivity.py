"""How much each element of a layer's output matters to the model's prediction: the weights of the
range search's loss-aware criterion (``QuantConfig.range_search_metric="fisher"``).

Why: the plain search minimises a layer's output MSE, which counts an error in a channel the next
BatchNorm shrinks, or at a position the classifier ignores, as much as any other. What PTQ should keep
is the float model's prediction p. For a small change Δy of one layer's output y, the KL divergence
KL(p ‖ p') is to second order ½·Δyᵀ·Jᵀ·H·J·Δy, J the Jacobian of the logits with respect to y and
H = Σ_k p_k·∇log p_k·∇log p_kᵀ (the softmax's Fisher matrix) at the float logits. Keeping the diagonal
of JᵀHJ, element i of y weighs

    F_i = Σ_k p_k · (∂ log p_k / ∂y_i)²

so Σ_i F_i·Δy_i² approximates twice the KL a layer's quantization error causes, image by image —
K backward passes (one per class) of the float model, once per calibration set. The gradients are the
model's backward, which for later adder layers is the AdderNet rule HardTanh(W − X): the true
derivative sign(W − X) wherever |W − X| ≥ 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import hooked


def output_sensitivity(model: nn.Module, x: torch.Tensor,
                       modules: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module of ``modules`` (name → module of ``model``): its input on ``x`` and ``F`` (module
    docstring), the same shape as its output, from the float ``model`` in eval mode. Returns
    ``{name: (input, weights)}``; the parameters' gradients are not touched."""
    inputs, outputs = {}, {}

    def keep(name, _module, args, output):
        inputs[name] = args[0].detach()
        outputs[name] = output

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with hooked(model, modules, keep, pre=False), torch.enable_grad():
            x = x.detach().requires_grad_(True)  # so the graph reaches every hooked output
            log_p = F.log_softmax(model(x), 1)
            probs = log_p.detach().exp()
            names = list(outputs)
            weights = {n: torch.zeros_like(outputs[n]) for n in names}
            for k in range(log_p.shape[1]):
                grads = torch.autograd.grad(log_p[:, k].sum(), [outputs[n] for n in names],
                                            retain_graph=k + 1 < log_p.shape[1])
                for n, g in zip(names, grads, strict=True):
                    weights[n] += probs[:, k].view(-1, *([1] * (g.dim() - 1))) * g.detach().square()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {n: (inputs[n], weights[n]) for n in names}


__all__ = ["output_sensitivity"]
