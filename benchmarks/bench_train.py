"""Training speed and memory of an adder ResNet on the CPU: fast backend vs. reference vs. the conv twin.

One run, side by side: full training steps (forward, AdderNet backward, SGD with momentum) of the
adder model with the automatic backend choice (the C kernels for the forward and input gradient),
the same model forced onto the pure-PyTorch reference backend, and the CNN twin of identical shape.
The variants take turns step by step, so that load from other processes hits them alike; the
median step time is reported (after a warm-up step), and the epoch time is that median times the steps of one CIFAR-10
epoch (50,000 images) — an extrapolation, said so in the output. Peak memory is the rise of the
process's resident set over its level before the step (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``). Random data: the speed does not depend on the images. Not a test::

    python benchmarks/bench_train.py [--model resnet20] [--batch 64] [--steps 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_name, take_turns

from adderquant import kernels
from adderquant.models import create, input_size

EPOCH_IMAGES = 50_000


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Hand freed heap memory back to the OS (else a step reuses what an earlier variant left resident
    and shows no rise), then reset the high-water mark to the current resident set."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except (OSError, AttributeError):
        return False


def _variant(model_name: str, kind: str, backend: str | None, batch: int, seed: int):
    torch.manual_seed(seed)
    model = create(model_name, kind=kind).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    s = input_size(model_name)
    x = torch.randn(batch, 3, s, s)
    y = torch.randint(0, 10, (batch,))

    def step():
        with kernels.use_backend(backend):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return float(loss.detach())

    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], help="variants to leave out (e.g. adder_reference)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    variants = {
        "adder_fast": ("adder", None),
        "adder_reference": ("adder", "reference"),
        "conv": ("conv", None),
    }
    steps = {name: _variant(args.model, kind, backend, args.batch, seed=0)
             for name, (kind, backend) in variants.items() if name not in args.skip}
    peak = dict.fromkeys(steps)
    for name, step in steps.items():  # a first step each (allocates momentum buffers), then one measured
        step()
        if _reset_peak() and (base := _rss_kib("VmRSS")) is not None:
            step()
            peak[name] = (_rss_kib("VmHWM") - base) / 1024
    times = take_turns(steps, args.steps, warmup=False)  # the loop above warmed every variant up

    per_epoch = -(-EPOCH_IMAGES // args.batch)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "step_ms": 1e3 * med, "img_s": args.batch / med,
                     "epoch_s_extrapolated": med * per_epoch, "peak_rss_mib": peak[name]})
    by = {r["variant"]: r for r in rows}
    for r in rows:
        if "adder_fast" in by:
            r["over_adder_fast"] = r["step_ms"] / by["adder_fast"]["step_ms"]
        if "conv" in by:
            r["over_conv"] = r["step_ms"] / by["conv"]["step_ms"]

    info = (f"{args.model} training steps, batch {args.batch}, torch {torch.__version__}, {args.threads} threads, "
            f"{cpu_name()}, adder backends {kernels.available_backends()}, "
            f"median of {args.steps}")
    print(info)
    print("variant | ms/step | img/s | epoch s (extrapolated, 50,000 images) | peak MiB | vs adder_fast | vs conv")
    for r in rows:
        mib = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        print(f"{r['variant']} | {r['step_ms']:.0f} | {r['img_s']:.0f} | {r['epoch_s_extrapolated']:.0f} | {mib} | "
              f"{r.get('over_adder_fast', float('nan')):.2f}x | {r.get('over_conv', float('nan')):.2f}x")
    result = {"info": info, "model": args.model, "batch": args.batch, "threads": args.threads, "steps": args.steps,
              "epoch_images": EPOCH_IMAGES, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
