#!/usr/bin/env python
"""Which beyond-paper switches `ours` turns on, chosen on held-out TRAINING images — never the test set.

For each calibration seed (1024 training images, ``calibration_indices(ds, 1024, seed)``) and bit
width, every candidate switch set is quantized from one calibration pass and scored on 2000 training
images that are in none of the calibration subsets (a fixed seeded draw). The score is top-1 on those
images and, as a finer tie-breaker, their mean cross-entropy (the full-precision model is ~99.5 %
right on training images, so top-1 alone moves in steps of a few images). The JSON records every
score; the markdown names, per bit width, the candidate with the best mean top-1 over the seeds
(ties: lower mean loss) — what ``QuantConfig.ours_fast`` encodes (``OURS_SWITCHES``).

    python scripts/ptq_select.py --data ../shared/data/cifar10     # docs/results/ptq_select.{json,md}

Learned rounding was built after that choice; ``--rounding`` adds ``ours-fast`` with it (200
iterations per block, the preset's switches kept) as one more candidate, so the same rule says at which
widths ``QuantConfig.ours`` adds it (``OURS_ROUNDING``)::

    python scripts/ptq_select.py --data ../shared/data/cifar10 --rounding \
        --out docs/results/ptq_select_rounding
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BITS = (8, 6, 5, 4, 3, 2)
SEEDS = (0, 1, 2)
HELD_OUT = 2000


def candidates(bits: int, rounding: bool = False) -> dict:
    from adderquant.quant import QuantConfig

    unsigned = {"unsigned_activations": True}
    extra = {"ours-fast+rounding": QuantConfig.ours_fast(bits, learned_rounding=200)} if rounding else {}
    return {
        "paper-unsigned": QuantConfig.paper(bits, **unsigned),
        "+bn-mean": QuantConfig.paper(bits, **unsigned, bn_correction="mean"),
        "+bn-mean-var": QuantConfig.paper(bits, **unsigned, bn_correction="mean_var"),
        "+search": QuantConfig.paper(bits, **unsigned, range_search=True),
        "+search+bn-mean": QuantConfig.paper(bits, **unsigned, range_search=True, bn_correction="mean"),
        "+search+bn-mean-var": QuantConfig.paper(bits, **unsigned, range_search=True, bn_correction="mean_var"),
    } | extra


@torch.no_grad()
def score(model, x, y, norm) -> tuple[float, float]:
    from adderquant.data import normalize

    model.eval()
    logits = torch.cat([model(normalize(x[i:i + 500], *norm)) for i in range(0, len(x), 500)])
    return 100.0 * float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def held_out_indices(n_train: int, calib_sets: list[torch.Tensor], n: int) -> torch.Tensor:
    taken = torch.cat(calib_sets)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(2022))
    return order[~torch.isin(order, taken)][:n]


def main(argv=None) -> int:
    from adderquant.checkpoints import find_official_addernet, load
    from adderquant.data import calibration_indices, load_dataset, normalize
    from adderquant.quant import QuantConfig, calibrate, quantize_adder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 directory (its training split is used, not its test split)")
    ap.add_argument("--checkpoint", default=find_official_addernet())
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "ptq_select"))
    ap.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    ap.add_argument("--rounding", action="store_true", help="add ours-fast + learned rounding as a candidate")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.checkpoint is None:
        ap.error("the official AdderNet ResNet-20 was not found: pass --checkpoint")
    torch.set_num_threads(args.threads)
    ck = load(args.checkpoint)
    ds = load_dataset(args.data)
    calib_idx = {s: calibration_indices(ds, 1024, s) for s in SEEDS}
    held = held_out_indices(len(ds.x_train), list(calib_idx.values()), HELD_OUT)
    xh, yh = ds.x_train[held], ds.y_train[held]
    fp = score(ck.model, xh, yh, ck.normalization)
    rows = []
    for seed in SEEDS:
        calib = normalize(ds.x_train[calib_idx[seed]], *ck.normalization)
        obs = calibrate(ck.model, calib, QuantConfig.paper(4), min_alpha=0.99)
        for bits in args.bits:
            for name, config in candidates(bits, args.rounding).items():
                t0 = time.perf_counter()
                q = quantize_adder(ck.model, calib, config, observers=obs).model
                top1, loss = score(q, xh, yh, ck.normalization)
                rows.append({"seed": seed, "bits": bits, "candidate": name, "held_out_top1": top1,
                             "held_out_loss": loss, "seconds": time.perf_counter() - t0})
                print(json.dumps(rows[-1]), flush=True)
    chosen = {}
    for bits in args.bits:
        agg = {}
        for name in candidates(bits, args.rounding):
            mine = [r for r in rows if r["bits"] == bits and r["candidate"] == name]
            agg[name] = (statistics.mean(r["held_out_top1"] for r in mine), -statistics.mean(r["held_out_loss"]
                                                                                            for r in mine))
        chosen[bits] = max(agg, key=agg.get)
    command = "python scripts/ptq_select.py --data " + args.data
    if list(args.bits) != list(BITS):
        command += " --bits " + " ".join(map(str, args.bits))
    if args.rounding:
        command += " --rounding --out " + args.out
    out = {"command": command, "checkpoint": str(args.checkpoint),
           "held_out": f"{HELD_OUT} training images outside every calibration subset (seeds {list(SEEDS)})",
           "fp_held_out_top1": fp[0], "fp_held_out_loss": fp[1], "rows": rows, "chosen": chosen,
           "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0]}
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(markdown(out))
    print(f"wrote {args.out}.json and .md; chosen: {chosen}")
    return 0


def markdown(out: dict) -> str:
    rows = out["rows"]
    bits_list = sorted({r["bits"] for r in rows}, reverse=True)
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    lines = ["# Choosing `ours`: switch sets scored on held-out training images", "",
             f"`{out['command']}` — official AdderNet ResNet-20, 1024 calibration images per seed, scored on "
             f"{out['held_out']}; full precision there: top-1 {out['fp_held_out_top1']:.2f} %, loss "
             f"{out['fp_held_out_loss']:.4f}. The test set plays no part. Mean ± std over the seeds; "
             "**bold** = chosen (best mean top-1, ties broken by lower mean loss).", "",
             "| candidate | " + " | ".join(f"{b}-bit top-1 (loss)" for b in bits_list) + " |",
             "|---|" + "---|" * len(bits_list)]
    for name in names:
        cells = []
        for b in bits_list:
            mine = [r for r in rows if r["bits"] == b and r["candidate"] == name]
            t = [r["held_out_top1"] for r in mine]
            loss = statistics.mean(r["held_out_loss"] for r in mine)
            cell = f"{statistics.mean(t):.2f} ± {statistics.pstdev(t):.2f} ({loss:.4f})"
            cells.append(f"**{cell}**" if out["chosen"][str(b) if isinstance(next(iter(out["chosen"])), str)
                                                          else b] == name else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
