"""One config dataclass per quantization workflow: ``QuantConfig`` (AdderNet PTQ, every switch of the
paper's quantizer, with presets) and ``APoTConfig`` (APoT for CNNs). ``quantize`` picks the handler
by the config's type."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ..utils import check_bits
from .apot import BIT_RANGE

GROUP_FEATURES = ("max", "mean", "all", "uniform")
SCALE_SOURCES = ("min", "weights", "activations", "best")
ACT_CLAMP_MODES = ("percentile", "max_scale", "batch_max")
CLAMP_TARGETS = ("representable", "range")
WEIGHT_GRIDS = ("shared", "double_step")


@dataclass(frozen=True)
class QuantConfig:
    """How adder layers are quantized (NeurIPS 2022, Sec. 3).

    Per adder layer, with ``r_x`` the activation range and ``r_wj`` the weight range of group j:

    - ``groups``/``group_feature``: output channels clustered into g groups by max|W_c| (Eq. 14–15);
      one shared scale per group. ``groups=1`` is one shared scale per layer (QSSF).
    - ``weight_clamp``: clamp W to [-r_x, r_x] and fold the excess into a bias (Theorem 1, lossless).
    - ``act_clamp``: r_x = sorted|X|[ceil(α(n-1))] (``percentile``) or α·max|X| (``max_scale``), or the
      authors' ``batch_max``: the running max over calibration batches of ``act_batch_size`` images of
      each batch's sorted|X|[int((round(n·α) − 1)·α)] (n = the batch's numel); off: r_x = max|X|.
    - ``clamp_to``: the weight-clamp interval: ``representable`` = [q_n·s_j, q_p·s_j] (exact for the
      quantized activations) or ``range`` = the paper's literal [-r_x, r_x].
    - ``scale_source``: each group's shared range: ``min`` = min(r_wj, r_x) (the paper), ``weights`` =
      r_wj (QSSF-w), ``activations`` = r_x (QSSF-a); ``best`` = whichever of the two QSSF variants
      scores better on the calibration images (one calibration pass serves both).
    - ``unsigned_activations`` (beyond the paper): a layer whose calibration inputs are all ≥ 0 (after
      ReLU) uses the unsigned grid [0, 2^b−1] for weights and activations; weights below 0 fold into
      the bias exactly as in Theorem 1, so the non-negative activations get all 2^b levels.
    - ``grid`` (research option): ``uniform`` integer levels, or ``apot`` — APoT levels (ICLR 2020)
      on each group's shared range (fake-quant only; measured in docs/results).
    - ``lossless_act_clamp`` (beyond the paper): inside a group whose quantized weights lie within the
      integer range, activations above the range are compensated exactly by ``-Σ_window excess``.
    - ``weight_grid``: ``shared`` (weights on the activations' grid) or the authors' ``double_step``:
      activations unsigned ``[0, 2^b−1]`` with step ``s = r/(2^b−1)``, weights signed
      ``[−2^(b−1), 2^(b−1)−1]`` with step ``2s``; the integer accumulator is ``Σ|a_q − 2·w_q|``.
    - ``bn_recalibration``: after quantizing, re-estimate every BatchNorm's running statistics on that
      many augmented batches of ``bn_batch_size`` calibration images through the quantized model
      (``bn_momentum``: ``None`` = the exact statistics over all those batches, else PyTorch's EMA
      momentum, the authors' 0.1); 0 = off (:func:`adderquant.quant.bn.reestimate_bn`). Each batch is
      a random 4-pixel crop and flip; ``bn_pad`` is what the crop pads with: ``darkest`` (default) = per
      channel the smallest value of the calibration images — black for normalised 8-bit images, what
      a crop of the raw image pads with (torchvision's ``RandomCrop(32, padding=4)``), so the statistics
      are those of the training pipeline the float model's statistics came from; ``zero`` = 0 in
      normalised space (the mean colour); or one value per input channel.
    - ``range_search`` (beyond the paper): instead of one hand-set α, each adder layer's r_x is the
      percentile among ``range_alphas`` whose quantized layer (groups, shared scales, fold rebuilt)
      minimises the output MSE against the float layer on ``range_search_images`` calibration images.
      ``range_search_scope="group"`` chooses it per weight group instead: a group's outputs depend only
      on its own shared range, so the per-group choice minimises each group's share of that MSE and
      never does worse than the per-layer one on it. ``"regroup"`` lets the errors form the groups too:
      each output channel joins the group of the candidate range that serves it best, with at most
      ``groups`` ranges per layer (the best subset of candidates, found exhaustively) — still one
      shared scale per group, the groups no longer clustered by max|W|.
      ``range_search_metric`` is what a candidate is scored by: ``mse`` (the layer's output MSE);
      ``centered`` (the MSE left after removing each output channel's mean error — the part a BatchNorm
      correction removes anyway); ``fisher`` (each element's squared error weighted by how much it moves
      the float model's prediction: the diagonal Gauss–Newton weight of KL(p_fp ‖ p),
      :mod:`adderquant.quant.sensitivity`); or ``kl`` (layer by layer, starting from the MSE choice, the
      candidate whose whole model predicts closest to the float model on the search images, BatchNorm
      correction included: :mod:`adderquant.quant.kl_search` — minutes, not seconds).
    - ``bn_correction`` (beyond the paper and the authors): keep the float model's BatchNorm statistics
      and correct each for the shift quantization causes in its input, measured against the float
      model on the same calibration images (``mean``, or ``mean_var`` for mean and scale;
      :func:`adderquant.quant.bn.correct_bn`).
    - ``learned_rounding`` (beyond the paper, any preset): AdaRound with block-wise reconstruction —
      that many Adam iterations per block (``rounding_batch_size`` images, ``rounding_lr``) choose each
      adder weight's rounding direction; 0 = off (:func:`adderquant.quant.rounding.learn_rounding`).
      Runs before the BatchNorm options, which then see the final codes.
    """

    bits: int = 4
    method: str = "paper"
    groups: int = 4
    group_feature: str = "max"
    weight_clamp: bool = True
    act_clamp: bool = True
    alpha: float = 0.999
    act_clamp_mode: str = "percentile"
    scale_source: str = "min"
    lossless_act_clamp: bool = False
    unsigned_activations: bool = False
    grid: str = "uniform"
    clamp_to: str = "representable"
    quantize_first_last: bool = False
    first_last_bits: int = 8
    weight_grid: str = "shared"
    act_batch_size: int = 128  # images per calibration batch of act_clamp_mode="batch_max"
    bn_recalibration: int = 0  # batches; 0 = off
    bn_momentum: float | None = None  # None = cumulative (exact statistics over all the batches)
    bn_batch_size: int = 128
    bn_pad: str | tuple[float, ...] = "darkest"  # what the re-estimation's crops pad with (see above)
    bn_correction: str | None = None  # None, "mean" or "mean_var": correct BN for the quantization shift
    range_search: bool = False  # choose each layer's r_x among range_alphas by output MSE
    range_alphas: tuple[float, ...] = (0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0)
    range_search_images: int = 64
    range_search_scope: str = "layer"  # one r_x per adder layer, per weight "group", or groups formed by it ("regroup")
    range_search_metric: str = "mse"  # what scores a candidate: "mse", "centered", "fisher" or "kl" (see above)
    learned_rounding: int = 0  # AdaRound iterations per block; 0 = off (quant/rounding.py)
    rounding_batch_size: int = 32
    rounding_lr: float = 1e-3

    def __post_init__(self):
        check_bits(self.bits, 2, 16)
        check_bits(self.first_last_bits, 2, 8, "first_last_bits")  # the integer path's int8 operands
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be ≥ 1, got {self.groups}")
        if self.group_feature not in GROUP_FEATURES:
            raise ValueError(f"group_feature must be one of {GROUP_FEATURES}, got {self.group_feature!r}")
        if self.scale_source not in SCALE_SOURCES:
            raise ValueError(f"scale_source must be one of {SCALE_SOURCES}, got {self.scale_source!r}")
        if self.act_clamp_mode not in ACT_CLAMP_MODES:
            raise ValueError(f"act_clamp_mode must be one of {ACT_CLAMP_MODES}, got {self.act_clamp_mode!r}")
        if self.grid not in ("uniform", "apot"):
            raise ValueError(f"grid must be 'uniform' or 'apot', got {self.grid!r}")
        if self.grid == "apot" and not 2 <= self.bits <= 6:
            raise ValueError(f"the APoT grid has level sets for 2..6 bits, got {self.bits}")
        if self.clamp_to not in CLAMP_TARGETS:
            raise ValueError(f"clamp_to must be one of {CLAMP_TARGETS}, got {self.clamp_to!r}")
        if self.scale_source == "best" and self.method != "qssf":
            raise ValueError("scale_source='best' chooses between the QSSF variants: use QuantConfig.qssf('best')")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.weight_grid not in WEIGHT_GRIDS:
            raise ValueError(f"weight_grid must be one of {WEIGHT_GRIDS}, got {self.weight_grid!r}")
        if self.weight_grid == "double_step" and (self.grid != "uniform" or self.lossless_act_clamp):
            raise ValueError("weight_grid='double_step' takes the uniform grid without lossless_act_clamp")
        if _not_int(self.act_batch_size) or self.act_batch_size < 1:
            raise ValueError(f"act_batch_size must be a positive integer, got {self.act_batch_size!r}")
        check_bn_options(self.bn_recalibration, self.bn_momentum, self.bn_batch_size)
        check_bn_pad(self.bn_pad)
        if self.range_search:
            if not self.range_alphas:
                raise ValueError("range_search needs at least one candidate in range_alphas")
            if not all(isinstance(a, int | float) and 0.0 < a <= 1.0 for a in self.range_alphas):
                raise ValueError(f"range_alphas must lie in (0, 1], got {self.range_alphas!r}")
            if self.act_clamp_mode != "percentile" or self.grid != "uniform":
                raise ValueError("range_search chooses among percentiles on the uniform grid")
            if _not_int(self.range_search_images) or self.range_search_images < 1:
                raise ValueError(f"range_search_images must be a positive integer, got {self.range_search_images!r}")
        if self.range_search_scope not in RANGE_SEARCH_SCOPES:
            raise ValueError(f"range_search_scope must be one of {RANGE_SEARCH_SCOPES}, "
                             f"got {self.range_search_scope!r}")
        if self.range_search_metric not in RANGE_SEARCH_METRICS:
            raise ValueError(f"range_search_metric must be one of {RANGE_SEARCH_METRICS}, "
                             f"got {self.range_search_metric!r}")
        if self.range_search_metric != "mse" and not self.range_search:
            raise ValueError(f"range_search_metric={self.range_search_metric!r} scores the range search: "
                             "it needs range_search=True")
        if self.bn_correction not in (None, "mean", "mean_var"):
            raise ValueError(f"bn_correction must be None, 'mean' or 'mean_var', got {self.bn_correction!r}")
        if self.bn_correction and self.bn_recalibration:
            raise ValueError("bn_correction keeps the float model's statistics as the reference; "
                             "bn_recalibration replaces them: choose one")
        check_rounding_options(self.learned_rounding, self.rounding_batch_size, self.rounding_lr)
        if self.learned_rounding and self.grid != "uniform":
            raise ValueError("learned_rounding learns integer weight codes: it needs grid='uniform'")

    @classmethod
    def paper(cls, bits: int = 4, **overrides) -> QuantConfig:
        """The paper's method: g = 4 groups by max|W|, lossless weight clamp, α = 0.999 outlier clamp."""
        return cls(bits=bits, method="paper", **overrides)

    @classmethod
    def paper_unsigned(cls, bits: int = 4, **overrides) -> QuantConfig:
        """The paper's method on the unsigned grid for post-ReLU inputs — what ``ours`` was until the BN
        correction and the range search were chosen (kept so earlier results stay reproducible:
        docs/results/ptq_resnet20_cifar10.md calls it ``ours``)."""
        return cls(bits=bits, method="paper-unsigned", **{"unsigned_activations": True, **overrides})

    @classmethod
    def ours_fast(cls, bits: int = 4, **overrides) -> QuantConfig:
        """The best preset without learned rounding — the fast path (one calibration pass, seconds):
        the paper's method on the unsigned grid plus, per bit width, the beyond-paper switches
        (range search per layer, per group or forming the groups, BatchNorm correction or re-estimation)
        that kept the float model's
        predictions best on held-out training images, never on the test set (``OURS_SWITCHES``;
        scripts/ptq_select.py, docs/results/ptq_select.md).
        Widths above 8 bits take the 8-bit choice."""
        return cls(bits=bits, method="ours-fast", **{"unsigned_activations": True,
                                                      **OURS_SWITCHES[_ours_width(bits)], **overrides})

    @classmethod
    def ours(cls, bits: int = 4, **overrides) -> QuantConfig:
        """The best preset measured: per width, the switch set — with or without learned rounding —
        with the lowest held-out KL of every set measured (``OURS_BEST``; docs/results/ptq_select.md).
        Learned rounding costs tens of seconds per ResNet-20 on a CPU, hence the separate fast preset."""
        return cls(bits=bits, method="ours", **{"unsigned_activations": True,
                                                 **OURS_BEST[_ours_width(bits)], **overrides})

    @classmethod
    def qssf(cls, source: str = "weights", bits: int = 4, **overrides) -> QuantConfig:
        """One shared scale per layer (QSSF), its range from the weights, the activations, or the
        ``best`` of the two on the calibration images. Groups and clamps are what QSSF is without, so
        only the first/last-layer switches may be overridden."""
        if source not in ("weights", "activations", "best"):
            raise ValueError(f"QSSF source must be 'weights', 'activations' or 'best', got {source!r}")
        extra = sorted(set(overrides) - QSSF_OVERRIDES)
        if extra:
            raise ValueError(f"QSSF is one scale per layer without clamps: it takes no {', '.join(extra)}")
        method = "qssf" if source == "best" else f"qssf-{source[0]}"
        return cls(bits=bits, method=method, groups=1, weight_clamp=False, act_clamp=False,
                   scale_source=source, **overrides)

    @classmethod
    def authors(cls, bits: int = 4, **overrides) -> QuantConfig:
        """The authors' published code (MindSpore "AdderQuant"), not the paper's text: unsigned
        activations with double-step signed weights, 4 groups by max|W| (k-means-optimal), r = min(r_w,
        r_x) with the weights clamped to the literal [−r_x, r_x], r_x the running per-batch max of the
        α = 0.9997 index on 128-image batches, then 200 batches of BN re-estimation (EMA momentum 0.1).
        docs/quantization.md lists what differs from the paper and from their code."""
        return cls(bits=bits, method="authors", **{
            "groups": 4, "group_feature": "max", "weight_clamp": True, "clamp_to": "range", "act_clamp": True,
            "act_clamp_mode": "batch_max", "alpha": 0.9997, "act_batch_size": 128, "scale_source": "min",
            "weight_grid": "double_step", "bn_recalibration": 200, "bn_momentum": 0.1, "bn_batch_size": 128,
            **overrides})

    def with_(self, **changes) -> QuantConfig:
        return replace(self, **changes)


def _not_int(v) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


def check_bn_options(batches, momentum, batch_size) -> None:
    """One ValueError for bad BatchNorm re-estimation options (shared with :mod:`adderquant.quant.bn`)."""
    problems = []
    if _not_int(batches) or batches < 0:
        problems.append(f"bn_recalibration must be an integer ≥ 0 (batches; 0 = off), got {batches!r}")
    if _not_int(batch_size) or batch_size < 2:
        problems.append(f"bn_batch_size must be an integer ≥ 2 (a batch variance needs 2 images), got {batch_size!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, int | float)
                                 or not 0.0 < momentum <= 1.0):
        problems.append(f"bn_momentum must be None (cumulative) or in (0, 1], got {momentum!r}")
    if problems:
        raise ValueError("; ".join(problems))


BN_PADS = ("darkest", "zero")


def check_bn_pad(pad) -> None:
    """ValueError unless ``pad`` is one of ``BN_PADS`` or a non-empty tuple of finite numbers."""
    if isinstance(pad, str):
        if pad not in BN_PADS:
            raise ValueError(f"bn_pad must be one of {BN_PADS} or one value per input channel, got {pad!r}")
        return
    if not (isinstance(pad, tuple) and pad and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                   and math.isfinite(v) for v in pad)):
        raise ValueError(f"bn_pad must be one of {BN_PADS} or a tuple of finite values, one per input channel, "
                         f"got {pad!r}")


# Nine candidate percentiles instead of the default six, for the groups formed by the search (which can
# use more); all ≥ 0.99, the smallest percentile scripts/ptq_select.py's observers keep.
FINE_RANGE_ALPHAS = (0.99, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9999, 1.0)

# What ``QuantConfig.ours_fast`` adds to the unsigned grid at each width: the fast candidate with the lowest
# mean KL from the float model on held-out training images over three calibration seeds
# (scripts/ptq_select.py, docs/results/ptq_select.md; BN re-estimation: 50 batches of black-padded crops).
OURS_SWITCHES: dict[int, dict] = {
    8: {"range_search": True, "range_search_scope": "regroup", "bn_correction": "mean_var"},
    7: {"range_search": True, "range_search_scope": "regroup", "bn_correction": "mean_var"},  # not measured: 8's
    6: {"range_search": True, "range_search_scope": "regroup", "range_alphas": FINE_RANGE_ALPHAS,
        "bn_correction": "mean_var"},
    5: {"range_search": True, "range_search_scope": "regroup", "range_search_metric": "centered",
        "bn_correction": "mean_var"},
    4: {"range_search": True, "range_search_scope": "group", "bn_correction": "mean_var"},
    3: {"range_search": True, "range_search_scope": "regroup", "range_alphas": FINE_RANGE_ALPHAS,
        "range_search_metric": "centered", "bn_correction": "mean_var"},
    2: {"range_search": True, "range_search_scope": "regroup", "range_search_metric": "fisher",
        "bn_correction": "mean_var"},
}

# What ``QuantConfig.ours`` adds at each width: the set, with or without learned rounding (200 iterations
# per block), with the lowest mean held-out KL of every set scripts/ptq_select.py measured at that width.
OURS_BEST: dict[int, dict] = {
    **{bits: OURS_SWITCHES[bits] for bits in (8, 7, 5, 4, 3)},
    6: {"range_search": True, "bn_correction": "mean", "learned_rounding": 200},
    2: {"range_search": True, "range_search_scope": "regroup", "range_alphas": FINE_RANGE_ALPHAS,
        "bn_recalibration": 50, "learned_rounding": 200},
}


def _ours_width(bits: int) -> int:
    """The measured width whose choice ``bits`` takes (wider than 8 bits: the 8-bit one)."""
    return min(max(bits, min(OURS_SWITCHES)), max(OURS_SWITCHES))


def check_rounding_options(iters, batch_size, lr) -> None:
    """One ValueError for bad learned-rounding options (shared with :mod:`adderquant.quant.rounding`)."""
    problems = []
    if _not_int(iters) or iters < 0:
        problems.append(f"learned_rounding must be an integer ≥ 0 (iterations per block; 0 = off), got {iters!r}")
    if _not_int(batch_size) or batch_size < 1:
        problems.append(f"rounding_batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0.0 < lr < float("inf"):
        problems.append(f"rounding_lr must be a positive finite number, got {lr!r}")
    if problems:
        raise ValueError("; ".join(problems))


RANGE_SEARCH_SCOPES = ("layer", "group", "regroup")
RANGE_SEARCH_METRICS = ("mse", "centered", "fisher", "kl")
QSSF_OVERRIDES = {"quantize_first_last", "first_last_bits", "bn_recalibration", "bn_momentum", "bn_batch_size",
                  "bn_pad", "bn_correction", "learned_rounding", "rounding_batch_size", "rounding_lr"}


@dataclass(frozen=True)
class APoTConfig:
    """APoT (ICLR 2020) for CNN layers: b-bit inner layers, first and last layers at ``first_last_bits``
    (``None`` keeps them float); thresholds fitted on the calibration images."""

    bits: int = 4
    first_last_bits: int | None = 8
    method: str = "apot"

    def __post_init__(self):
        check_bits(self.bits, *BIT_RANGE["apot"])
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, 2, 16, "first_last_bits")


METHODS = ("paper", "ours", "ours-fast", "authors", "paper-unsigned", "qssf", "qssf-w", "qssf-a")


def preset(method: str, bits: int, **overrides) -> QuantConfig:
    """Config for a method name (the CLI's ``--method``); overrides a preset does not take are refused here,
    before any work."""
    known = {f.name for f in fields(QuantConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown quantization options {unknown}")
    if method == "paper":
        return QuantConfig.paper(bits, **overrides)
    if method == "ours":
        return QuantConfig.ours(bits, **overrides)
    if method == "ours-fast":
        return QuantConfig.ours_fast(bits, **overrides)
    if method == "paper-unsigned":
        return QuantConfig.paper_unsigned(bits, **overrides)
    if method == "authors":
        return QuantConfig.authors(bits, **overrides)
    if method in ("qssf", "qssf-w", "qssf-a"):
        return QuantConfig.qssf({"qssf": "best", "qssf-w": "weights", "qssf-a": "activations"}[method], bits,
                                **overrides)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
