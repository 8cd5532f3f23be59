#!/usr/bin/env python
"""What the range search's scope buys, layer by layer: the quantized adder layers' output error.

For the official AdderNet ResNet-20, each calibration seed (1024 training images) and width, every
adder layer is quantized on the unsigned grid (the paper's method otherwise) for each candidate
activation range of ``QuantConfig.range_alphas``; the squared error of each output channel against
the float layer, on the search's own 64 calibration images, is then minimised under four scopes:
one range per layer (``range_search_scope="layer"``), one per k-means group of max|W| (``"group"``),
groups formed by the errors (``"regroup"``, at most 4 ranges per layer) and — a bound, not a
quantizer — every channel its own best candidate. Reported: the per-element MSE summed over the
layers. Training images only; this chooses nothing (``scripts/ptq_select.py`` does, by the model's
held-out KL), it shows where the gain comes from.

    python scripts/search_scopes.py --data ../shared/data/cifar10     # docs/results/search_scopes.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from ptq_select import SEEDS

from adderquant.checkpoints import find_official_addernet, load
from adderquant.data import calibration_indices, load_dataset, normalize
from adderquant.nn import AdderConv2d
from adderquant.quant.config import QuantConfig
from adderquant.quant.grouping import error_groups, per_group_errors
from adderquant.quant.ptq import _adder_inputs, calibrate, candidate_errors, grid_signed

ROOT = Path(__file__).resolve().parents[1]
SCOPES = ("layer", "group", "regroup", "per channel (bound)")


@torch.no_grad()
def layer_errors(model, calib, bits: int) -> dict[str, dict[str, float]]:
    """Per adder layer: the per-element output MSE under each scope."""
    config = QuantConfig.paper(bits, unsigned_activations=True, range_search=True)
    observers = calibrate(model, calib, config, min_alpha=min(config.range_alphas))
    inputs = _adder_inputs(model, calib, config.range_search_images)
    out = {}
    for name, obs in observers.items():
        module = model.get_submodule(name)
        if not isinstance(module, AdderConv2d):
            continue
        _, _, e, group_of = candidate_errors(module, inputs[name], obs, config, grid_signed(config, obs))
        used, labels = error_groups(e, config.groups)
        totals = (float(e.sum(1).min()), float(per_group_errors(e, group_of).amin(0).sum()),
                  float(e[torch.tensor(used)[labels], torch.arange(e.shape[1])].sum()), float(e.amin(0).sum()))
        elements = module(inputs[name][:1]).numel() * len(inputs[name])  # output elements
        out[name] = {scope: t / elements for scope, t in zip(SCOPES, totals, strict=True)}
    return out


def markdown(out: dict) -> str:
    lines = [f"# Range search scopes: output error of the quantized adder layers — `{out['command']}`", "",
             "Official AdderNet ResNet-20, unsigned grid, 4 groups, candidates α ∈ "
             f"{out['alphas']}; per-element MSE of each adder layer's output against the float layer on the "
             "search's 64 calibration images, summed over the 20 adder layers; mean ± std over calibration "
             f"seeds {list(SEEDS)} (training images only). The last column is a bound (one range per "
             "channel), not a quantizer.", "",
             "| bits | " + " | ".join(SCOPES) + " | regroup vs layer |", "|---|" + "---|" * (len(SCOPES) + 1)]
    for bits, per_seed in out["sums"].items():
        cells = []
        for scope in SCOPES:
            v = torch.tensor([s[scope] for s in per_seed.values()], dtype=torch.float64)
            cells.append(f"{float(v.mean()):.4f} ± {float(v.std()):.4f}")
        gain = sum(s["regroup"] / s["layer"] for s in per_seed.values()) / len(per_seed)
        lines.append(f"| {bits} | " + " | ".join(cells) + f" | {100 * (gain - 1):+.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 directory (its training split is used)")
    ap.add_argument("--checkpoint", default=find_official_addernet())
    ap.add_argument("--bits", type=int, nargs="+", default=[5, 4, 3])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "search_scopes"))
    args = ap.parse_args(argv)
    if args.checkpoint is None:
        ap.error("the official AdderNet ResNet-20 was not found: pass --checkpoint")
    ck = load(args.checkpoint)
    ds = load_dataset(args.data)
    out = {"command": "python scripts/search_scopes.py --data " + args.data, "checkpoint": str(args.checkpoint),
           "alphas": list(QuantConfig.paper(4).range_alphas), "layers": {}, "sums": {},
           "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
           "torch": torch.__version__}
    for bits in args.bits:
        out["layers"][bits], out["sums"][bits] = {}, {}
        for seed in SEEDS:
            calib = normalize(ds.x_train[calibration_indices(ds, 1024, seed)], *ck.normalization)
            layers = out["layers"][bits][seed] = layer_errors(ck.model.eval(), calib, bits)
            out["sums"][bits][seed] = {scope: sum(v[scope] for v in layers.values()) for scope in SCOPES}
            print(bits, seed, out["sums"][bits][seed], flush=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
