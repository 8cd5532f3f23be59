"""``adderize``: turn a user's CNN into an AdderNet by swapping its ``nn.Conv2d`` layers for ``AdderConv2d``.

What is kept conventional, and why:

- with ``keep_first_last`` (the default, as in every AdderNet paper) the first convolution (the stem,
  which sees raw pixels) and the last conv/linear layer (the classifier) stay multiplications;
- padding modes other than zeros (and string padding such as ``"same"``): the adder kernels pad with
  a real zero activation only, so such convs stay conventional and a warning names them.

Grouped and depthwise convolutions (``groups > 1``) become grouped ``AdderConv2d`` layers (same
``groups``, weight (O, C/groups, kh, kw)).

Weights: ``copy_weights=False`` (the default) re-initialises each adder layer as ``AdderConv2d`` does
(``nn.Conv2d``'s default init, from which AdderNets train): a conv's weights are templates for a
product, not for a distance, so copying them is rarely a good start. ``copy_weights=True`` copies them
(and the bias) anyway, e.g. to fine-tune from a model whose filters you want to keep.

An adder layer's output is a negative distance of large magnitude; without a normalisation layer after
it, training is known to stick at chance. A warning names every adder layer whose next layer (in
registration order, which is execution order in sequential and residual models) is not a BatchNorm
or GroupNorm.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..utils import set_submodule
from .adder import AdderConv2d

NORMALISATIONS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def adderize(model: nn.Module, keep_first_last: bool = True, copy_weights: bool = False,
             eta: float | None = 0.2) -> nn.Module:
    """A copy of ``model`` with its ``nn.Conv2d`` layers replaced by :class:`AdderConv2d` (see the module
    docstring for what stays conventional); ``model`` itself is untouched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"adderize takes a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    compute = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear | AdderConv2d)]
    keep = {compute[0], compute[-1]} if keep_first_last and compute else set()
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and n not in keep]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer to turn into an adder layer"
                         + (" besides its first and last layers (keep_first_last=True)" if keep else ""))
    skipped = []
    for name, conv in convs:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            skipped.append(name)
            continue
        adder = AdderConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, bias=conv.bias is not None, eta=eta, groups=conv.groups)
        if copy_weights:
            with torch.no_grad():
                adder.weight.copy_(conv.weight)
                if conv.bias is not None:
                    adder.bias.copy_(conv.bias)
        set_submodule(model, name, adder.to(conv.weight.device, conv.weight.dtype))
    if skipped:
        warnings.warn(f"adderize kept {len(skipped)} conv layer(s) with string padding or a padding mode other "
                      f"than zeros conventional: {', '.join(skipped[:6])}" + (" …" if len(skipped) > 6 else ""),
                      stacklevel=2)
    unnormalised = _without_normalisation(model)
    if unnormalised:
        warnings.warn("adder layer(s) not followed by a normalisation layer (AdderNets then tend to train at "
                      f"chance level): {', '.join(unnormalised[:6])}" + (" …" if len(unnormalised) > 6 else ""),
                      stacklevel=2)
    return model


def _without_normalisation(model: nn.Module) -> list[str]:
    """Adder layers whose next leaf module (registration order) is not a normalisation layer."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    return [n for i, (n, m) in enumerate(leaves) if isinstance(m, AdderConv2d)
            and not (i + 1 < len(leaves) and isinstance(leaves[i + 1][1], NORMALISATIONS))]


__all__ = ["adderize"]
