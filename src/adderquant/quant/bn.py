"""BatchNorm re-estimation after quantization: one function for the AdderNet PTQ (``QuantConfig.
bn_recalibration``, the authors' step after setting the quantization parameters) and the APoT PTQ.

Quantization shifts every layer's output distribution a little, and the BatchNorm after it keeps
normalising with the full-precision model's statistics. :func:`reestimate_bn` runs batches through
the *quantized* model with its BatchNorms in training mode (no gradients; every other module stays
in evaluation mode, so a dropout would stay off) and replaces their running statistics:

- ``momentum=None``: the exact statistics of everything each BatchNorm saw over all the batches —
  per channel, the mean and the unbiased variance of the concatenated inputs (accumulated in
  float64 around the first batch's mean). This is not PyTorch's own ``momentum=None`` (an average of
  per-batch means and per-batch unbiased variances), which misses the between-batch variance.
- ``momentum=m``: PyTorch's exponential moving average ``r ← (1 − m)·r + m·batch`` from the current
  statistics; ``m = 0.1`` is the authors' (MindSpore's momentum 0.9).

The batches come from the calibration images: a tensor is cycled through in a fresh seeded
permutation per pass (every batch full: it wraps around into the next permutation), an iterable
of tensors or ``(x, y)`` pairs is re-iterated when it runs out. With ``augment`` each batch gets a
random 4-pixel-pad crop and a horizontal flip (seeded). The crop acts on the *normalised* tensor and
pads with ``fill`` per channel (default 0, the normalised mean colour). Pass the normalised value of
black (``QuantConfig.bn_pad="darkest"`` does) to get what the training pipeline feeds: it crops the
raw uint8 image, padding with black, before normalising (``data.augment``). The difference is not
cosmetic: the official AdderNet ResNet-20's running statistics are those of black-padded crops, and
statistics re-estimated on mean-colour crops (or on uncropped images) cost the *float* model 4 points
on held-out training images (``scripts/bn_padding.py``).
"""

from __future__ import annotations

from itertools import count

import torch
from torch import nn

from ..data import tensor_batches
from ..data.augment import random_crop_flip
from ..utils import hooked, progress_bar
from .config import check_bn_options


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def _source(calib, batch_size: int, cycle: bool, generator: torch.Generator):
    """Image batches from ``calib``: see the module docstring."""
    if isinstance(calib, torch.Tensor):
        n = calib.shape[0]
        if n == 0:
            raise ValueError("BatchNorm re-estimation needs calibration images, got none")
        if not cycle:
            yield from tensor_batches(calib, batch_size)
            return
        pending = torch.empty(0, dtype=torch.long)
        while True:
            while pending.numel() < batch_size:
                pending = torch.cat([pending, torch.randperm(n, generator=generator)])
            idx, pending = pending[:batch_size], pending[batch_size:]
            yield calib[idx.to(calib.device)]
    for _ in count() if cycle else range(1):
        empty = True
        for xb in tensor_batches(calib):
            empty = False
            yield xb
        if empty:  # an exhausted iterator (or an empty one): nothing more to draw
            return


@torch.no_grad()
def reestimate_bn(model: nn.Module, calib, batches: int, *, momentum: float | None = None, batch_size: int = 128,
                  augment: bool = True, padding: int = 4, seed: int = 0, cycle: bool = True,
                  fill: torch.Tensor | None = None, progress: bool = False) -> int:
    """Re-estimate the running statistics of every BatchNorm of ``model`` (in place) on ``batches``
    batches of ``calib`` (normalised images); returns how many batches ran. The model's mode is
    restored afterwards. See the module docstring for the statistics, the batches and the augmentation.
    """
    check_bn_options(batches, momentum, batch_size)
    bns = _batchnorms(model)
    if not bns or batches == 0:
        return 0
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = next(model.buffers()).device
    gen = torch.Generator().manual_seed(seed)
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    sums: dict[nn.Module, list] = {}

    def accumulate(bn, inputs):
        x = inputs[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        if bn not in sums:
            sums[bn] = [x.mean(dims), 0, 0.0, 0.0]  # shift, count, Σ(x − shift), Σ(x − shift)²
        entry = sums[bn]
        d = x - entry[0].view([1, -1] + [1] * (x.dim() - 2))
        entry[1] += x.numel() // x.shape[1]
        entry[2] = entry[2] + d.sum(dims)
        entry[3] = entry[3] + (d * d).sum(dims)

    handles = [bn.register_forward_pre_hook(accumulate) for bn in bns] if momentum is None else []
    ran = 0
    try:
        model.eval()
        for bn in bns:
            bn.train()
            bn.momentum = 0.0 if momentum is None else momentum  # 0: PyTorch leaves the statistics alone
        source = _source(calib, batch_size, cycle, gen)
        for xb in progress_bar((next(source, None) for _ in range(batches)), "BN re-estimation", progress,
                               total=batches):
            if xb is None:
                break
            xb = xb.to(device)
            if augment:
                xb = random_crop_flip(xb, padding, generator=gen, fill=fill)
            model(xb)
            ran += 1
    finally:
        for h in handles:
            h.remove()
        for bn, m in momenta.items():
            bn.momentum = m
        for m, mode in modes.items():
            m.train(mode)
    if ran == 0:
        raise ValueError("BatchNorm re-estimation drew no batches (an exhausted one-pass iterator?): "
                         "pass a tensor or a re-iterable such as a DataLoader")
    for bn, (shift, n, s1, s2) in sums.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0) * (n / max(n - 1, 1))
        bn.running_mean.copy_(shift + mean)
        bn.running_var.copy_(var)
    return ran




