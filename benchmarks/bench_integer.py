"""Images/s of the integer AdderNet against the float models it comes from, side by side. Not a test.

Four ways to run one quantized ResNet-20 (4-bit paper method, first/last layers 8-bit) on this CPU:
``fp`` (the full-precision AdderNet, float32), ``fake_quant`` (the fake-quantized model, float32),
``int_torch`` (the integer engine: PyTorch integer ops, adder layers through
``adderquant.kernels.int_adder_conv2d``) and ``int_numpy`` (the torch-free NumPy runtime on the
exported ``.aqz``). Each is timed on the same uint8 images at every batch size (normalisation
included for the float models); the best of ``--repeat`` runs after a warm-up, the runners taking
turns so that load from other processes hits them alike. On a shared machine compare runs taken
while it is quiet::

    python benchmarks/bench_integer.py [--batch 64 256] [--repeat 3] [--threads 2] [--json out.json]

Without ``--checkpoint``/``--data`` (or when they are absent) it uses a randomly initialised ResNet-20
and random images: the speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import cpu_name, take_turns

from adderquant import kernels
from adderquant.checkpoints import find_official_addernet
from adderquant.data import CIFAR_ADDERNET_NORM, calibration_subset, load_dataset, normalize
from adderquant.integer import IntegerEngine, NumpyRuntime, export
from adderquant.models import create
from adderquant.quant import QuantConfig, quantize

SUBSET = str(Path(os.environ.get("ADDERQUANT_DATA", "../shared/data")) / "cifar10-subset.npz")


def _model_and_images(args):
    if args.checkpoint and Path(args.checkpoint).exists():
        from adderquant.checkpoints import load

        ck = load(args.checkpoint)
        model, norm, source = ck.model, ck.normalization, args.checkpoint
    else:
        torch.manual_seed(0)
        model, norm, source = create("resnet20").eval(), CIFAR_ADDERNET_NORM, "random ResNet-20"
    n = max(args.batch)
    if args.data and Path(args.data).exists():
        ds = load_dataset(args.data)
        calib, x = calibration_subset(ds, 256, seed=0), ds.x_test[:n]
    else:
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g)
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return model.eval(), norm, source, normalize(calib, *norm), x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=find_official_addernet())
    ap.add_argument("--data", default=SUBSET)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], help="runners to leave out (e.g. int_numpy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, norm, source, calib, images = _model_and_images(args)
    q = quantize(model, calib, QuantConfig.paper(4, quantize_first_last=True)).model
    with tempfile.TemporaryDirectory() as tmp:
        path = export(q, Path(tmp) / "model.aqz", name="resnet20", normalization=norm)
        engine, runtime = IntegerEngine(path), NumpyRuntime(path)

    def floating(m):
        def run(x):
            with torch.inference_mode():
                return m(normalize(x, *norm))
        return run

    runners = {"fp": floating(model), "fake_quant": floating(q), "int_torch": engine,
               "int_numpy": lambda x: runtime.logits(x.numpy())}
    runners = {k: v for k, v in runners.items() if k not in args.skip}
    rows = []
    for bs in args.batch:
        x = images[:bs]
        times = take_turns({name: (lambda fn=fn, x=x: fn(x)) for name, fn in runners.items()}, args.repeat)
        best = {name: min(ts) for name, ts in times.items()}
        rows.append({"batch": bs, **{f"{k}_img_s": bs / t for k, t in best.items()},
                     **{f"{k}_ms": 1e3 * t for k, t in best.items()}})

    names = list(runners)
    print(f"# {source}: 4-bit paper PTQ, first/last 8-bit; {cpu_name()}, "
          f"{args.threads} threads, adder backends {kernels.available_backends()}; best of {args.repeat}")
    print("batch | " + " | ".join(f"{n} img/s" for n in names) + " | int_torch/fake_quant | int_numpy/int_torch")
    for r in rows:
        cells = [f"{r[f'{n}_img_s']:.0f}" for n in names]
        ratios = [f"{r['int_torch_img_s'] / r['fake_quant_img_s']:.2f}" if {"int_torch", "fake_quant"} <= set(names)
                  else "-", f"{r['int_numpy_img_s'] / r['int_torch_img_s']:.2f}"
                  if {"int_numpy", "int_torch"} <= set(names) else "-"]
        print(f"{r['batch']} | " + " | ".join(cells + ratios))
    if args.json:
        Path(args.json).write_text(json.dumps({"source": source, "threads": args.threads, "repeat": args.repeat,
                                               "backends": kernels.available_backends(),
                                               "numpy": np.__version__, "torch": torch.__version__, "cpu": cpu_name(),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
