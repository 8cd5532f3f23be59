#!/usr/bin/env python
"""The QAT recipe defaults, chosen on held-out TRAINING images — never the test set.

From one PTQ model (`ours-fast`, 1024 calibration images, seed 0) each candidate recipe fine-tunes a copy
for one epoch on 10,000 training images (the first 15,000 minus a seeded held-out 5,000) and is
scored on those 5,000 held-out images: top-1 and, the finer score, mean cross-entropy (the
full-precision model has seen all training images, so top-1 there sits near 99 %). The PTQ model's
own score on the same images is the baseline. The test split is not read.

    python scripts/qat_select.py --data ../shared/data/cifar10 [--bits 4]   # docs/results/qat_select_<b>bit.json

The longer pilot (``--epochs 2 --train 50000``: the whole training split minus the same kind of
seeded 5,000, two epochs per candidate) asks whether a learning rate that loses in 40 steps wins
over 350: ``docs/results/qat_select_<b>bit_2ep.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {
    "paper recipe (lr 1e-4)": {"lr": 1e-4},
    "lr 1e-3": {"lr": 1e-3},
    "lr 1e-4 + distill 0.5": {"lr": 1e-4, "distill": 0.5},
    "lr 1e-3 + distill 0.5": {"lr": 1e-3, "distill": 0.5},
    "lr 1e-3 + distill 1.0": {"lr": 1e-3, "distill": 1.0},
    "lr 3e-3 + distill 0.5": {"lr": 3e-3, "distill": 0.5},
    "lr 3e-5 + distill 0.5": {"lr": 3e-5, "distill": 0.5},
    "lr 1e-4 + distill 1.0": {"lr": 1e-4, "distill": 1.0},
    "lr 3e-4 + distill 0.5": {"lr": 3e-4, "distill": 0.5},
    "lr 1e-4 + distill 0.5 + ranges lr 0.1": {"lr": 1e-4, "distill": 0.5, "range_lr": 0.1},
    "lr 1e-4 + distill 0.5 + ranges lr 1": {"lr": 1e-4, "distill": 0.5, "range_lr": 1.0},
    "lr 1e-4 + distill 0.5 + ranges lr 10": {"lr": 1e-4, "distill": 0.5, "range_lr": 10.0},
    "lr 1e-4 + distill 0.5 + frozen BN": {"lr": 1e-4, "distill": 0.5, "freeze_bn": True},
    "lr 3e-4 + distill 0.5 + frozen BN": {"lr": 3e-4, "distill": 0.5, "freeze_bn": True},
    "lr 1e-3 + distill 0.5 + frozen BN": {"lr": 1e-3, "distill": 0.5, "freeze_bn": True},
}
# What a candidate leaves unnamed: the paper's recipe, not today's defaults (which these runs chose).
UNNAMED = {"distill": 0.0, "freeze_bn": False, "range_lr": 0.0}


def main(argv=None) -> int:
    from adderquant.checkpoints import find_official_addernet, load
    from adderquant.data import calibration_indices, load_dataset, normalize
    from adderquant.evaluate import evaluate
    from adderquant.quant import QATConfig, QuantConfig, qat, quantize
    from adderquant.quant.qat import holdout_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--checkpoint", default=find_official_addernet())
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--train", type=int, default=15000, help="first N training images: pilot train + held-out")
    ap.add_argument("--holdout", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=1, help="QAT epochs per candidate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="run these candidates only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    ck = load(args.checkpoint)
    fp = ck.model.eval()
    idx = calibration_indices(ds, 1024, 0)
    ptq = quantize(fp, normalize(ds.x_train[idx], *ck.normalization), QuantConfig.ours_fast(args.bits)).model
    _, held = holdout_split(args.train, args.holdout, 0)
    x_val, y_val = ds.x_train[: args.train][held], ds.y_train[: args.train][held]
    base = evaluate(ptq, x_val, y_val, ck.normalization)
    rows = {"PTQ (no QAT)": {"holdout_top1": base.top1, "holdout_loss": base.loss}}
    print(f"PTQ: held-out top-1 {base.top1:.2f} loss {base.loss:.4f}", flush=True)
    for name, recipe in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        model = copy.deepcopy(ptq)
        cfg = QATConfig(epochs=args.epochs, batch_size=256, limit_train=args.train, holdout=args.holdout, eval_limit=0,
                        schedule="step", **{**UNNAMED, **recipe})
        t0 = time.perf_counter()
        entry = qat(model, ds, ck.normalization, cfg, float_model=fp)[-1]
        rows[name] = {**recipe, **{k: entry[k] for k in ("holdout_top1", "holdout_loss", "train_loss")
                                   + (("range_ratio",) if "range_ratio" in entry else ())},
                      "seconds": time.perf_counter() - t0}
        print(f"{name}: held-out top-1 {entry['holdout_top1']:.2f} loss {entry['holdout_loss']:.4f} "
              f"({rows[name]['seconds']:.0f} s)", flush=True)
    suffix = "" if args.epochs == 1 else f"_{args.epochs}ep"
    out = Path(args.out or ROOT / "docs" / "results" / f"qat_select_{args.bits}bit{suffix}.json")
    if args.only and out.exists():  # a partial run adds its rows to the record
        rows = {**json.loads(out.read_text())["rows"], **rows}
    command = "python scripts/qat_select.py --data <cifar10> --bits " + str(args.bits)
    if args.epochs != 1:
        command += f" --epochs {args.epochs} --train {args.train}"
    if args.only:
        command += " --only " + " ".join(f"'{n}'" for n in args.only)
    if args.out:
        command += f" --out {args.out}"
    record = {"command": command, "bits": args.bits, "epochs": args.epochs,
              "train_images": args.train - args.holdout, "holdout_images": args.holdout,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "rows": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
