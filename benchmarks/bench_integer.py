"""Images/s of the integer AdderNet against the float models and PyTorch's own int8 CNN, side by side. Not a test.

One quantized ResNet-20 (4-bit PTQ, ``--method``, first/last layers 8-bit) run every way this package can,
and the same ResNet-20 topology as a CNN, in one process and one run:

- ``int_engine``  the integer engine (``IntegerEngine``: the C network runner, ``integer.cpu_plan``)
- ``int_ops``     the same engine op by op (``IntegerEngine(fast=False)``: PyTorch integer tensors)
- ``int_numpy``   the torch-free NumPy runtime on the exported ``.aqz`` (batches ≤ ``--numpy-max-batch``)
- ``fp``          the full-precision AdderNet (float32, the C adder kernels)
- ``fake_quant``  the fake-quantized float model
- ``cnn_fp32``    the CNN twin (``models.create(..., kind="conv")``, random weights: speed does not depend on them)
- ``cnn_int8``    the CNN twin quantized by ``torch.ao`` (``prepare_fx``/``convert_fx``,
                  ``get_default_qconfig_mapping("x86")``), calibrated on the same images as the AdderNet

Each runner takes the same uint8 images at every batch size (normalisation included where the model is a
float one); the best of ``--repeat`` timings after a warm-up, the runners taking turns (so a load that comes
and goes on a shared machine hits them alike), each timing ``max(1, 64 // batch)`` calls. Then, per adder
layer of the plan, the int8 adder layer as the engine runs it (SAD kernel + fused requantisation, residual,
ReLU and the next layers' quantisation; each image's codes streamed from and to its own buffer, ``--layer-batch``
images) against ``torch.ao``'s quantized convolution of the twin on the same shape (quint8 in and out, its
ReLU fused where the model fuses it). The instruction set the C kernels used is recorded (``--isa`` lowers it;
PyTorch's own kernels follow ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA``, recorded too, so that an AVX2
run can limit both sides) and so is the load average, start and end::

    python benchmarks/bench_integer.py [--batch 1 64 256] [--repeat 5] [--threads 2] [--isa avx2] [--json out.json]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_integer.py --isa avx2 ...

Without ``--checkpoint``/``--data`` (or when they are absent) it uses a randomly initialised ResNet-20
and random images.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from common import cpu_name, take_turns

from adderquant import kernels
from adderquant.checkpoints import find_official_addernet
from adderquant.data import CIFAR_ADDERNET_NORM, calibration_subset, load_dataset, normalize
from adderquant.integer import IntegerEngine, NumpyRuntime, export
from adderquant.kernels import cpu
from adderquant.models import create
from adderquant.quant import QuantConfig, quantize

SUBSET = str(Path(os.environ.get("ADDERQUANT_DATA", "../shared/data")) / "cifar10-subset.npz")
RUNNERS = ("int_engine", "cnn_int8", "cnn_fp32", "fp", "fake_quant", "int_ops", "int_numpy")


def _model_and_images(args):
    if args.checkpoint and Path(args.checkpoint).exists():
        from adderquant.checkpoints import load

        ck = load(args.checkpoint)
        model, norm, source = ck.model, ck.normalization, args.checkpoint
    else:
        torch.manual_seed(0)
        model, norm, source = create("resnet20").eval(), CIFAR_ADDERNET_NORM, "random ResNet-20"
    n = max(args.batch + [args.layer_batch])
    if args.data and Path(args.data).exists():
        ds = load_dataset(args.data)
        calib, x = calibration_subset(ds, 256, seed=0), ds.x_test[:n]
    else:
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g)
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    if len(x) < n:
        x = x.repeat((n + len(x) - 1) // len(x), 1, 1, 1)[:n]
    return model.eval(), norm, source, normalize(calib, *norm), x.contiguous()


def _int8_twin(calib):
    """The ResNet-20 CNN twin, quantized by torch.ao's FX flow for the x86 backend, calibrated on ``calib``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    cnn = create("resnet20", kind="conv").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(cnn), get_default_qconfig_mapping("x86"), (calib[:1],))
        with torch.inference_mode():
            prepared(calib)
        return cnn, convert_fx(prepared)


