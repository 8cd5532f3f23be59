"""Adder layers on a CUDA GPU: the Triton backend against the reference, torch.cdist and cuDNN, side by side.

One command, made to finish inside a 10-minute limit (``--budget-s``, default 540 s: sections that would
start past it are skipped and said so; the JSON is rewritten after every section)::

    python benchmarks/bench_gpu.py --json $OUT/gpu.json

1. ResNet-20 (CIFAR) layer shapes at batch 256 — forward ms, forward+backward ms, dX and dW ms, peak
   memory — for the reference backend (cdist forward, AdderNet backward), torch.cdist with autograd
   (true |·| gradient), cuDNN conv2d (TF32, torch's default) and the Triton backend; adder-MAC/s of the
   forward; int8 byte-ops/s of each int8 mode (fp32-exact, int32, vabsdiff4). Every variant is first
   checked against the float64 reference on a sub-batch (fp32 relative error, int8 exact) and the
   check is printed next to its times. Times: ``triton.testing.do_bench``, median, in ms.
2. One epoch of adder ResNet-20 on CIFAR-10-sized random data (50,000 images, batch 256, SGD with
   momentum): Triton backend vs reference backend vs the conv twin. A variant that would pass
   ``--epoch-budget-s`` is timed on fewer steps and extrapolated (marked so).

``--sass`` needs no GPU: it compiles every Triton kernel and config for sm_90 with the ptxas that
ships in the triton wheel and prints registers, spills and the instruction mix of the innermost
loop (the static evidence behind docs/gpu.md; no timing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

INT8_MODES = ("fp32", "int32", "vabsdiff4")
DEVICE = "cuda"  # a dry run of this script's logic on CPU (interpreter) sets this to "cpu"


# --------------------------------------------------------------------------------------------------
# offline SASS report (no GPU)
# --------------------------------------------------------------------------------------------------

def sass_report() -> list[dict]:
    from adderquant.kernels import triton_adder as ta
    from adderquant.kernels import triton_sass

    if ta.INTERPRET or ta.BACKEND is None:
        raise SystemExit("--sass needs triton and must run without TRITON_INTERPRET")
    return triton_sass.sass_report(log=lambda line: print(line, flush=True))


# --------------------------------------------------------------------------------------------------
# GPU timing
# --------------------------------------------------------------------------------------------------


def _rel_err(got, want) -> float:
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _bench_layer(layer, args, torch, F, kernels, ta) -> dict:
    from triton.testing import do_bench

    from adderquant.kernels import reference
    from adderquant.nn.functional import adder_conv2d

    name, c, h, o, k, s, p = layer
    dev = torch.device(DEVICE)
    b = args.batch
    geom = ((s, s), (p, p), (1, 1))
    x = torch.randn(b, c, h, h, device=dev)
    w = torch.randn(o, c, k, k, device=dev)
    y = F.conv2d(x, w, stride=s, padding=p)
    gy = torch.randn_like(y)
    ho, wo = y.shape[2:]
    macs = b * o * ho * wo * c * k * k
    r = {"layer": name, "C": c, "H": h, "O": o, "k": k, "stride": s, "padding": p, "batch": b, "macs": macs}

    def bench(fn) -> float:
        return do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

    def peak_mb(fn) -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    # ---- correctness on a sub-batch, against float64 reference ----
    sub = slice(0, min(8, b))
    xs, gs = x[sub], gy[sub]
    ref_y = reference.BACKEND.forward(xs.double(), w.double(), *geom)
    ref_dx = reference.BACKEND.grad_input(gs.double(), xs.double(), w.double(), *geom)
    ref_dw = reference.BACKEND.grad_weight(gs.double(), xs.double(), w.double(), *geom)
    check = {
        "triton_forward": _rel_err(ta.BACKEND.forward(xs, w, *geom), ref_y),
        "triton_grad_weight": _rel_err(ta.BACKEND.grad_weight(gs, xs, w, *geom), ref_dw),
        "reference_fp32_forward": _rel_err(reference.BACKEND.forward(xs, w, *geom), ref_y),
        "cdist_forward": _rel_err(-torch.cdist(*_cdist_operands(F, xs, w, s, p), p=1).transpose(1, 2).reshape(
            ref_y.shape), ref_y),
    }  # fmt: skip
    for mode in ("sat", "exact"):
        ta.GRAD_INPUT_CLAMP = mode
        check[f"triton_grad_input_{mode}"] = _rel_err(ta.BACKEND.grad_input(gs, xs, w, *geom), ref_dx)
    ta.GRAD_INPUT_CLAMP = "sat"
    xq = torch.randint(-128, 128, x.shape, dtype=torch.int8, device=dev)
    xu = torch.randint(0, 256, x.shape, dtype=torch.uint8, device=dev)
    wq = torch.randint(-128, 128, w.shape, dtype=torch.int8, device=dev)
    for mode in INT8_MODES:
        ta.INT8_MODE = mode
        ok = True
        for xi in (xq[sub], xu[sub]):
            ok &= torch.equal(ta.BACKEND.int_forward(xi, wq, *geom), reference.BACKEND.int_forward(xi, wq, *geom))
        check[f"int8_{mode}_exact"] = bool(ok)
    r["check"] = check
    r["check_ok"] = all(
        (v is True) or (not isinstance(v, bool) and v < 1e-4) for v in check.values()
    )

    # ---- forward ----
    cols_w = _cdist_operands(F, x, w, s, p)
    r["fwd_ms"] = {
        "reference": bench(lambda: reference.BACKEND.forward(x, w, *geom)),
        "cdist": bench(lambda: torch.cdist(*_cdist_operands(F, x, w, s, p), p=1)),
        "cdist_no_unfold": bench(lambda: torch.cdist(cols_w[0], cols_w[1], p=1)),
        "conv_tf32": bench(lambda: F.conv2d(x, w, stride=s, padding=p)),
        "triton": bench(lambda: ta.BACKEND.forward(x, w, *geom)),
    }
    r["fwd_T_mac_per_s"] = {kk: macs / (v * 1e-3) / 1e12 for kk, v in r["fwd_ms"].items()}

    # ---- the two gradients alone ----
    r["grad_input_ms"] = {
        "reference": bench(lambda: reference.BACKEND.grad_input(gy, x, w, *geom)),
        "conv_tf32": bench(lambda: torch.nn.grad.conv2d_input(x.shape, w, gy, stride=s, padding=p)),
    }
    for mode in ("sat", "exact"):
        ta.GRAD_INPUT_CLAMP = mode
        r["grad_input_ms"][f"triton_{mode}"] = bench(lambda: ta.BACKEND.grad_input(gy, x, w, *geom))
    ta.GRAD_INPUT_CLAMP = "sat"
    r["grad_weight_ms"] = {
        "reference": bench(lambda: reference.BACKEND.grad_weight(gy, x, w, *geom)),
        "conv_tf32": bench(lambda: torch.nn.grad.conv2d_weight(x, w.shape, gy, stride=s, padding=p)),
        "triton": bench(lambda: ta.BACKEND.grad_weight(gy, x, w, *geom)),
    }

    # ---- forward + backward through autograd ----
    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)

    def adder_step(backend):
        def fn():
            with kernels.use_backend(backend):
                out = adder_conv2d(xr, wr, stride=s, padding=p)
                torch.autograd.grad(out, (xr, wr), gy)

        return fn

    def cdist_step():
        cols, wexp = _cdist_operands(F, xr, wr, s, p)
        out = -torch.cdist(cols, wexp, p=1)
        torch.autograd.grad(out, (xr, wr), gy.reshape(b, o, -1).transpose(1, 2))

    def conv_step():
        torch.autograd.grad(F.conv2d(xr, wr, stride=s, padding=p), (xr, wr), gy)

    steps = {"reference": adder_step("reference"), "cdist": cdist_step, "conv_tf32": conv_step,
             "triton": adder_step("triton")}  # fmt: skip
    r["fwd_bwd_ms"] = {kk: bench(fn) for kk, fn in steps.items()}
    r["fwd_bwd_peak_mb"] = {kk: peak_mb(fn) for kk, fn in steps.items()}
    r["fwd_peak_mb"] = {
        "reference": peak_mb(lambda: reference.BACKEND.forward(x, w, *geom)),
        "conv_tf32": peak_mb(lambda: F.conv2d(x, w, stride=s, padding=p)),
        "triton": peak_mb(lambda: ta.BACKEND.forward(x, w, *geom)),
    }

    # ---- int8 ----
    r["int8_ms"] = {}
    for mode in INT8_MODES:
        ta.INT8_MODE = mode
        r["int8_ms"][mode] = bench(lambda: ta.BACKEND.int_forward(xq, wq, *geom))
    ta.INT8_MODE = "auto"
    r["int8_T_byteops_per_s"] = {kk: macs / (v * 1e-3) / 1e12 for kk, v in r["int8_ms"].items()}
    return r


def _cdist_operands(F, x, w, s, p):
    cols = F.unfold(x, w.shape[2:], padding=p, stride=s).transpose(1, 2)  # (N, P, K)
    return cols, w.reshape(w.shape[0], -1).unsqueeze(0).expand(x.shape[0], -1, -1)


def _epoch(kind: str, backend: str | None, args, torch, kernels) -> dict:
    from adderquant import models

    dev = torch.device(DEVICE)
    torch.manual_seed(0)
    model = models.create("resnet20", kind=kind).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.epoch_images, 3, 32, 32, device=dev)
    labels = torch.randint(0, 10, (args.epoch_images,), device=dev)
    steps = math.ceil(args.epoch_images / args.batch)

    def step(i):
        xb = images[i * args.batch : (i + 1) * args.batch]
        yb = labels[i * args.batch : (i + 1) * args.batch]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    with kernels.use_backend(backend):
        for i in range(min(3, steps)):  # warm-up: compilation and autotuning happen here
            step(i)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        done = 0
        for i in range(steps):
            loss = step(i)
            done += 1
            if done % 10 == 0:
                torch.cuda.synchronize()
                if time.perf_counter() - t0 > args.epoch_budget_s:
                    break
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {
        "kind": kind,
        "backend": backend or "auto",
        "steps_timed": done,
        "steps_per_epoch": steps,
        "epoch_s": seconds * steps / done,
        "extrapolated": done < steps,
        "ms_per_step": seconds / done * 1e3,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        "final_loss": float(loss.detach()),
    }


def _fmt(v, ratio=False) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if ratio else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = zip(r, widths, strict=True)
        lines.append("  ".join(c.rjust(wd) if j else c.ljust(wd) for j, (c, wd) in enumerate(cells)))
    return "\n".join(lines)


def _print_layers(results: list[dict]) -> None:
    head = ["layer", "check", "ref", "cdist", "conv", "triton", "tri/conv", "ref/tri", "T MAC/s tri"]
    for key, title in (("fwd_ms", "forward ms"), ("fwd_bwd_ms", "forward+backward ms")):
        rows = [head[:-1] + (["T MAC/s tri"] if key == "fwd_ms" else [])]
        for r in results:
            t = r[key]
            line = [r["layer"], "ok" if r["check_ok"] else "FAIL", _fmt(t["reference"]), _fmt(t["cdist"]),
                    _fmt(t["conv_tf32"]), _fmt(t["triton"]), _fmt(t["triton"] / t["conv_tf32"], True),
                    _fmt(t["reference"] / t["triton"], True)]  # fmt: skip
            if key == "fwd_ms":
                line.append(_fmt(r["fwd_T_mac_per_s"]["triton"]))
            rows.append(line)
        print(f"\n{title} (batch {results[0]['batch']}, median)\n" + _table(rows))
    rows = [["layer", "dX ref", "dX conv", "dX tri sat", "dX tri exact", "dW ref", "dW conv", "dW tri"]]
    for r in results:
        gi, gw = r["grad_input_ms"], r["grad_weight_ms"]
        rows.append([r["layer"], *(_fmt(gi[k]) for k in ("reference", "conv_tf32", "triton_sat", "triton_exact")),
                     *(_fmt(gw[k]) for k in ("reference", "conv_tf32", "triton"))])  # fmt: skip
    print("\ngradients alone, ms\n" + _table(rows))
    rows = [["layer", "ref", "cdist", "conv", "triton", "tri fwd", "ref fwd"]]
    for r in results:
        m = r["fwd_bwd_peak_mb"]
        rows.append([r["layer"], *(_fmt(m[k]) for k in ("reference", "cdist", "conv_tf32", "triton")),
                     _fmt(r["fwd_peak_mb"]["triton"]), _fmt(r["fwd_peak_mb"]["reference"])])  # fmt: skip
    print("\npeak memory above inputs, MiB (forward+backward; forward alone)\n" + _table(rows))
    rows = [["layer", *(f"{m} ms" for m in INT8_MODES), *(f"{m} T/s" for m in INT8_MODES), "exact"]]
    for r in results:
        exact = all(r["check"][f"int8_{m}_exact"] for m in INT8_MODES)
        rows.append([r["layer"], *(_fmt(r["int8_ms"][m]) for m in INT8_MODES),
                     *(_fmt(r["int8_T_byteops_per_s"][m]) for m in INT8_MODES), "yes" if exact else "NO"])  # fmt: skip
    print("\nint8 forward (byte-ops = |x − w| accumulations)\n" + _table(rows))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the results here (rewritten after every section)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epoch-images", type=int, default=50_000)
    ap.add_argument("--epoch-budget-s", type=float, default=60.0, help="per variant; past it: extrapolate")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip sections that would start past this")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--no-autotune", action="store_true", help="first config of each kernel only")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-epoch", action="store_true")
    ap.add_argument("--sass", action="store_true", help="offline sm_90 compile report only (no GPU needed)")
    args = ap.parse_args(argv)
    if args.no_autotune:
        os.environ["ADDERQUANT_TRITON_AUTOTUNE"] = "0"
    start = time.monotonic()

    import torch
    import torch.nn.functional as F

    from adderquant import kernels
    from adderquant.kernels import triton_adder as ta

    out: dict = {"argv": sys.argv[1:], "python": platform.python_version(), "torch": torch.__version__}

    def save():
        out["elapsed_s"] = round(time.monotonic() - start, 1)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))

    if args.sass:
        out["sass"] = sass_report()
        save()
        return out
    if ta.BACKEND is None:
        raise SystemExit("triton is not importable: pip install triton")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to time (--sass gives the offline compile report)")
    import triton

    props = torch.cuda.get_device_properties(0)
    out.update(
        triton=triton.__version__,
        device=props.name,
        sms=props.multi_processor_count,
        cuda=torch.version.cuda,
        autotune=ta.AUTOTUNE,
        cudnn_allow_tf32=_safe(lambda: torch.backends.cudnn.allow_tf32),
        backends=kernels.available_backends(),
    )
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"CUDA {torch.version.cuda}, autotune {ta.AUTOTUNE}", flush=True)  # fmt: skip
    torch.manual_seed(0)

    out["layers"] = []
    out["skipped"] = []
    if not args.skip_layers:
        from adderquant.models import adder_shapes

        for layer in adder_shapes("resnet20"):
            if time.monotonic() - start > args.budget_s * 0.6:
                out["skipped"].append(f"layer {layer[0]}: time budget")
                continue
            t0 = time.monotonic()
            r = _bench_layer(layer, args, torch, F, kernels, ta)
            r["section_s"] = round(time.monotonic() - t0, 1)
            out["layers"].append(r)
            print(f"  {layer[0]}: check {'ok' if r['check_ok'] else 'FAIL'} {r['check']} ({r['section_s']} s)",
                  flush=True)  # fmt: skip
            save()
        if out["layers"]:
            _print_layers(out["layers"])

    out["epoch"] = []
    if not args.skip_epoch:
        for kind, backend in (("adder", "triton"), ("conv", None), ("adder", "reference")):
            label = f"{kind}/{backend or 'auto'}"
            if time.monotonic() - start > args.budget_s - args.epoch_budget_s - 30:
                out["skipped"].append(f"epoch {label}: time budget")
                continue
            e = _epoch(kind, backend, args, torch, kernels)
            out["epoch"].append(e)
            print(f"  epoch {label}: {e['epoch_s']:.1f} s{' (extrapolated)' if e['extrapolated'] else ''}, "
                  f"{e['ms_per_step']:.1f} ms/step, peak {e['peak_mb']:.0f} MiB", flush=True)  # fmt: skip
            save()
        by = {f"{e['kind']}/{e['backend']}": e["epoch_s"] for e in out["epoch"]}
        tri = by.get("adder/triton")
        if tri:
            rows = [[f"epoch (ResNet-20, {args.epoch_images} images, batch {args.batch})", "s", "vs triton"]]
            rows += [[k, _fmt(v), _fmt(v / tri, True)] for k, v in by.items()]
            print("\n" + _table(rows))
    if out["skipped"]:
        print("skipped:", "; ".join(out["skipped"]))
    save()
    return out


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (mixed legacy/new TF32 API raises on read)
        return repr(e)


if __name__ == "__main__":
    main()
