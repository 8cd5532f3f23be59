"""Learned rounding of adder weights (``QuantConfig.learned_rounding``): AdaRound (Nagel et al., ICML
2020) with block-wise reconstruction (BRECQ, Li et al., ICLR 2021), after :func:`quantize_adder` has
built every ``QuantAdderConv2d``.

What is learned: per weight of every uniform-grid adder layer, the rounding direction only. With
``t = W'/step`` (``W'`` the stored, already clamped weight; ``step`` the channel's ``s_j``, or ``2·s_j``
for the double-step grid, computed exactly as :meth:`QuantAdderConv2d.int_weight` does)::

    code = clamp(floor(t) + h(V), q_n, q_p)      h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1

``V`` starts where ``h(V) = t − floor(t)`` (the soft code equals ``t``). What is frozen: groups, scales,
activation ranges, the Theorem-1 clamp bias, BatchNorm, every other parameter; Adam updates ``V`` only.

What is minimised, per block (in execution order): the smallest module holding the layer that is a
residual block (``BasicBlock``, the ImageNet ``_Basic``/``_Bottleneck``, or any module with a
``downsample`` attribute), else the layer and what follows it in its ``nn.Sequential`` parent up to
and including the next BatchNorm (VGG: adder → max-pool → BN), else the layer alone. The loss is
BRECQ's ``mean_{n,h,w} Σ_c (Q(x_q) − F(x_f))²`` between the quantized block fed the quantized model's
input to it (earlier blocks already rounded) and the float block fed the float model's input, on
random batches of ``batch_size`` calibration images, plus ``λ·Σ(1 − |2h(V) − 1|^β)`` (λ = 0.01)
after a warm-up of 20 % of the iterations, β annealed linearly from 20 to 2 over the rest.
Activations stay quantized on their calibrated grids (straight-through rounding); gradients follow
the AdderNet backward (``adder_conv2d`` with η off).

At the end each code is hard, ``floor(t) + [V ≥ 0]``, and a weight whose code changed is set to exactly
``code·step``, so the layer's own ``round`` (and the integer converter) reproduces it. The block's error with those
codes is compared with nearest rounding on all the calibration images; the learned codes are kept
only when they are not worse (the report says which). The clamp bias is left as computed: the codes
stay within ``[q_n, q_p]``, inside the clamp interval, and a weight the Theorem-1 clamp moved to an
edge of the grid keeps its edge code (its excess is in the bias), so the fold stays exact and QAT's
latent weights (:meth:`QuantAdderConv2d.unfold`) can hold every learned code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import calibration_tensor, tensor_batches
from ..models.resnet_cifar import BasicBlock
from ..models.resnet_imagenet import _Basic, _Bottleneck
from ..nn.functional import adder_conv2d
from ..utils import hooked, progress_bar, set_submodule
from .adder_layer import QuantAdderConv2d
from .config import check_rounding_options
from .uniform import int_range, quantize_int

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
RESIDUAL_BLOCKS = (BasicBlock, _Basic, _Bottleneck)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1)``."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = h`` for ``h`` in [0, 1] (finite: ``sigmoid(V)`` stays in [1/12, 11/12])."""
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


def is_residual_block(module: nn.Module) -> bool:
    return isinstance(module, RESIDUAL_BLOCKS) or hasattr(module, "downsample")


class LayerRounding:
    """One layer's learnable rounding: ``floor(t)``, ``V`` and the grid (see the module docstring)."""

    def __init__(self, layer: QuantAdderConv2d):
        if layer.grid != "uniform":
            raise ValueError("learned rounding needs the uniform grid (APoT levels are not integer codes)")
        self.layer = layer
        w = layer.weight.detach()
        if layer.double_step:  # int_weight's own formula, in float64
            self.qn, self.qp = int_range(layer.bits, True)
            r = layer.ranges.double()[layer.group_of].view(-1, 1, 1, 1)
            self.step = 2 * r / (2**layer.bits - 1)
            t = w.double() * (2**layer.bits - 1) / (2 * r)
        else:
            self.qn, self.qp = layer.int_bounds()
            self.step = layer.channel_scales().view(-1, 1, 1, 1)  # float32, as in quantize_int
            t = (w / self.step).double()
        base = torch.floor(t)
        self.base = base.to(w.dtype)
        self.v = nn.Parameter(inverse_rectified_sigmoid((t - base).clamp(0, 1)).to(w.dtype))
        self.nearest = layer.int_weight().detach().clone()
        self.edge = (t <= self.qn) | (t >= self.qp)  # clamped weights (and any exactly on an edge) stay there
        self.weight = w.clone()

    def soft_codes(self) -> torch.Tensor:
        codes = torch.clamp(self.base + rectified_sigmoid(self.v), self.qn, self.qp)
        return torch.where(self.edge, self.nearest, codes)

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        codes = torch.clamp(self.base + (self.v >= 0).to(self.base.dtype), self.qn, self.qp)
        return torch.where(self.edge, self.nearest, codes)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor | None) -> None:
        """Weights ``code·step`` where the code is not the nearest one, the original weights elsewhere
        (``None``: the original weights everywhere, i.e. nearest rounding)."""
        self.layer.weight.copy_(self.weight)
        if codes is None:
            return
        moved = codes != self.nearest
        on_grid = (codes.to(self.step.dtype) * self.step).to(self.layer.weight.dtype)
        self.layer.weight[moved] = on_grid[moved]
        if not torch.equal(self.layer.int_weight(), codes.to(self.layer.weight.dtype)):
            raise RuntimeError("learned rounding: code·step does not round back to the code")


