"""Range statistics of a full-precision AdderNet: why one shared scale fails (paper Fig. 2 and 4).

Per adder layer, on the calibration set: the per-output-channel weight range ``max|W_c|``, the
activation range ``r_x`` (the α-percentile of |X|, Sec. 3.2) and ``max|X|``, the share of weights
beyond ``r_x`` (what the lossless weight clamp folds into the bias), and the groups the quantizer's
``QuantConfig`` would form (Eq. 14–15) with their weight ranges ``r_wj`` and shared quantization
ranges. ``plot_ranges`` draws Figure 2 (weight range bars per channel against the activation range),
``plot_distributions`` Figure 4 (weight and activation histograms of one layer, log-y);
:func:`report_ranges` writes all of it for ``adderquant report ranges``.

matplotlib is imported only when plotting (Agg canvas): it is an optional extra.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import calibration_subset, load_dataset, normalize, tensor_batches
from ..nn import AdderConv2d
from ..quant.config import QuantConfig
from ..quant.observers import AbsRangeObserver
from ..quant.ptq import calibrate, layer_parameters
from ..utils import atomic_write, hooked, json_dumps
from ._plotting import agg_figure, save_figure

DEFAULT_LAYER = "layer1.1.conv2"  # the layer of the paper's Figure 2


@dataclass
class LayerRanges:
    """Range statistics of one adder layer (all values are magnitudes)."""

    name: str
    shape: tuple[int, ...]
    weight_max: list[float] = field(repr=False)  # max|W_c| per output channel
    r_x: float  # sorted|X|[ceil(α(n−1))]
    x_max: float  # max|X|
    alpha: float
    frac_beyond: float  # share of all weights with |W| > r_x
    frac_above: float  # share with W > r_x (the side a large activation meets)
    frac_below: float  # share with W < -r_x
    frac_beyond_channel: list[float] = field(repr=False)  # the same per output channel
    group_of: list[int] = field(repr=False)  # group label per output channel (0 = smallest weights)
    group_weight_max: list[float]  # r_wj = max|W| over the channels of group j
    group_ranges: list[float]  # the shared range of group j under the config (scale 2·r/(2^b−1))
    n_activations: int = 0

    @property
    def group_sizes(self) -> list[int]:
        return [self.group_of.count(j) for j in range(len(self.group_weight_max))]

    @property
    def weight_to_act(self) -> float:
        """max|W| / r_x: how far the weights overshoot the activation range."""
        return max(self.weight_max) / self.r_x if self.r_x > 0 else math.inf

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["group_sizes"] = self.group_sizes
        return d


def adder_layers(model: nn.Module) -> dict[str, AdderConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}


@torch.no_grad()
def range_statistics(model: nn.Module, calib, config: QuantConfig | None = None, alpha: float = 0.999,
                     batch_size: int = 256, progress: bool = False,
                     observers: dict[str, AbsRangeObserver] | None = None) -> dict[str, LayerRanges]:
    """Per adder layer statistics on ``calib`` (normalised images: a tensor or an iterable of batches).

    Groups and group ranges follow ``config`` (default ``QuantConfig.paper()``) with ``r_x`` taken as
    the α-percentile; ``observers`` from an earlier :func:`calibrate` (built for ≤ ``alpha``) skip the
    calibration pass.
    """
    config = (config or QuantConfig.paper()).with_(alpha=alpha)
    if observers is None:
        observers = calibrate(model, calib, config, batch_size=batch_size, progress=progress)
    stats: dict[str, LayerRanges] = {}
    for name, module in adder_layers(model).items():
        obs = observers[name]
        r_x = obs.percentile(alpha)
        w = module.weight.detach().to(torch.float64)
        flat = w.abs().flatten(1)
        _, group_of, ranges, _ = layer_parameters(module.weight, r_x, config)
        g = int(group_of.max()) + 1
        stats[name] = LayerRanges(
            name=name,
            shape=tuple(w.shape),
            weight_max=flat.amax(1).tolist(),
            r_x=float(r_x),
            x_max=float(obs.max),
            alpha=alpha,
            frac_beyond=float((flat > r_x).double().mean()),
            frac_above=float((w > r_x).double().mean()),
            frac_below=float((w < -r_x).double().mean()),
            frac_beyond_channel=(flat > r_x).double().mean(1).tolist(),
            group_of=group_of.tolist(),
            group_weight_max=[float(flat[group_of == j].max()) for j in range(g)],
            group_ranges=[float(r) for r in ranges],
            n_activations=obs.count,
        )
    return stats


def format_table(stats: dict[str, LayerRanges]) -> str:
    """Plain-text table, one line per adder layer."""
    head = (f"{'layer':<22} {'c_out':>5} {'max|W_c| min/med/max':>22} {'r_x':>7} {'max|X|':>7} "
            f"{'|W|>r_x':>8} {'W>r_x':>6} {'W<-r_x':>6} {'max|W|/r_x':>10}  groups (size: r_wj → range)")
    lines = [head, "-" * len(head)]
    for s in stats.values():
        wm = sorted(s.weight_max)
        med = wm[len(wm) // 2]
        groups = ", ".join(f"{n}: {rw:.1f}→{r:.2f}"
                           for n, rw, r in zip(s.group_sizes, s.group_weight_max, s.group_ranges, strict=True))
        lines.append(f"{s.name:<22} {s.shape[0]:>5} {wm[0]:>6.1f} /{med:>6.1f} /{wm[-1]:>6.1f} {s.r_x:>7.3f} "
                     f"{s.x_max:>7.2f} {100 * s.frac_beyond:>7.1f}% {100 * s.frac_above:>5.1f}% "
                     f"{100 * s.frac_below:>5.1f}% {s.weight_to_act:>10.1f}  {groups}")
    return "\n".join(lines)


_GROUP_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                 "tab:cyan")


def plot_ranges(stats: dict[str, LayerRanges], layer: str, path, log: bool = False) -> Path:
    """Figure 2: per-output-channel absolute weight range (bars, coloured by group) vs the activation
    range (r_x and max|X| lines) of ``layer``."""
    s = stats[layer]
    fig = agg_figure(figsize=(10, 3.6))
    ax = fig.subplots()
    c = list(range(len(s.weight_max)))
    colors = [_GROUP_COLORS[j % len(_GROUP_COLORS)] for j in s.group_of]
    ax.bar(c, s.weight_max, color=colors, width=0.8)
    for j, (n, rw) in enumerate(zip(s.group_sizes, s.group_weight_max, strict=True)):
        ax.bar([0], [0], color=_GROUP_COLORS[j % len(_GROUP_COLORS)], label=f"group {j}: {n} ch, r_w={rw:.1f}")
    ax.axhline(s.r_x, color="red", lw=1.5, label=f"activations r_x (α={s.alpha:g}) = {s.r_x:.2f}")
    ax.axhline(s.x_max, color="red", lw=1, ls="--", label=f"activations max|X| = {s.x_max:.2f}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("output channel")
    ax.set_ylabel("absolute range")
    ax.set_title(f"{layer}: weight range per channel vs activation range")
    ax.set_xlim(-1, len(c))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


@torch.no_grad()
def layer_inputs(model: nn.Module, calib, layer: str, batch_size: int = 256) -> torch.Tensor:
    """Every input value ``layer`` sees on ``calib`` (flattened float32)."""
    seen: list[torch.Tensor] = []
    with hooked(model, {layer: model.get_submodule(layer)},
                lambda _name, _module, inputs: seen.append(inputs[0].detach().flatten().cpu())):
        for xb in tensor_batches(calib, batch_size):
            model(xb)
    return torch.cat(seen)


def plot_distributions(model: nn.Module, calib, layer: str, path, config: QuantConfig | None = None,
                       alpha: float = 0.999, bins: int = 120, stats: LayerRanges | None = None) -> Path:
    """Figure 4: histograms (log-y) of ``layer``'s weights and input activations on ``calib``, with
    ±r_x and each group's weight range ±r_wj marked."""
    x = layer_inputs(model, calib, layer).to(torch.float64)
    if stats is None:
        stats = range_statistics(model, calib, config, alpha)[layer]
    w = model.get_submodule(layer).weight.detach().flatten().cpu().to(torch.float64)
    fig = agg_figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for ax, v, what in ((axes[0], w, "weights"), (axes[1], x, "activations (input)")):
        ax.hist(v.numpy(), bins=bins, color="gray", log=True)
        ax.set_title(f"{layer}: {what}, n={v.numel():,}")
        ax.set_xlabel("value")
        ax.set_ylabel("count (log)")
        signed = float(v.min()) < 0
        for sign in (-1, 1) if signed else (1,):
            ax.axvline(sign * stats.r_x, color="red", lw=1.2,
                       label=f"{'±' if signed else ''}r_x = {stats.r_x:.2f}" if sign > 0 else None)
    for j, rw in enumerate(stats.group_weight_max):
        col = _GROUP_COLORS[j % len(_GROUP_COLORS)]
        for sign in (-1, 1):
            axes[0].axvline(sign * rw, color=col, lw=1, ls="--",
                            label=f"±r_w{j} = {rw:.1f} → range {stats.group_ranges[j]:.2f}" if sign > 0 else None)
    axes[1].axvline(stats.x_max, color="red", lw=1, ls=":", label=f"max|X| = {stats.x_max:.2f}")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def report_ranges(checkpoint, data, out_dir, layer: str | None = None, calib_size: int = 1024, seed: int = 0,
                  alpha: float = 0.999, config: QuantConfig | None = None, progress: bool = False,
                  prefix: str = "", device=None) -> dict:
    """``adderquant report ranges``: statistics of every adder layer of ``checkpoint`` (a path or a
    loaded ``Checkpoint``) on ``calib_size`` training images of ``data`` (a path or a ``Dataset``).

    Writes ``ranges.json``, ``ranges.txt`` and, for ``layer`` (default layer1.1.conv2 when the model
    has it, else the first adder layer), ``ranges_<layer>.png`` (Fig. 2) and
    ``distributions_<layer>.png`` (Fig. 4) into ``out_dir``, each name preceded by ``prefix``.
    Returns the paths and the statistics. ``device``: where the model runs (default: where it is).
    """
    from ..checkpoints import load as load_checkpoint  # only for a path: the statistics need no checkpoints

    ck = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    ds = load_dataset(data) if isinstance(data, (str, Path)) else data
    model = (ck.model if device is None else ck.model.to(device)).eval()
    calib = normalize(calibration_subset(ds, calib_size, seed=seed), *ck.normalization)
    if device is not None:
        calib = calib.to(device)
    config = config or QuantConfig.paper()
    stats = range_statistics(model, calib, config, alpha, progress=progress)
    if not stats:
        raise ValueError(f"{ck.name}: no adder layers")
    layer = layer or (DEFAULT_LAYER if DEFAULT_LAYER in stats else next(iter(stats)))
    if layer not in stats:
        raise ValueError(f"no adder layer {layer!r}; adder layers: {', '.join(stats)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(stats)
    header = (f"{ck.name} ({checkpoint if isinstance(checkpoint, (str, Path)) else ck.format}); calibration: "
              f"{calib_size} training images of {ds.name} (seed {seed}); alpha = {alpha}; groups by "
              f"{config.group_feature}|W_c|, g = {config.groups}, shared range = {config.scale_source}(r_wj, r_x)")
    paths = {"json": out / f"{prefix}ranges.json", "table": out / f"{prefix}ranges.txt"}
    atomic_write(paths["table"], lambda tmp: Path(tmp).write_text(header + "\n\n" + table + "\n"))
    payload = {"checkpoint": str(checkpoint) if isinstance(checkpoint, (str, Path)) else ck.name,
               "data": str(data) if isinstance(data, (str, Path)) else ds.name, "dataset": ds.name,
               "calib_size": calib_size, "seed": seed, "alpha": alpha, "config": asdict(config),
               "layers": [s.to_dict() for s in stats.values()]}
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(json_dumps(payload, indent=1) + "\n"))
    safe = layer.replace(".", "_")
    paths["ranges"] = plot_ranges(stats, layer, out / f"{prefix}ranges_{safe}.png")
    paths["distributions"] = plot_distributions(model, calib, layer, out / f"{prefix}distributions_{safe}.png",
                                                stats=stats[layer])
    return {"stats": stats, "table": table, "layer": layer, "paths": paths}


__all__ = ["LayerRanges", "format_table", "layer_inputs", "plot_distributions", "plot_ranges", "range_statistics",
           "report_ranges"]