def _layer_rows(engine, qcnn, x, n, repeat):
    """Per adder layer: the engine's layer on n images (buffers streamed per image) vs torch.ao's quantized
    conv of the twin on the same shape."""
    plan = engine.cpu_plan(tuple(x.shape[1:]))
    if plan is None:
        return []
    rows = []
    g = torch.Generator().manual_seed(0)
    for layer in plan.layers:
        if layer["kind"] != "adder":
            continue
        keep, ext = [], {}
        bufs = [*layer["inputs"], *layer["outputs"]] + ([layer["res_buf"]] if layer["res_buf"] >= 0 else [])
        for b in bufs:
            stride = (plan.buffer_bytes(b) + 63) // 64 * 64
            arr = torch.randint(0, 16, (n * stride + 64,), dtype=torch.uint8, generator=g)
            keep.append(arr)
            ext[b] = ((arr.data_ptr() + 63) // 64 * 64, stride)
        mod = qcnn.get_submodule(layer["name"])
        xq = torch.quantize_per_tensor(torch.rand(n, layer["C"], layer["H"], layer["W"], generator=g), 1 / 16, 0,
                                       torch.quint8)

        def ours(layer=layer, ext=ext):
            plan.run_layer(layer, n, ext)

        def theirs(mod=mod, xq=xq):
            with torch.inference_mode():
                mod(xq)

        times = take_turns({"adder": ours, "torch_ao": theirs}, repeat)
        a, t = min(times["adder"]), min(times["torch_ao"])
        k = layer["k"]
        stride = f" s{layer['stride'][0]}" if layer["stride"][0] > 1 else ""
        label = f"{layer['C']}->{layer['O']} {k[0]}x{k[1]}{stride} @{layer['H']}x{layer['W']}"
        rows.append({"layer": layer["name"], "shape": label, "batch": n, "adder_ms": 1e3 * a, "torch_ao_ms": 1e3 * t,
                     "torch_ao_module": type(mod).__name__, "residual": layer["residual"], "relu": layer["relu"],
                     "speed_ratio": t / a})
        del keep
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=find_official_addernet())
    ap.add_argument("--data", default=SUBSET)
    ap.add_argument("--method", default="ours-fast",
                    choices=["ours-fast", "ours", "paper", "authors", "paper-unsigned"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", choices=cpu.ISA_NAMES, default=None, help="use at most this instruction set")
    ap.add_argument("--skip", nargs="*", default=[], help=f"runners to leave out, of {', '.join(RUNNERS)}")
    ap.add_argument("--numpy-max-batch", type=int, default=64, help="largest batch the (slow) NumPy runtime runs")
    ap.add_argument("--layer-batch", type=int, default=64, help="images per per-layer timing (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if cpu.BACKEND is None:
        raise SystemExit("the C extension adderquant._adder_cpu is not built")
    load_start = os.getloadavg()
    with cpu.force_isa(args.isa or cpu.isa_max()) as isa:
        result = _run(args, isa)
    result["loadavg"] = {"start": list(load_start), "end": list(os.getloadavg())}
    print(f"# load average (1, 5, 15 min): start {load_start}, end {result['loadavg']['end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _run(args, isa) -> dict:
    model, norm, source, calib, images = _model_and_images(args)
    method = args.method.replace("-", "_")
    config = getattr(QuantConfig, method)(4, quantize_first_last=True)
    q = quantize(model, calib, config).model
    with tempfile.TemporaryDirectory() as tmp:
        path = export(q, Path(tmp) / "model.aqz", name="resnet20", normalization=norm)
        engine, ops, runtime = IntegerEngine(path), IntegerEngine(path, fast=False), NumpyRuntime(path)
    if engine.cpu_plan(tuple(images.shape[1:])) is None:
        print("# warning: the C network runner does not take this graph; int_engine runs op by op")
    cnn, qcnn = _int8_twin(calib)

    def floating(m, norm=norm):
        def run(x):
            with torch.inference_mode():
                return m(normalize(x, *norm))
        return run

    runners = {"int_engine": engine, "cnn_int8": floating(qcnn), "cnn_fp32": floating(cnn), "fp": floating(model),
               "fake_quant": floating(q), "int_ops": ops, "int_numpy": lambda x: runtime.logits(x.numpy())}
    runners = {k: v for k, v in runners.items() if k not in args.skip}
    rows = []
    for bs in args.batch:
        x = images[:bs]
        inner = max(1, 64 // bs)
        here = {k: v for k, v in runners.items() if k != "int_numpy" or bs <= args.numpy_max_batch}

        def timed(fn, x=x, inner=inner):
            def go():
                for _ in range(inner):
                    fn(x)
            return go

        times = take_turns({name: timed(fn) for name, fn in here.items()}, args.repeat)
        best = {name: min(ts) / inner for name, ts in times.items()}
        row = {"batch": bs, **{f"{k}_img_s": bs / t for k, t in best.items()},
               **{f"{k}_ms": 1e3 * t for k, t in best.items()}}
        if {"int_engine", "cnn_int8"} <= set(best):
            row["engine_over_cnn_int8"] = row["int_engine_img_s"] / row["cnn_int8_img_s"]
        rows.append(row)
    layers = _layer_rows(engine, qcnn, images, args.layer_batch, args.repeat) if args.layer_batch else []

    info = (f"{source}: 4-bit {args.method} PTQ, first/last 8-bit; {cpu_name()}, isa {isa}, {args.threads} threads, "
            f"best of {args.repeat}")
    print(f"# {info}")
    names = [n for n in RUNNERS if n in runners]
    print("batch | " + " | ".join(f"{n} img/s" for n in names) + " | int_engine / cnn_int8")
    for r in rows:
        cells = [f"{r[f'{n}_img_s']:.0f}" if f"{n}_img_s" in r else "-" for n in names]
        print(f"{r['batch']} | " + " | ".join(cells) + f" | {r.get('engine_over_cnn_int8', float('nan')):.2f}")
    if layers:
        print(f"layer (batch {args.layer_batch}) | adder ms | torch.ao ms | torch.ao / adder")
        for r in layers:
            print(f"{r['layer']} {r['shape']} | {r['adder_ms']:.3f} | {r['torch_ao_ms']:.3f} | {r['speed_ratio']:.2f}")
    return {"source": source, "method": args.method, "learned_rounding": config.learned_rounding, "bits": 4,
            "threads": args.threads, "repeat": args.repeat,
            "isa": isa, "isa_max": cpu.isa_max(), "backends": kernels.available_backends(),
            "torch_isa_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                              if k in os.environ},
            "runner_network": engine.cpu_plan(tuple(images.shape[1:])) is not None,
            "arena_bytes": getattr(engine.cpu_plan(tuple(images.shape[1:])), "arena_bytes", None),
            "numpy": np.__version__, "torch": torch.__version__, "cpu": cpu_name(), "info": info,
            "rows": rows, "layers": layers}


if __name__ == "__main__":
    raise SystemExit(main())
