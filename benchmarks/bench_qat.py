"""What a QAT step costs against a training step of the same AdderNet, side by side. Not a test.

Three steps on one ResNet-20 (the official checkpoint when it is there: the scale groups it gets
decide how many adder calls a quantized layer makes; else random weights), each the loop's
own step (``adderquant.loop.sgd_epoch`` over one batch: crop + flip, forward, loss, AdderNet backward,
SGD): ``train`` (the float AdderNet), ``qat`` (the 4-bit ``ours-fast`` model with latent weights, the
default QAT recipe without distillation) and ``qat_distill`` (the default recipe: plus the
full-precision teacher's forward pass). They take turns, so that load from other processes hits
them alike; the median of ``--steps`` is reported with the ratios to ``train``::

    python benchmarks/bench_qat.py [--batch 256] [--steps 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
import torch.nn.functional as F
from common import cpu_name, take_turns

from adderquant import kernels
from adderquant.checkpoints import find_official_addernet, load
from adderquant.data import CIFAR_ADDERNET_NORM, normalize
from adderquant.loop import crop_flip, sgd_epoch
from adderquant.models import create
from adderquant.nn import AdderConv2d
from adderquant.quant import QuantConfig, quantize
from adderquant.quant.qat import distillation_loss, unfold_weights


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = find_official_addernet()
    fp = load(source).model.eval() if source else create("resnet20").eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.batch,), generator=g)
    calib = normalize(images, *CIFAR_ADDERNET_NORM)
    if not source:
        with torch.no_grad():  # give BatchNorm sensible statistics before quantizing
            fp.train()
            fp(calib)
            fp.eval()
    q = quantize(fp, calib, QuantConfig.ours_fast(4)).model
    unfold_weights(q, fp)
    student = copy.deepcopy(fp)

    def stepper(model, teacher=None):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        extra = {}
        if teacher is not None:
            extra = {"teacher": teacher, "loss_fn": lambda s, y, t: distillation_loss(s, y, t, 0.5, 4.0)}
        return lambda: sgd_epoch(model, opt, [(images, labels)], CIFAR_ADDERNET_NORM, augment=crop_flip(seed=int),
                                 loss_fn=extra.get("loss_fn", F.cross_entropy), teacher=teacher)

    teacher = copy.deepcopy(fp).eval()
    fns = {"train": stepper(student), "qat": stepper(q), "qat_distill": stepper(copy.deepcopy(q), teacher)}
    times = take_turns(fns, args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    sets = [len(m.scale_sets()) for m in q.modules() if hasattr(m, "scale_sets")]
    result = {"cpu": cpu_name(), "model": source or "random ResNet-20", "adder_calls_per_layer": sets,
              "threads": args.threads, "batch": args.batch, "steps": args.steps,
              "backend": kernels.backend_name("forward", calib, next(m.weight for m in fp.modules()
                                                                     if isinstance(m, AdderConv2d))),
              "median_step_s": med, "ratio_to_train": {k: med[k] / med["train"] for k in med}}
    print(f"{cpu_name()}, {args.threads} threads, batch {args.batch}, median of {args.steps} steps; "
          f"{result['model']}; adder calls per quantized layer: {sets}")
    for k, v in med.items():
        print(f"  {k:12s} {v * 1e3:8.1f} ms/step   ×{v / med['train']:.2f} of a training step")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
