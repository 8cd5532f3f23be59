#!/usr/bin/env python
"""Which beyond-paper switches `ours` turns on, chosen on held-out TRAINING images — never the test set.

For each bit width, calibration seed (1024 training images, ``calibration_indices(ds, 1024, seed)``)
and candidate switch set, the official ResNet-20 is quantized (one calibration pass per seed) and
scored on 2000 training images that are in none of the calibration subsets (a fixed seeded draw).

The rule: **the lowest mean KL divergence from the full-precision model's predictions** over the seeds,
KL(p_fp ‖ p_q) averaged over the held-out images. Why not top-1: the float model was trained on these
images and gets 99.3 % of them right, so top-1 moves in steps of a few images near a decision
boundary, while PTQ's job is to keep the float model's function, which the KL measures on every
image. Top-1, cross-entropy and the number of changed predictions are recorded too.

Three stages per width: the fast candidates (`ours-fast` is the winner), then that winner plus learned
rounding (200 iterations per block), then at 4 and 3 bits the slow candidates (the KL range search);
`ours` is the lowest mean KL among every set measured at the width — the fast and slow candidates and
each with learned rounding that a run (this one or an earlier one whose rows the JSON keeps) measured.
The JSON is rewritten after every row and read back on start, so an interrupted run continues and new
candidates add to the old.

    python scripts/ptq_select.py --data ../shared/data/cifar10     # docs/results/ptq_select.{json,md}
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

from adderquant.quant.config import FINE_RANGE_ALPHAS

ROOT = Path(__file__).resolve().parents[1]
BITS = (8, 6, 5, 4, 3, 2)
SEEDS = (0, 1, 2)
HELD_OUT = 2000
ROUNDING = 200  # learned-rounding iterations per block of the second stage
RULE = "lowest mean KL(fp || quantized) on the held-out images over the seeds"

# the switch sets on top of the unsigned grid (the paper's method otherwise); BN re-estimation takes 50
# batches of 128 crops of the calibration images (padded with black, as the training pipeline's)
FAST = {
    "paper-unsigned": {},
    "+bn-mean": {"bn_correction": "mean"},
    "+bn-mean-var": {"bn_correction": "mean_var"},
    "+bn-reestimate": {"bn_recalibration": 50},
    "+search": {"range_search": True},
    "+search+bn-mean": {"range_search": True, "bn_correction": "mean"},
    "+search+bn-mean-var": {"range_search": True, "bn_correction": "mean_var"},
    "+search+bn-reestimate": {"range_search": True, "bn_recalibration": 50},
    # the range search per weight group (range_search_scope="group"), added after the rows above
    "+group-search+bn-mean": {"range_search": True, "range_search_scope": "group", "bn_correction": "mean"},
    "+group-search+bn-mean-var": {"range_search": True, "range_search_scope": "group", "bn_correction": "mean_var"},
    "+group-search+bn-reestimate": {"range_search": True, "range_search_scope": "group", "bn_recalibration": 50},
    # the groups formed by the search's per-channel errors (range_search_scope="regroup"), added third
    "+regroup-search+bn-mean": {"range_search": True, "range_search_scope": "regroup", "bn_correction": "mean"},
    "+regroup-search+bn-mean-var": {"range_search": True, "range_search_scope": "regroup",
                                    "bn_correction": "mean_var"},
    "+regroup-search+bn-reestimate": {"range_search": True, "range_search_scope": "regroup", "bn_recalibration": 50},
    # the same on a finer candidate grid (FINE_RANGE_ALPHAS: nine percentiles, not six), added fourth
    "+regroup-fine-search+bn-mean-var": {"range_search": True, "range_search_scope": "regroup",
                                         "range_alphas": FINE_RANGE_ALPHAS, "bn_correction": "mean_var"},
    "+regroup-fine-search+bn-reestimate": {"range_search": True, "range_search_scope": "regroup",
                                           "range_alphas": FINE_RANGE_ALPHAS, "bn_recalibration": 50},
    # other search criteria (range_search_metric), added fifth: the MSE less each channel's mean error
    # (what the BatchNorm correction removes), and the MSE weighted by the prediction's sensitivity
    "+regroup-centered-search+bn-mean-var": {"range_search": True, "range_search_scope": "regroup",
                                             "range_search_metric": "centered", "bn_correction": "mean_var"},
    "+regroup-fine-centered-search+bn-mean-var": {"range_search": True, "range_search_scope": "regroup",
                                                  "range_alphas": FINE_RANGE_ALPHAS, "range_search_metric": "centered",
                                                  "bn_correction": "mean_var"},
    "+regroup-fisher-search+bn-mean-var": {"range_search": True, "range_search_scope": "regroup",
                                           "range_search_metric": "fisher", "bn_correction": "mean_var"},
}

# slow candidates (minutes each, not for the fast path), measured at SLOW_BITS only; they compete for `ours`
SLOW = {
    "+group-kl-search+bn-mean-var": {"range_search": True, "range_search_scope": "group", "range_search_metric": "kl",
                                     "bn_correction": "mean_var"},
}
SLOW_BITS = (4, 3)


@torch.no_grad()
def logits_of(model, x, norm) -> torch.Tensor:
    from adderquant.data import normalize

    model.eval()
    return torch.cat([model(normalize(x[i:i + 500], *norm)) for i in range(0, len(x), 500)])


def score(logits: torch.Tensor, y: torch.Tensor, fp_logits: torch.Tensor) -> dict:
    """Top-1 and cross-entropy against the labels, KL from the float model and changed predictions."""
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(fp_logits, 1), log_target=True, reduction="batchmean")
    return {"top1": 100.0 * float((logits.argmax(1) == y).float().mean()), "loss": float(F.cross_entropy(logits, y)),
            "kl": float(kl), "changed": int((logits.argmax(1) != fp_logits.argmax(1)).sum())}


def held_out_indices(n_train: int, calib_sets: list[torch.Tensor], n: int) -> torch.Tensor:
    taken = torch.cat(calib_sets)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(2022))
    return order[~torch.isin(order, taken)][:n]


def pick(rows: list[dict], bits: int, names) -> str:
    """The candidate with the lowest mean held-out KL at ``bits`` among ``names`` measured there (ties: the
    first named)."""
    kl = {}
    for r in rows:
        if r["bits"] == bits and r["candidate"] in names:
            kl.setdefault(r["candidate"], []).append(r["held_out_kl"])
    return min((n for n in names if n in kl), key=lambda n: statistics.mean(kl[n]))


def main(argv=None) -> int:
    from adderquant.checkpoints import find_official_addernet, load
    from adderquant.data import calibration_indices, load_dataset, normalize
    from adderquant.quant import QuantConfig, calibrate, quantize_adder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 directory (its training split is used, not its test split)")
    ap.add_argument("--checkpoint", default=find_official_addernet())
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "ptq_select"))
    ap.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.checkpoint is None:
        ap.error("the official AdderNet ResNet-20 was not found: pass --checkpoint")
    torch.set_num_threads(args.threads)
    json_path = Path(args.out + ".json")
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    rows = old.get("rows", []) if old.get("rule") == RULE else []
    done = {(r["seed"], r["bits"], r["candidate"]) for r in rows}
    ck = load(args.checkpoint)
    ds = load_dataset(args.data)
    calib_idx = {s: calibration_indices(ds, 1024, s) for s in SEEDS}
    held = held_out_indices(len(ds.x_train), list(calib_idx.values()), HELD_OUT)
    xh, yh = ds.x_train[held], ds.y_train[held]
    fp_logits = logits_of(ck.model, xh, ck.normalization)
    calib = {s: normalize(ds.x_train[calib_idx[s]], *ck.normalization) for s in SEEDS}
    observers = {}
    command = "python scripts/ptq_select.py --data " + args.data
    if list(args.bits) != list(BITS):
        command += " --bits " + " ".join(map(str, args.bits))
    out = {"command": command, "checkpoint": str(args.checkpoint), "rule": RULE,
           "held_out": f"{HELD_OUT} training images outside every calibration subset (seeds {list(SEEDS)})",
           "fp_held_out": score(fp_logits, yh, fp_logits), "rows": rows, "chosen_fast": {}, "chosen": {},
           "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
           "torch": torch.__version__}

    def measure(seed, bits, name, config):
        if (seed, bits, name) in done:
            return
        if seed not in observers:
            observers[seed] = calibrate(ck.model, calib[seed], QuantConfig.paper(4), min_alpha=0.99)
        t0 = time.perf_counter()
        q = quantize_adder(ck.model, calib[seed], config, observers=observers[seed]).model
        seconds = time.perf_counter() - t0
        scores = score(logits_of(q, xh, ck.normalization), yh, fp_logits)
        rows.append({"seed": seed, "bits": bits, "candidate": name,
                     **{f"held_out_{k}": v for k, v in scores.items()}, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
        json_path.write_text(json.dumps(out, indent=1))

    for bits in args.bits:
        base = QuantConfig.paper(bits, unsigned_activations=True)
        for seed in SEEDS:
            for name, switches in FAST.items():
                measure(seed, bits, name, base.with_(**switches))
        fast = out["chosen_fast"][bits] = pick(rows, bits, FAST)
        rounded = f"{fast}+rounding"
        for seed in SEEDS:
            measure(seed, bits, rounded, base.with_(**FAST[fast], learned_rounding=ROUNDING))
        if bits in SLOW_BITS:
            for seed in SEEDS:
                for name, switches in SLOW.items():
                    measure(seed, bits, name, base.with_(**switches))
        with_rounding = list(dict.fromkeys(r["candidate"] for r in rows
                                           if r["bits"] == bits and r["candidate"].endswith("+rounding")))
        out["chosen"][bits] = pick(rows, bits, [*FAST, *SLOW, *with_rounding])  # every set measured at this width
    json_path.write_text(json.dumps(out, indent=1))
    Path(args.out + ".md").write_text(markdown(out))
    print(f"wrote {args.out}.json and .md; ours-fast: {out['chosen_fast']}; ours: {out['chosen']}")
    return 0


def markdown(out: dict) -> str:
    rows = out["rows"]
    bits_list = sorted({r["bits"] for r in rows}, reverse=True)
    names = [n for n in dict.fromkeys(r["candidate"] for r in rows) if n in FAST]
    names += [n for n in dict.fromkeys(r["candidate"] for r in rows) if n not in FAST]
    chosen = {int(b): c for b, c in out["chosen"].items()}
    fast = {int(b): c for b, c in out["chosen_fast"].items()}
    fp = out["fp_held_out"]

    def cell(b, name):
        mine = [r for r in rows if r["bits"] == b and r["candidate"] == name]
        if not mine:
            return "–"
        kl = [r["held_out_kl"] for r in mine]
        text = (f"{statistics.mean(kl):.5f} ± {statistics.pstdev(kl):.5f} "
                f"({statistics.mean(r['held_out_top1'] for r in mine):.2f} %; "
                f"{statistics.mean(r['held_out_changed'] for r in mine):.0f} ch.)")
        if name == chosen[b]:
            return f"**{text}** (ours)"
        return f"*{text}* (ours-fast)" if name == fast[b] else text

    lines = ["# Choosing `ours`: switch sets scored on held-out training images", "",
             f"`{out['command']}` — official AdderNet ResNet-20, 1024 calibration images per seed, scored on "
             f"{out['held_out']}; the full-precision model gets {fp['top1']:.2f} % of them right "
             f"(loss {fp['loss']:.4f}). The test set plays no part. Rule: {out['rule']}. Each cell: "
             "mean ± std of the KL over the seeds (mean top-1; mean number of the 2000 predictions that differ "
             "from the float model's). *Italic* = `ours-fast` (best fast candidate), **bold** = `ours` (the "
             "lowest of every row at the width: the fast candidates, those with learned rounding "
             "(200 iterations per block) that a selection run measured for its fast winner, and the slow "
             f"candidates, measured at {' and '.join(map(str, SLOW_BITS))} bits). `centered`, `fisher` and `kl` "
             "name the range search's criterion (`range_search_metric`; the others use the layer's output MSE).",
             "",
             "| candidate | " + " | ".join(f"{b}-bit" for b in bits_list) + " |",
             "|---|" + "---|" * len(bits_list)]
    for name in names:
        label = name.replace("+rounding", " + learned rounding")
        lines.append(f"| {label} | " + " | ".join(cell(b, name) for b in bits_list) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
