"""Gradient norms of a fake-quantized AdderNet in training mode, per preset: why QAT of `ours` diverges.

One batch of training images, cross-entropy, one backward pass (no update) through the model that
``adderquant.quantize`` returns for each preset; prints the gradient norm of the first convolution,
the first block's BatchNorm, the classifier, and of all adder weights and all other parameters::

    python scripts/qat_gradient_norms.py --data ../shared/data/cifar10 [--bits 4] [--batch 256]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from adderquant.checkpoints import find_official_addernet, load
from adderquant.data import calibration_indices, load_dataset, normalize
from adderquant.quant import QuantAdderConv2d, quantize
from adderquant.quant.config import preset

NAMED = ("conv1.weight", "bn1.weight", "layer1.0.bn1.weight", "layer3.2.bn2.weight", "fc.weight")


def gradient_norms(model, x, y) -> dict[str, float]:
    model.train()
    F.cross_entropy(model(x), y).backward()
    adder = {id(m.weight) for m in model.modules() if isinstance(m, QuantAdderConv2d)}
    params = dict(model.named_parameters())
    out = {name: float(params[name].grad.norm()) for name in NAMED if name in params}
    for label, keep in (("all adder weights", True), ("all other parameters", False)):
        grads = [p.grad.flatten() for p in params.values() if p.grad is not None and (id(p) in adder) == keep]
        out[label] = float(torch.cat(grads).norm())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=find_official_addernet())
    ap.add_argument("--data", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["paper", "ours"])
    args = ap.parse_args(argv)
    ds = load_dataset(args.data)
    norm = load(args.checkpoint).normalization
    calib = normalize(ds.x_train[calibration_indices(ds, 1024, 0)], *norm)
    x, y = normalize(ds.x_train[: args.batch], *norm), ds.y_train[: args.batch]
    table = {}
    for method in args.methods:
        model = quantize(load(args.checkpoint).model.eval(), calib, preset(method, args.bits)).model
        table[method] = gradient_norms(model, x, y)
    print(f"gradient norms, one batch of {args.batch} training images, {args.bits}-bit, training mode")
    print("parameter | " + " | ".join(args.methods))
    for name in table[args.methods[0]]:
        print(f"{name} | " + " | ".join(f"{table[m][name]:.3g}" for m in args.methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
