"""Why QAT of the unsigned-grid presets diverged, measured: gradient norms in training mode, per preset and
backward rule.

One batch of training images, cross-entropy, one backward pass (no update) through the model that
``adderquant.quantize`` returns for each preset, once with the clamped weights (the paper's literal
QAT) and once with the latent, unclamped weights (``QuantAdderConv2d.unfold``: the STE through the
Theorem-1 fold, adderquant's default). Prints, per run, the gradient norm of the first convolution,
two BatchNorms, the classifier, all adder weights and all other parameters; the input-gradient norm
of every adder layer from the last to the first (the growth towards the input); and, for one layer,
the mean HardTanh coefficient ``mean_o HardTanh(W_o − X)`` over output channels — the weight on the
all-channel sum ``Σ_o G_o`` of the output gradient, the mode that grows::

    python scripts/qat_gradient_norms.py --data ../shared/data/cifar10 [--bits 4] [--batch 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from adderquant.checkpoints import find_official_addernet, load
from adderquant.data import calibration_indices, load_dataset, normalize
from adderquant.quant import QuantAdderConv2d, quantize
from adderquant.quant.config import preset
from adderquant.quant.qat import unfold_weights

NAMED = ("conv1.weight", "bn1.weight", "layer1.0.bn1.weight", "layer3.2.bn2.weight", "fc.weight")
PROBE = "layer2.0.conv2"


def gradient_norms(model, x, y) -> dict:
    model.train()
    adders = {n: m for n, m in model.named_modules() if isinstance(m, QuantAdderConv2d)}
    inputs, handles = {}, []
    for name, m in adders.items():
        def keep(_m, inp, name=name):
            inp[0].retain_grad()
            inputs[name] = inp[0]
        handles.append(m.register_forward_pre_hook(keep))
    F.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    adder_w = {id(m.weight) for m in adders.values()}
    params = dict(model.named_parameters())
    out = {name: float(params[name].grad.norm()) for name in NAMED if name in params}
    for label, keep in (("all adder weights", True), ("all other parameters", False)):
        grads = [p.grad.flatten() for p in params.values() if p.grad is not None and (id(p) in adder_w) == keep]
        out[label] = float(torch.cat(grads).norm())
    out["adder input gradients, last to first"] = [float(inputs[n].grad.norm()) for n in reversed(adders)]
    layer, xin = adders[PROBE], inputs[PROBE].detach()
    dequantized = (layer.acc_weight() * layer.channel_scales().view(-1, 1, 1, 1)).detach()
    w_back = layer.weight.detach() if layer.latent else dequantized  # the weights the backward differentiates
    cols = F.unfold(xin, layer.kernel_size, padding=layer.padding, stride=layer.stride)  # (N, K, P)
    ht = torch.clamp(w_back.flatten(1)[None, :, :, None] - cols[:, None], -1, 1)  # (N, O, K, P)
    out[f"{PROBE}: mean over channels of HardTanh(W − X)"] = float(ht.mean(1).abs().mean())
    out[f"{PROBE}: mean |HardTanh(W − X)|"] = float(ht.abs().mean())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=find_official_addernet())
    ap.add_argument("--data", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["paper", "paper-unsigned", "ours"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ds = load_dataset(args.data)
    norm = load(args.checkpoint).normalization
    calib = normalize(ds.x_train[calibration_indices(ds, 1024, 0)], *norm)
    x, y = normalize(ds.x_train[: args.batch], *norm), ds.y_train[: args.batch]
    table = {}
    for method in args.methods:
        for backward in ("clamped", "latent"):
            fp = load(args.checkpoint).model.eval()
            model = quantize(fp, calib, preset(method, args.bits)).model
            if backward == "latent":
                unfold_weights(model, fp)
            table[f"{method}, {backward}"] = gradient_norms(model, x, y)
    print(f"gradient norms, one batch of {args.batch} training images, {args.bits}-bit, training mode")
    runs = list(table)
    print("quantity | " + " | ".join(runs))
    print("|".join(["---"] * (len(runs) + 1)))
    for name, first in table[runs[0]].items():
        if isinstance(first, list):
            for i in (0, len(first) // 2, len(first) - 1):
                print(f"{name} [{i}] | " + " | ".join(f"{table[r][name][i]:.3g}" for r in runs))
        else:
            print(f"{name} | " + " | ".join(f"{table[r][name]:.3g}" for r in runs))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bits": args.bits, "batch": args.batch, "runs": table}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
