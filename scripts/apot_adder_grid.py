"""APoT levels vs uniform levels on the adder layers' shared group range (issue: APoT extension).

One calibration pass on 1024 CIFAR-10 training images (seed 0), then the paper's method and paper-unsigned
(paper + unsigned grid) at 4 and 3 bits with ``grid="uniform"`` and ``grid="apot"``, each evaluated on
the test split paired with full precision. Writes a JSON and prints a Markdown table.

    python scripts/apot_adder_grid.py --data ../shared/data/cifar10 --out docs/results/apot_adder_grid.json
"""

from __future__ import annotations

import argparse
import json
import time

from adderquant import checkpoints
from adderquant.data import calibration_subset, load_dataset, normalize
from adderquant.evaluate import evaluate, paired
from adderquant.quant import QuantConfig, calibrate
from adderquant.quant.ptq import quantize_adder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--checkpoint", default=checkpoints.find_official_addernet(),
                    help="default: the official AdderNet ResNet-20 (checkpoints.find_official_addernet)")
    ap.add_argument("--out", default="docs/results/apot_adder_grid.json")
    args = ap.parse_args()
    if args.checkpoint is None:
        ap.error("the official AdderNet ResNet-20 was not found: pass --checkpoint")
    ck = checkpoints.load(args.checkpoint)
    ds = load_dataset(args.data)
    calib = normalize(calibration_subset(ds, 1024, 0), *ck.normalization)
    fp = evaluate(ck.model, ds.x_test, ds.y_test, ck.normalization, progress=False)
    obs = calibrate(ck.model, calib, QuantConfig.paper(4), progress=False)
    rows = []
    for bits in (4, 3):
        for name, make in (("paper", QuantConfig.paper), ("paper-unsigned", QuantConfig.paper_unsigned)):
            for grid in ("uniform", "apot"):
                start = time.perf_counter()
                q = quantize_adder(ck.model, calib, make(bits, grid=grid), observers=obs).model
                res = evaluate(q, ds.x_test, ds.y_test, ck.normalization, progress=False)
                cmp = paired(fp, res, ds.y_test)
                rows.append({"method": name, "bits": bits, "grid": grid, "top1": res.top1, "delta": cmp["delta"],
                             "changed": cmp["changed"], "n": res.n, "seconds": time.perf_counter() - start})
                print(json.dumps(rows[-1]), flush=True)
    out = {"command": "python scripts/apot_adder_grid.py --data " + args.data, "data": ds.source,
           "fp_top1": fp.top1, "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"\n{ds.name} test, {fp.n} images; FP {fp.top1:.2f} %\n\n| method | bits | uniform levels | APoT levels |")
    print("|---|---|---|---|")
    for bits in (4, 3):
        for name in ("paper", "paper-unsigned"):
            u, a = (next(r for r in rows if (r["method"], r["bits"], r["grid"]) == (name, bits, g))
                    for g in ("uniform", "apot"))
            print(f"| {name} | {bits} | {u['top1']:.2f} ({u['delta']:+.2f}) | {a['top1']:.2f} ({a['delta']:+.2f}) |")


if __name__ == "__main__":
    main()