def bn_input_moments(model: nn.Module, x: torch.Tensor, adjust=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm (by name): mean and variance of its input over the whole tensor ``x``, in float64.
    ``adjust(name, bn, mean, var)``, when given, runs before that BatchNorm's forward — so a change it
    makes is what every later layer of the same pass sees."""
    return _moments_pass(model, x, adjust)[0]


def _moments_pass(model: nn.Module, x: torch.Tensor, adjust) -> tuple[dict, torch.Tensor]:
    moments = {}

    def record(name, bn, inputs):
        v = inputs[0].detach().to(torch.float64)
        dims = [d for d in range(v.dim()) if d != 1]
        moments[name] = (v.mean(dims), v.var(dims, unbiased=False))
        if adjust is not None:
            adjust(name, bn, *moments[name])

    bns = {n: m for n, m in model.named_modules() if m in set(_batchnorms(model))}
    with hooked(model, bns, record), torch.no_grad():
        out = model(x)
    return moments, out


def correct_bn(qmodel: nn.Module, fp_model: nn.Module, calib: torch.Tensor, mode: str = "mean_var", *,
               fp_moments: dict | None = None) -> torch.Tensor:
    """Correct each BatchNorm of ``qmodel`` (in place) for the shift quantization causes in its input.

    Unlike re-estimation, the full-precision model's stored statistics stay the reference: on the same
    images, the input moments of a BatchNorm in ``fp_model`` (μ_f, σ_f²) and in ``qmodel`` (μ_q, σ_q²)
    are compared, and the running statistics (μ_r, σ_r² = var + eps) become ``σ_r' = σ_r·σ_q/σ_f`` and
    ``μ_r' = μ_q − (σ_q/σ_f)·(μ_f − μ_r)`` (``mean_var``), so the quantized model normalises its inputs
    the way the float model normalises its own; ``mean`` corrects the mean only (``μ_r' = μ_r + μ_q −
    μ_f``, classic bias correction). One pass over ``calib`` as a single batch, BatchNorms in execution
    order: each correction is in place before the next BatchNorm's input is measured. ``fp_moments``:
    the float model's moments on ``calib`` (:func:`bn_input_moments`) when already known. Returns
    ``qmodel``'s output on ``calib`` from that pass, which is the corrected model's.
    """
    if mode not in ("mean", "mean_var"):
        raise ValueError(f"BN correction mode must be 'mean' or 'mean_var', got {mode!r}")
    fp = bn_input_moments(fp_model.eval(), calib) if fp_moments is None else fp_moments

    def adjust(name, bn, mu_q, var_q):
        mu_f, var_f = fp[name]
        mu_r = bn.running_mean.double()
        if mode == "mean":
            bn.running_mean.copy_(mu_r + mu_q - mu_f)
            return
        ratio = ((var_q + 1e-12) / (var_f + 1e-12)).sqrt()
        sigma_r = (bn.running_var.double() + bn.eps).sqrt()
        bn.running_mean.copy_(mu_q - ratio * (mu_f - mu_r))
        bn.running_var.copy_(((sigma_r * ratio) ** 2 - bn.eps).clamp_min(0))

    return _moments_pass(qmodel.eval(), calib, adjust)[1]


__all__ = ["bn_input_moments", "correct_bn", "reestimate_bn"]