class _SoftAdder(nn.Module):
    """The layer's evaluation forward with soft weight codes and straight-through activation rounding."""

    def __init__(self, rounding: LayerRounding):
        super().__init__()
        self.layer, self.rounding = rounding.layer, rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        codes = self.rounding.soft_codes().to(x.dtype)
        w = 2 * codes if m.double_step else codes
        geometry = (m.stride, m.padding, m.dilation)
        out = None
        for s, idx in m.scale_sets():
            s = s.to(x.dtype)
            y = adder_conv2d(quantize_int(x, s, m.bits, m.signed), w[m.call_rows(idx)], None, *geometry,
                             groups=m.conv_groups) * s
            if m.lossless_act_clamp:
                y = y - m.window_excess(m.excess(torch.round(x / s)).detach(), geometry) * s
            if out is None:
                out = x.new_empty(x.shape[0], m.out_channels, y.shape[2], y.shape[3])
            out[:, idx] = m.call_outputs(y, idx)
        return out + m.clamp_bias.to(x.dtype).view(1, -1, 1, 1)


@dataclass
class Block:
    """A reconstruction unit: its name, the quantized and float modules, where its input is taken
    (``entry``: a module name), and its adder layers (full names, and names relative to ``module``)."""

    name: str
    module: nn.Module
    fp_module: nn.Module
    entry: str
    layers: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)


def _execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    names = {n: m for n, m in model.named_modules() if isinstance(m, QuantAdderConv2d) and m.grid == "uniform"}
    order = []
    with hooked(model, names, lambda n, _m, _i: order.append(n)), torch.no_grad():
        model(x)
    return list(dict.fromkeys(order)) + [n for n in names if n not in order]


def _uniform_adder(m: nn.Module) -> bool:
    return isinstance(m, QuantAdderConv2d) and m.grid == "uniform"


def find_blocks(qmodel: nn.Module, fp_model: nn.Module, example: torch.Tensor) -> list[Block]:
    """The reconstruction blocks of ``qmodel`` in execution order (see the module docstring)."""
    blocks: dict[str, Block] = {}
    done: set[str] = set()
    for name in _execution_order(qmodel, example[:1]):
        if name in done:
            continue
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                      if is_residual_block(qmodel.get_submodule(".".join(parts[:i])))), None)
        if owner is not None:  # the smallest residual block holding the layer: all its adder layers
            block = Block(owner, qmodel.get_submodule(owner), fp_model.get_submodule(owner), owner)
            members = [(f"{owner}.{n}", n) for n, m in block.module.named_modules() if _uniform_adder(m)]
        else:
            parent_name, _, leaf = name.rpartition(".")
            parent = qmodel.get_submodule(parent_name)
            fp_parent = fp_model.get_submodule(parent_name)
            keys = list(parent._modules) if isinstance(parent, nn.Sequential) else [leaf]
            i = keys.index(leaf)
            j = next((k for k in range(i, len(keys))
                      if isinstance(parent._modules[keys[k]], nn.modules.batchnorm._BatchNorm)), i)
            span = keys[i : j + 1]
            if len(span) == 1:  # the layer alone
                block = Block(name, parent._modules[leaf], fp_parent._modules[leaf], name)
                members = [(name, "")]
            else:  # the layer up to its BatchNorm in the Sequential parent
                block = Block(f"{parent_name}[{i}:{j + 1}]", nn.Sequential(*(parent._modules[k] for k in span)),
                              nn.Sequential(*(fp_parent._modules[k] for k in span)), name)
                prefix = f"{parent_name}." if parent_name else ""
                members = [(prefix + k, str(n)) for n, k in enumerate(span) if _uniform_adder(parent._modules[k])]
        for full, local in members:
            if full not in done:
                block.layers.append(full)
                block.local.append(local)
                done.add(full)
        blocks[block.name] = block
    return list(blocks.values())


class _Stop(Exception):
    pass


