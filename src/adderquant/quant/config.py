"""``QuantConfig``: every switch of the AdderNet quantizer as one plain dataclass, with presets."""

from __future__ import annotations

from dataclasses import dataclass, replace

GROUP_FEATURES = ("max", "mean", "all", "uniform")
SCALE_SOURCES = ("min", "weights", "activations")
ACT_CLAMP_MODES = ("percentile", "max_scale")
CLAMP_TARGETS = ("representable", "range")


@dataclass(frozen=True)
class QuantConfig:
    """How adder layers are quantized (NeurIPS 2022, Sec. 3) — and, with ``method="apot"``, CNN layers.

    Per adder layer, with ``r_x`` the activation range and ``r_wj`` the weight range of group j:

    - ``groups``/``group_feature``: output channels clustered into g groups by max|W_c| (Eq. 14–15);
      one shared scale per group. ``groups=1`` is one shared scale per layer (QSSF).
    - ``weight_clamp``: clamp W to [-r_x, r_x] and fold the excess into a bias (Theorem 1, lossless).
    - ``act_clamp``: r_x = sorted|X|[ceil(α(n-1))] (``percentile``) or α·max|X| (``max_scale``);
      off: r_x = max|X|.
    - ``clamp_to``: the weight-clamp interval: ``representable`` = [q_n·s_j, q_p·s_j] (exact for the
      quantized activations) or ``range`` = the paper's literal [-r_x, r_x].
    - ``scale_source``: each group's shared range: ``min`` = min(r_wj, r_x) (the paper), ``weights`` =
      r_wj (QSSF-w), ``activations`` = r_x (QSSF-a).
    - ``unsigned_activations`` (beyond the paper): a layer whose calibration inputs are all ≥ 0 (after
      ReLU) uses the unsigned grid [0, 2^b−1] for weights and activations; weights below 0 fold into
      the bias exactly as in Theorem 1, so the non-negative activations get all 2^b levels.
    - ``grid`` (research option): ``uniform`` integer levels, or ``apot`` — APoT levels (ICLR 2020)
      on each group's shared range (fake-quant only; measured in docs/results).
    - ``lossless_act_clamp`` (beyond the paper): inside a group whose quantized weights lie within the
      integer range, activations above the range are compensated exactly by ``-Σ_window excess``.
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

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")
        if self.groups < 1:
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
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")

    @classmethod
    def paper(cls, bits: int = 4, **overrides) -> QuantConfig:
        """The paper's method: g = 4 groups by max|W|, lossless weight clamp, α = 0.999 outlier clamp."""
        return cls(bits=bits, method="paper", **overrides)

    @classmethod
    def ours(cls, bits: int = 4, **overrides) -> QuantConfig:
        """The paper's method plus the beyond-paper switch that measured better on CIFAR-10 at every bit
        width: the unsigned grid (docs/results/ptq_resnet20_cifar10.md; the lossless activation clamp
        measured worse and stays off)."""
        return cls(bits=bits, method="ours", **{"unsigned_activations": True, **overrides})

    @classmethod
    def qssf(cls, source: str = "weights", bits: int = 4, **overrides) -> QuantConfig:
        """One shared scale per layer (QSSF), its range from the weights or from the activations."""
        if source not in ("weights", "activations"):
            raise ValueError(f"QSSF source must be 'weights' or 'activations', got {source!r}")
        return cls(bits=bits, method=f"qssf-{source[0]}", groups=1, weight_clamp=False, act_clamp=False,
                   scale_source=source, **overrides)

    @classmethod
    def apot(cls, bits: int = 4, **overrides) -> QuantConfig:
        """APoT (ICLR 2020) for CNN layers; first and last layers at 8 bits."""
        return cls(bits=bits, method="apot", **overrides)

    def with_(self, **changes) -> QuantConfig:
        return replace(self, **changes)


def preset(method: str, bits: int, **overrides) -> QuantConfig:
    """Config for a CLI method name: ``paper``, ``ours``, ``qssf-w``, ``qssf-a`` (``qssf`` is chosen later)."""
    if method == "paper":
        return QuantConfig.paper(bits, **overrides)
    if method == "ours":
        return QuantConfig.ours(bits, **overrides)
    if method in ("qssf-w", "qssf-a"):
        return QuantConfig.qssf("weights" if method == "qssf-w" else "activations", bits, **overrides)
    if method == "apot":
        return QuantConfig.apot(bits, **overrides)
    raise ValueError(f"unknown method {method!r}; choose paper, ours, qssf, qssf-w, qssf-a or apot")
