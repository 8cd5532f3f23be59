"""Exported integer AdderNet vs the fake-quantized model it comes from, image for image.

Quantizes a checkpoint (paper method, first/last layers 8-bit), exports it to ``.aqz``, reloads the
file, and on each evaluation set compares the predictions and logits of

- ``fp``: the full-precision model,
- ``fake32``: the fake-quant model in float32 (what ``adderquant eval`` runs),
- ``fake64``: the same fake-quant model evaluated in float64 (``adderquant.integer.float64``),
- ``int``: the integer engine (PyTorch integer ops) running the exported file,
- ``numpy``: the torch-free NumPy runtime on the same file (``--numpy``; slower).

Example (docs/results/integer_exactness.md; ``--checkpoint`` defaults to the official AdderNet ResNet-20,
found by ``adderquant.checkpoints.find_official_addernet``)::

    python scripts/integer_exactness.py \\
        --calib-data /work/shared/data/cifar10 --data /work/shared/data/cifar10-subset.npz --numpy \\
        --export /tmp/resnet20-w4.aqz --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adderquant.checkpoints import find_official_addernet, load
from adderquant.data import calibration_subset, load_dataset, normalize
from adderquant.integer import IntegerEngine, NumpyRuntime, convert, export
from adderquant.integer.float64 import float64_reference
from adderquant.kernels import available_backends
from adderquant.quant import preset, quantize


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.inference_mode()
def _float_logits(model, x, norm, batch: int) -> torch.Tensor:
    return torch.cat([model(normalize(x[i : i + batch], *norm)).double() for i in range(0, len(x), batch)])


def _int_logits(run, x, batch: int) -> torch.Tensor:
    return torch.cat([torch.as_tensor(run(x[i : i + batch])) for i in range(0, len(x), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=find_official_addernet(),
                    help="default: the official AdderNet ResNet-20 (checkpoints.find_official_addernet)")
    ap.add_argument("--calib-data", required=True, help="data set whose training split gives the calibration images")
    ap.add_argument("--data", nargs="+", required=True, help="evaluation sets (their test split)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="paper", help="preset name (adderquant.quant.preset), first/last at 8 bits")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=None, help="first N test images only")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--frac-bits", type=int, nargs="+", default=[40],
                    help="fixed-point fraction bits; the first is exported, others are compared in memory")
    ap.add_argument("--numpy", action="store_true", help="also run the NumPy runtime and compare its logits")
    ap.add_argument("--export", default="integer_model.aqz")
    ap.add_argument("--qat-state", default=None, metavar="FILE",
                    help="a QAT checkpoint (--qat-checkpoint) of this quantization: its weights are loaded and "
                         "folded before the export")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.checkpoint is None:
        ap.error("the official AdderNet ResNet-20 was not found: pass --checkpoint")

    torch.manual_seed(0)
    ck = load(args.checkpoint)
    norm = ck.normalization
    calib_ds = load_dataset(args.calib_data)
    calib = normalize(calibration_subset(calib_ds, args.calib, seed=0), *norm)
    config = preset(args.method, args.bits, quantize_first_last=True)
    _log(f"quantizing {ck.name} ({config.method}, {args.bits}-bit, first/last 8-bit) on {args.calib} images")
    result = quantize(ck.model, calib, config)
    q = result.model
    if args.qat_state:  # the fine-tuned state: latent weights as QAT left them, then folded as qat() does
        from adderquant.quant.qat import fold_weights, unfold_weights

        unfold_weights(q, ck.model)
        q.load_state_dict(torch.load(args.qat_state, map_location="cpu", weights_only=True)["model"])
        fold_weights(q)
        _log(f"loaded the QAT state {args.qat_state}")
    del calib_ds, calib
    path = export(result, args.export, name=ck.name, normalization=norm,
                  meta={"checkpoint": str(args.checkpoint), "calibration": f"{args.calib} images of "
                        f"{args.calib_data}, calibration_subset seed 0"}, frac_bits=args.frac_bits[0])
    _log(f"exported {path} ({path.stat().st_size} bytes); adder backends: {available_backends()}")
    engine = IntegerEngine(path)  # from the file: what is tested is the exported artifact
    extra = {fb: IntegerEngine(convert(q, norm, frac_bits=fb)) for fb in args.frac_bits[1:]}
    q64 = float64_reference(q)
    results = {"checkpoint": str(args.checkpoint), "export": str(path), "bits": args.bits, "method": args.method,
               "qat_state": args.qat_state,
               "frac_bits": args.frac_bits[0], "adder_backends": available_backends(), "sets": []}
    for data in args.data:
        ds = load_dataset(data)
        x, y = ds.x_test, ds.y_test
        if args.limit:
            x, y = x[: args.limit], y[: args.limit]
        _log(f"{data}: {len(y)} test images")
        res = {"data": data, "n": len(y), "seconds": {}}
        logits, t = {}, {}
        for key, model in (("fp", ck.model), ("fake32", q), ("fake64", q64)):
            t0 = time.perf_counter()
            logits[key] = _float_logits(model.eval(), x, norm, args.batch_size)
            t[key] = time.perf_counter() - t0
            _log(f"  {key}: {t[key]:.1f} s")
        t0 = time.perf_counter()
        int_logits = _int_logits(engine, x, args.batch_size)
        t["int"] = time.perf_counter() - t0
        _log(f"  int: {t['int']:.1f} s")
        logits["int"] = int_logits.double() * 2.0**-engine.frac_bits
        for fb, eng in extra.items():
            logits[f"int{fb}"] = _int_logits(eng, x, args.batch_size).double() * 2.0**-fb
        if args.numpy:
            rt = NumpyRuntime(path)
            t0 = time.perf_counter()
            np_logits = np.concatenate([rt.logits(x[i : i + args.batch_size].numpy())
                                        for i in range(0, len(x), args.batch_size)])
            t["numpy"] = time.perf_counter() - t0
            _log(f"  numpy: {t['numpy']:.1f} s")
            res["numpy_logits_equal_int"] = bool(np.array_equal(np_logits, int_logits.numpy()))
            res["numpy_logits_differing_images"] = int((np_logits != int_logits.numpy()).any(1).sum())
        preds = {k: v.argmax(1) for k, v in logits.items()}
        res["top1"] = {k: 100.0 * float((p == y).double().mean()) for k, p in preds.items()}
        res["seconds"] = t
        res["differing_predictions"] = {
            f"{a}_vs_{b}": int((preds[a] != preds[b]).sum())
            for a, b in [("int", "fake32"), ("int", "fake64"), ("fake32", "fake64"), ("int", "fp")]
            + [(f"int{fb}", r) for fb in extra for r in ("fake32", "fake64")]}
        res["max_abs_logit_diff"] = {
            f"{a}_vs_{b}": float((logits[a] - logits[b]).abs().max())
            for a, b in [("int", "fake32"), ("int", "fake64"), ("fake32", "fake64")]
            + [(f"int{fb}", "fake64") for fb in extra]}
        res["differing_images_int_vs_fake32"] = torch.nonzero(preds["int"] != preds["fake32"]).flatten().tolist()
        results["sets"].append(res)
        print(json.dumps(res, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