@torch.no_grad()
def _inputs(model: nn.Module, entry: str, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """The input of module ``entry`` of ``model`` on ``images`` (the forward stops there)."""
    seen = []

    def grab(_name, _module, inputs):
        seen.append(inputs[0].detach())
        raise _Stop

    with hooked(model, {entry: model.get_submodule(entry)}, grab):
        for xb in tensor_batches(images, batch_size, device=device):
            try:
                model(xb)
            except _Stop:
                pass
    return torch.cat(seen)


def _rec(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: Σ over channels, mean over images and positions."""
    return (out - target).square().sum(1).mean()


@torch.no_grad()
def block_error(module: nn.Module, x: torch.Tensor, target: torch.Tensor, batch_size: int = 256) -> float:
    """:func:`_rec` of ``module(x)`` against ``target`` over all of ``x`` (in batches)."""
    module.eval()
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        d = module(x[i : i + batch_size]) - target[i : i + batch_size]
        total += float(d.double().square().sum())
    return total / (target.numel() / target.shape[1])


def beta_at(it: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """β of iteration ``it`` (None during the warm-up: no regulariser), linear from ``start`` to ``end``."""
    w = int(warmup * iters)
    if it < w:
        return None
    return end + (start - end) * max(0.0, 1 - (it - w) / max(iters - w, 1))


def _optimise(block: Block, roundings: list[LayerRounding], x_q, target, iters, batch_size, lr, weight, warmup,
              generator) -> None:
    module = block.module
    frozen = [(p, p.requires_grad) for p in module.parameters()]
    swapped = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for local, r in zip(block.local, roundings, strict=True):
            if local:
                set_submodule(module, local, _SoftAdder(r))
                swapped.append(local)
        forward = _SoftAdder(roundings[0]) if not block.local[0] else module
        module.eval()
        opt = torch.optim.Adam([r.v for r in roundings], lr=lr)
        n = x_q.shape[0]
        for it in range(iters):
            idx = torch.randperm(n, generator=generator)[:batch_size].to(x_q.device)
            loss = _rec(forward(x_q[idx]), target[idx])
            beta = beta_at(it, iters, warmup)
            if beta is not None:
                loss = loss + weight * sum(r.regulariser(beta) for r in roundings)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for local, r in zip(block.local, roundings, strict=True):
            if local in swapped:
                set_submodule(module, local, r.layer)
        for p, flag in frozen:
            p.requires_grad_(flag)


def learn_rounding(qmodel: nn.Module, fp_model: nn.Module, calib, iters: int, *, batch_size: int = 32,
                   lr: float = 1e-3, weight: float = 0.01, warmup: float = 0.2, seed: int = 0,
                   progress: bool = False) -> dict[str, dict]:
    """Learn the rounding of every uniform-grid ``QuantAdderConv2d`` of ``qmodel`` in place, block by
    block (module docstring), against ``fp_model`` on the calibration images ``calib``. Returns, per
    block: its layers, the reconstruction errors with nearest and learned codes, whether the learned
    codes were kept, how many codes changed, and the seconds it took. ``iters = 0`` changes nothing.
    ``weight`` is the regulariser's λ, ``warmup`` the fraction of iterations without it, ``seed``
    draws the batches."""
    check_rounding_options(iters, batch_size, lr)
    if iters == 0:
        return {}
    images = calibration_tensor(calib)
    try:
        device = next(qmodel.parameters()).device
    except StopIteration:
        device = images.device
    images = images.to(device)
    fp_model.eval()
    qmodel.eval()
    blocks = find_blocks(qmodel, fp_model, images)
    generator = torch.Generator().manual_seed(seed)
    report = {}
    for block in progress_bar(blocks, "learned rounding", progress, unit="block"):
        start = time.perf_counter()
        x_f = _inputs(fp_model, block.entry, images, 256, device)
        x_q = _inputs(qmodel, block.entry, images, 256, device)
        with torch.no_grad():
            block.fp_module.eval()
            target = torch.cat([block.fp_module(x_f[i : i + 256]) for i in range(0, x_f.shape[0], 256)])
        del x_f
        roundings = [LayerRounding(qmodel.get_submodule(n)) for n in block.layers]
        before = block_error(block.module, x_q, target)
        _optimise(block, roundings, x_q, target, iters, batch_size, lr, weight, warmup, generator)
        codes = [r.hard_codes() for r in roundings]
        for r, c in zip(roundings, codes, strict=True):
            r.set_codes(c)
        after = block_error(block.module, x_q, target)
        kept = after <= before
        if not kept:
            for r in roundings:
                r.set_codes(None)
        report[block.name] = {
            "layers": list(block.layers), "iterations": iters, "error_nearest": before, "error_learned": after,
            "kept": kept, "codes": sum(c.numel() for c in codes),
            "changed": sum(int((c != r.nearest).sum()) for r, c in zip(roundings, codes, strict=True)),
            "seconds": time.perf_counter() - start}
    return report


__all__ = ["LayerRounding", "block_error", "find_blocks", "learn_rounding", "rectified_sigmoid"]
