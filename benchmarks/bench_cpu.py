"""Adder-layer CPU kernels against torch's conv2d on a model's adder-layer shapes (ResNet-20 by default).

One run, side by side, batch 64 by default and 2 threads: torch.nn.functional.conv2d (fp32), the
reference adder forward (torch.cdist), the ``cpu`` backend's fp32 and int8 forward, and with
``--grad`` the input gradient (cpu backend vs. torch's conv2d input gradient) and the weight gradient
(cpu backend, i.e. conv2d's weight gradient − W·ΣG, vs. the reference's unfold + einsum). Times are the best
of ``--repeat`` runs after one warm-up, in milliseconds, the timed functions taking turns (on a
shared machine, compare runs taken while it is quiet: with the cores busy elsewhere, every OpenMP
join waits out a time slice and all columns degrade). Not a test::

    python benchmarks/bench_cpu.py [--model resnet20] [--batch 64] [--threads 2] [--repeat 5] [--grad] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from common import cpu_name, take_turns

from adderquant import kernels
from adderquant.models import adder_shapes

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def best_ms(fns: dict, repeat: int) -> dict:
    """Best time of each function in ms, the functions taking turns."""
    return {name: 1e3 * min(ts) for name, ts in take_turns(fns, repeat, _clock).items()}


def _bench_layer(layer, args) -> dict:
    name, c, h, o, k, s, p = layer
    x = torch.randn(args.batch, c, h, h)
    w = torch.randn(o, c, k, k)
    xq = torch.randint(-128, 128, x.shape, dtype=torch.int8)
    wq = torch.randint(-128, 128, w.shape, dtype=torch.int8)
    r = {"layer": name, "C": c, "H": h, "O": o, "k": k, "stride": s, "padding": p}
    from adderquant.kernels import cpu, reference

    cpu_b, ref_b = cpu.BACKEND, reference.BACKEND
    geom = ((s, s), (p, p), (1, 1))
    fns = {
        "conv_ms": lambda: F.conv2d(x, w, stride=s, padding=p),
        "cpu_ms": lambda: cpu_b.forward(x, w, *geom),
        "int8_ms": lambda: cpu_b.int_forward(xq, wq, *geom),
    }
    if args.grad:
        g = torch.randn_like(F.conv2d(x, w, stride=s, padding=p))
        fns["conv_gin_ms"] = lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=s, padding=p)
        fns["cpu_gin_ms"] = lambda: cpu_b.grad_input(g, x, w, *geom)
        fns["cpu_gw_ms"] = lambda: cpu_b.grad_weight(g, x, w, *geom)
        fns["ref_gw_ms"] = lambda: ref_b.grad_weight(g, x, w, *geom)
    r.update(best_ms(fns, args.repeat))
    if not args.no_reference:  # slow: timed apart, fewer times
        r.update(best_ms({"ref_ms": lambda: ref_b.forward(x, w, *geom)}, max(1, args.repeat // 2)))
        r["ref_over_cpu"] = r["ref_ms"] / r["cpu_ms"]
    r["cpu_over_conv"] = r["cpu_ms"] / r["conv_ms"]
    r["int8_over_conv"] = r["int8_ms"] / r["conv_ms"]
    if args.grad:
        r["cpu_gin_over_conv"] = r["cpu_gin_ms"] / r["conv_gin_ms"]
        r["ref_gw_over_cpu"] = r["ref_gw_ms"] / r["cpu_gw_ms"]
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20", help="registry model whose adder-layer shapes are timed")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--grad", action="store_true", help="also time the input gradient")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference adder")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (meaningful with --threads 1 on a busy machine)",
    )
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    args = ap.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]

    torch.set_num_threads(args.threads)
    if "cpu" not in kernels.available_backends():
        raise SystemExit("the cpu backend is not available (adderquant._adder_cpu was not built)")
    from adderquant.kernels import cpu

    torch.manual_seed(0)
    rows = [_bench_layer(layer, args) for layer in adder_shapes(args.model)]

    def fmt(v, ratio=False):
        return "-" if v is None else (f"{v:.2f}x" if ratio else f"{v:.2f}")

    head = [f"layer (N={args.batch})", "conv ms", "ref ms", "cpu ms", "int8 ms", "cpu/conv", "int8/conv", "ref/cpu"]
    if args.grad:
        head += ["conv dX ms", "cpu dX ms", "dX cpu/conv", "ref dW ms", "cpu dW ms", "dW ref/cpu"]
    table = [head]
    for r in rows:
        line = [
            r["layer"],
            fmt(r["conv_ms"]),
            fmt(r.get("ref_ms")),
            fmt(r["cpu_ms"]),
            fmt(r["int8_ms"]),
            fmt(r["cpu_over_conv"], True),
            fmt(r["int8_over_conv"], True),
            fmt(r.get("ref_over_cpu"), True),
        ]
        if args.grad:
            line += [fmt(r["conv_gin_ms"]), fmt(r["cpu_gin_ms"]), fmt(r["cpu_gin_over_conv"], True),
                     fmt(r["ref_gw_ms"]), fmt(r["cpu_gw_ms"]), fmt(r["ref_gw_over_cpu"], True)]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    info = (
        f"torch {torch.__version__}, {args.threads} threads, isa {cpu.isa()}, "
        f"{cpu_name()}, best of {args.repeat}, {args.clock} clock"
    )
    print(info)
    for i, row in enumerate(table):
        cells = (
            cell.ljust(wd) if j == 0 else cell.rjust(wd) for j, (cell, wd) in enumerate(zip(row, widths, strict=True))
        )
        print("  ".join(cells))
        if i == 0:
            print("  ".join("-" * wd for wd in widths))
    result = {
        "info": info,
        "threads": args.threads,
        "batch": args.batch,
        "model": args.model,
        "clock": args.clock,
        "isa": cpu.isa(),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
