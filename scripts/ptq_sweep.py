#!/usr/bin/env python
"""PTQ sweep of the official AdderNet ResNet-20 on CIFAR-10: the paper's Table 1 column and Tables 3–5.

One calibration pass (1024 training images, seed 0, observers kept for every α ≥ 0.99) serves every
configuration; the full-precision model is evaluated once and its predictions give the paired
deltas (images turned right → wrong and wrong → right) of every quantized model.

Rows whose quantized model is the same function as one already evaluated are not evaluated again:
a model's *fingerprint* hashes, per adder layer, each output channel's scale, integer weights and
clamp bias, the bit width and the lossless-activation-clamp switch — everything the output of a
channel depends on (the group a channel belongs to matters only through its scale). The integer
accumulator ``x̄ ⊕ w̄`` is exact in float32 at these widths (≤ 576·255 < 2^24), so equal fingerprints
give bit-identical logits; such rows are marked ``same_model_as`` in the JSON and the tables.

The JSON (``--out`` + ``.json``) is rewritten after every row and read back on start: rows already
present are skipped, so an interrupted run continues where it stopped. The markdown (``.md``) is
generated from the JSON (``--markdown-only`` regenerates it without computing anything).

    python scripts/ptq_sweep.py --data ../shared/data/cifar10            # full sweep, 10,000 images
    python scripts/ptq_sweep.py --data ../shared/data/cifar10-subset.npz --limit 200 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
DEFAULT_OUT = ROOT / "docs" / "results" / "ptq_resnet20_cifar10"
MIN_ALPHA = 0.99
MAIN_BITS = (8, 6, 5, 4, 3)
MAIN_METHODS = ("qssf-w", "qssf-a", "qssf", "paper", "ours")
ALPHAS = (0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0)

# The paper's numbers (../shared/reference/README.md). Table 1: ResNet-20, CIFAR-10, PTQ.
PAPER_TABLE1 = {8: 91.40, 6: 91.32, 5: 91.36, 4: 90.72}
PAPER_FP = 91.42  # 91.40 + 0.02 (Table 1's bracket)
# Tables 3–5: 4-bit ResNet-20 on CIFAR-100 (QAT; the ablation of Sec. 4.4).
PAPER_TABLE3 = {(False, False, False): 57.88, (True, False, False): 60.42, (False, True, False): 62.30,
                (False, False, True): 61.55, (True, True, False): 65.17, (True, True, True): 67.35}
PAPER_TABLE4 = {1: 65.91, 2: 66.38, 4: 67.35, 8: 67.11}
PAPER_TABLE4_FLOPS = {1: 1.0, 2: 1.002, 4: 1.005, 8: 1.012}
PAPER_TABLE5 = {"uniform": 65.72, "all": 66.61, "mean": 66.86, "max": 67.35}


# ---------------------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------------------


def row_specs(only: str) -> list[dict]:
    """Every row of the sweep: ``table``, ``label``, and the ``config`` (a QuantConfig) or ``choose``."""
    from adderquant.analysis.energy import group_overhead_ratio
    from adderquant.quant import QuantConfig
    from adderquant.quant.config import preset

    rows: list[dict] = []
    if only in ("main", "all"):
        for bits in MAIN_BITS:
            for method in MAIN_METHODS:
                spec = {"table": "main", "label": f"{method} {bits}-bit", "bits": bits, "method": method}
                if method == "qssf":
                    spec["choose"] = "qssf"
                else:
                    spec["config"] = preset(method, bits)
                rows.append(spec)
    if only in ("ablation", "all"):
        for g in (1, 4):  # Table 3: the three sub-methods on/off; scale_source="min" so each switch matters
            for wc in (False, True):
                for ac in (False, True):
                    on = [n for n, f in (("G", g > 1), ("W", wc), ("A", ac)) if f]
                    cfg = QuantConfig(bits=4, method="paper", groups=g, weight_clamp=wc, act_clamp=ac,
                                      scale_source="min")
                    rows.append({"table": "table3", "label": "+".join(on) or "none", "bits": 4, "config": cfg,
                                 "switches": {"groups": g > 1, "weight_clamp": wc, "act_clamp": ac}})
        for g in (1, 2, 4, 8):  # Table 4
            rows.append({"table": "table4", "label": f"g={g}", "bits": 4, "groups": g,
                         "config": QuantConfig.paper(4, groups=g),
                         "relative_flops": 1 + group_overhead_ratio(c=32, g=g)})
        for feature in ("uniform", "all", "mean", "max"):  # Table 5
            rows.append({"table": "table5", "label": feature, "bits": 4, "group_feature": feature,
                         "config": QuantConfig.paper(4, group_feature=feature)})
        for mode in ("percentile", "max_scale"):  # α sweep
            for a in ALPHAS:
                rows.append({"table": "alpha", "label": f"{mode} α={a:g}", "bits": 4, "alpha": a, "mode": mode,
                             "config": QuantConfig.paper(4, alpha=a, act_clamp_mode=mode)})
        for bits in MAIN_BITS:  # beyond the paper: the lossless activation clamp
            for on in (False, True):
                rows.append({"table": "lossless", "label": f"{bits}-bit {'on' if on else 'off'}", "bits": bits,
                             "on": on, "config": QuantConfig.paper(bits, lossless_act_clamp=on)})
        for bits in MAIN_BITS:  # beyond the paper: the unsigned grid for non-negative inputs
            rows.append({"table": "unsigned", "label": f"{bits}-bit", "bits": bits,
                         "config": QuantConfig.paper(bits, unsigned_activations=True)})
        for bits in MAIN_BITS:  # both switches (the first definition of `ours`)
            rows.append({"table": "both", "label": f"{bits}-bit", "bits": bits,
                         "config": QuantConfig.paper(bits, lossless_act_clamp=True, unsigned_activations=True)})
        for bits in (8, 4):  # the weight-clamp interval
            for target in ("range", "representable"):
                rows.append({"table": "clamp_to", "label": f"{bits}-bit {target}", "bits": bits,
                             "clamp_to": target, "config": QuantConfig.paper(bits, clamp_to=target)})
    return rows


def config_key(config) -> str:
    d = asdict(config)
    d.pop("method")  # a label only
    return json.dumps(d, sort_keys=True)


def fingerprint(model) -> str:
    """Hash of everything a quantized adder model's outputs depend on (module docstring)."""
    from adderquant.quant import QuantAdderConv2d

    h = hashlib.sha256()
    for name, m in model.named_modules():
        if isinstance(m, QuantAdderConv2d):
            with torch.no_grad():
                parts = (m.channel_scales(), m.int_weight(), m.clamp_bias)
            grid = getattr(m, "grid", "uniform")
            h.update(f"{name}:{m.bits}:{m.lossless_act_clamp}:{getattr(m, 'signed', True)}"
                     f"{'' if grid == 'uniform' else ':' + grid}".encode())
            for t in parts:
                h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def group_summary(stats: dict) -> dict:
    """How many groups got a shared range below r_x (the only case where grouping changes anything);
    ``stats``: ``QuantResult.layers``."""
    total = below = 0
    for s in stats.values():
        for r in s["ranges"]:
            total += 1
            below += r < s["r_x"] * (1 - 1e-6)
    ratios = [s["max_abs_w"] / s["r_x"] for s in stats.values() if s["r_x"] > 0]
    w = [s["max_abs_w"] for s in stats.values()]
    rx = [s["r_x"] for s in stats.values()]
    return {"groups": total, "groups_below_r_x": below, "layers": len(stats),
            "max_w_min": min(w, default=None), "max_w_max": max(w, default=None),
            "r_x_min": min(rx, default=None), "r_x_max": max(rx, default=None),
            "max_w_over_r_x_min": min(ratios, default=None), "max_w_over_r_x_max": max(ratios, default=None)}


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------


def describe_data(data: Path, ds, n: int) -> str:
    total = len(ds.y_test)
    rel = os.path.relpath(data.resolve(), ROOT)
    if data.suffix == ".npz" and "subset" in data.name:
        return f"CIFAR-10 test subset ({total})" if n == total else f"CIFAR-10 test subset (first {n} of {total})"
    what = f"{total:,} images" if n == total else f"first {n:,} of {total:,} images"
    return f"{ds.name} test set, {what} ({rel})"


def _git_state() -> dict:
    """The commit the run used and the tracked source files that differed from it (shared working tree)."""
    import subprocess

    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("diff", "--name-only", "HEAD", "--", "src", "csrc", "setup.py")
    return {"git_head": git("rev-parse", "--short", "HEAD"), "uncommitted_source": dirty.split() if dirty else []}


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _pred_digest(pred: torch.Tensor) -> str:
    return hashlib.sha1(pred.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def time_one_config(model, ds, x_test, y_test, normalization, args, run: int) -> dict:
    """Wall time of one standalone PTQ configuration (paper's method, 4 bits): its own calibration pass
    (α = 0.999 only), quantization, and the evaluation of the test images — what a user of
    ``adderquant.quantize`` pays."""
    from adderquant.data import calibration_subset, normalize
    from adderquant.evaluate import evaluate
    from adderquant.quant import calibrate, quantize_adder
    from adderquant.quant.config import QuantConfig

    config = QuantConfig.paper(4)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    calib = normalize(calibration_subset(ds, args.calib_size, seed=args.seed), *normalization)
    obs = calibrate(model, calib, config, progress=False)
    t1 = time.perf_counter()
    q = quantize_adder(model, calib, config, observers=obs).model
    t2 = time.perf_counter()
    r = evaluate(q, x_test, y_test, normalization, batch_size=args.batch_size, progress=False)
    t3 = time.perf_counter()
    return {"config": "paper 4-bit", "run": run, "calibration_seconds": t1 - t0, "quantize_seconds": t2 - t1,
            "eval_seconds": t3 - t2, "total_seconds": t3 - t0, "n": r.n, "top1": r.top1,
            "loadavg_before": None if load is None else round(load, 2),
            "loadavg_after": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def run(args) -> dict:
    import adderquant.kernels as kernels
    from adderquant import checkpoints as ckpt_io
    from adderquant.data import calibration_subset, load_dataset, normalize
    from adderquant.evaluate import evaluate, paired
    from adderquant.quant import QuantConfig, calibrate, quantize_adder

    start = time.perf_counter()
    out_json = Path(str(args.out) + ".json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or ckpt_io.find_official_addernet()
    if checkpoint is None:
        raise SystemExit("no checkpoint given and the official AdderNet ResNet-20 was not found: pass --checkpoint")
    data_path, ckpt_path = Path(args.data), Path(checkpoint)
    ds = load_dataset(data_path)
    ck = ckpt_io.load(ckpt_path)
    model = ck.model.eval()
    x_test, y_test = ds.x_test, ds.y_test
    if args.limit:
        x_test, y_test = x_test[: args.limit], y_test[: args.limit]
    n = len(y_test)
    setup = {"data": os.path.relpath(data_path.resolve(), ROOT), "dataset": ds.name,
             "data_description": describe_data(data_path, ds, n), "n_test": n, "n_test_total": len(ds.y_test),
             "limit": args.limit, "calib_size": args.calib_size, "calib_seed": args.seed, "min_alpha": MIN_ALPHA,
             "calib_from": f"{ds.name} training images ({len(ds.y_train):,})",
             "checkpoint": os.path.relpath(ckpt_path.resolve(), ROOT), "model": ck.name}
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    data: dict = {}
    if out_json.exists() and not args.restart:
        data = json.loads(out_json.read_text())
        if data.get("setup") != setup:
            raise SystemExit(f"{out_json} was made with another setup:\n  {data.get('setup')}\nvs\n  {setup}\n"
                             "use --restart to start over, or another --out")
    if not data:
        data = {"setup": setup, "runs": [], "fp": None, "rows": [], "qssf_choice": {}}
    probe = torch.zeros(1, 1, 3, 3)  # the backend that serves this run's CPU float32 adder calls
    backend = kernels.backend_name("forward", probe, probe)
    run_info = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "backend": backend,
                "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
                "cpu": platform.processor() or platform.machine(), "only": args.only}
    run_info.update(_git_state())
    data["runs"].append(run_info)
    if backend != "cpu":
        print(f"warning: adder backend is {backend!r} (the fast 'cpu' backend is not built)", file=sys.stderr)

    def save():
        run_info["wall_seconds"] = time.perf_counter() - start
        _atomic_json(out_json, data)

    log = tqdm.write
    if data["fp"] is None:
        r = evaluate(model, x_test, y_test, ck.normalization, batch_size=args.batch_size, progress=False)
        data["fp"] = {**r.summary(), "predictions": "".join(map(str, r.predictions.tolist()))
                      if ck.num_classes <= 10 else r.predictions.tolist()}
        log(f"full precision: top-1 {r.top1:.2f} %  top-5 {r.top5:.2f} %  ({r.seconds:.1f} s, {n} images)")
        save()
    fp_pred = data["fp"]["predictions"]
    fp_pred = torch.tensor([int(c) for c in fp_pred] if isinstance(fp_pred, str) else fp_pred)
    from adderquant.evaluate import EvalResult

    fp_result = EvalResult(data["fp"]["top1"], data["fp"]["top5"], n, fp_pred, data["fp"]["seconds"])

    specs = row_specs(args.only)
    done = {(r["table"], r["label"]) for r in data["rows"]}
    todo = [s for s in specs if (s["table"], s["label"]) not in done]
    if args.timing:
        data.setdefault("timing_one_config", []).append(
            time_one_config(model, ds, x_test, y_test, ck.normalization, args, run=len(data["runs"]) - 1))
        t = data["timing_one_config"][-1]
        log(f"one PTQ config ({t['config']}): calibration {t['calibration_seconds']:.1f} s + quantization "
            f"{t['quantize_seconds']:.2f} s + evaluation {t['eval_seconds']:.1f} s = {t['total_seconds']:.1f} s "
            f"(top-1 {t['top1']:.2f} %, load average before {t['loadavg_before']})")
        save()
    if not todo:
        log("every row is already in the JSON")
        if not args.timing:
            data["runs"].pop()  # nothing was run: leave the JSON as it was
        return data

    # one calibration pass for every configuration
    calib_u8 = calibration_subset(ds, args.calib_size, seed=args.seed)
    idx = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(args.seed))[: args.calib_size]
    if not torch.equal(ds.x_train[idx], calib_u8):
        raise RuntimeError("calibration labels: calibration_subset no longer draws randperm(seed)[:n]")
    calib_labels = ds.y_train[idx]
    calib = normalize(calib_u8, *ck.normalization)
    t0 = time.perf_counter()
    observers = calibrate(model, calib, QuantConfig.paper(), min_alpha=MIN_ALPHA, progress=False)
    calib_seconds = time.perf_counter() - t0
    data.setdefault("calibration", []).append({"seconds": calib_seconds, "images": args.calib_size,
                                               "run": len(data["runs"]) - 1})
    log(f"calibration: {args.calib_size} images, {calib_seconds:.1f} s")

    by_key = {r["key"]: r for r in data["rows"] if "key" in r and not r.get("reused_from")}
    by_fp = {r["fingerprint"]: r for r in data["rows"] if "fingerprint" in r and not r.get("reused_from")
             and not r.get("same_model_as")}
    by_label = {(r["table"], r["label"]): r for r in data["rows"]}
    interactive = sys.stderr.isatty()  # in a log file the per-row lines below are the progress
    bar = tqdm(todo, desc="ptq sweep", unit="row", dynamic_ncols=True, disable=not interactive)
    t_rows = time.perf_counter()
    for i, spec in enumerate(bar):
        bar.set_postfix_str(f"{spec['table']}: {spec['label']}")
        row = {k: v for k, v in spec.items() if k not in ("config", "choose")}
        if spec.get("choose") == "qssf":
            t0 = time.perf_counter()
            best = quantize_adder(model, calib, QuantConfig.qssf("best", spec["bits"]), labels=calib_labels,
                                  observers=observers)
            winner = best.config.method
            scores = {k: 100 * v for k, v in best.calibration_scores.items()}
            data["qssf_choice"][str(spec["bits"])] = {"chosen": winner, "calibration_top1": scores,
                                                     "seconds": time.perf_counter() - t0}
            source = by_label.get(("main", f"{winner} {spec['bits']}-bit"))
            if source is None:
                raise RuntimeError(f"qssf: the {winner} row must be evaluated first")
            row.update({k: source[k] for k in ("config", "key", "fingerprint", "top1", "top5", "n", "seconds",
                                               "paired", "pred_digest", "groups_info")},
                       chosen=winner, calibration_top1=scores, reused_from=source["label"])
        else:
            config = spec["config"]
            key = config_key(config)
            row.update(config=asdict(config), key=key)
            if key in by_key:
                src = by_key[key]
                row.update({k: src[k] for k in ("fingerprint", "top1", "top5", "n", "seconds", "paired",
                                                "pred_digest", "groups_info", "quantize_seconds")},
                           reused_from=f"{src['table']}: {src['label']}")
            else:
                t0 = time.perf_counter()
                result = quantize_adder(model, calib, config, observers=observers)
                q = result.model
                row["quantize_seconds"] = time.perf_counter() - t0
                row["fingerprint"] = fp = fingerprint(q)
                row["groups_info"] = group_summary(result.layers)
                if fp in by_fp:
                    src = by_fp[fp]
                    row.update({k: src[k] for k in ("top1", "top5", "n", "seconds", "paired", "pred_digest")},
                               same_model_as=f"{src['table']}: {src['label']}")
                else:
                    r = evaluate(q, x_test, y_test, ck.normalization, batch_size=args.batch_size, progress=False)
                    row.update(r.summary(), paired=paired(fp_result, r, y_test),
                               pred_digest=_pred_digest(r.predictions))
                    by_fp[fp] = row
                by_key[key] = row
        data["rows"].append(row)
        by_label[(row["table"], row["label"])] = row
        p = row["paired"]
        how = (f"= {row['reused_from']}" if row.get("reused_from") else
               f"same model as {row['same_model_as']}" if row.get("same_model_as") else f"{row['seconds']:.1f} s")
        el = time.perf_counter() - t_rows
        log(f"[{i + 1:>2}/{len(todo)} {el / 60:5.1f} min] [{spec['table']:>8}] {spec['label']:<24} "
            f"top-1 {row['top1']:6.2f} %  Δ {p['delta']:+6.2f}  "
            f"changed {p['changed']:>5}  (r→w {p['right_to_wrong']}, w→r {p['wrong_to_right']})  {how}")
        save()
    bar.close()
    save()
    return data


# ---------------------------------------------------------------------------------------------------
# markdown from the JSON
# ---------------------------------------------------------------------------------------------------


def _fmt(row: dict | None, delta: bool = True) -> str:
    if row is None:
        return "–"
    s = f"{row['top1']:.2f}"
    if delta:
        s += f" ({row['paired']['delta']:+.2f})"
    return s


def _order(items: list[tuple[str, float]]) -> str:
    """``a > b = c`` from (name, value) pairs, best first; equal values joined by ``=``."""
    items = sorted(items, key=lambda t: -t[1])
    out = ""
    for i, (name, v) in enumerate(items):
        out += name if i == 0 else (f" = {name}" if abs(v - items[i - 1][1]) < 1e-9 else f" > {name}")
    return out


def _same_order(ours: list[tuple[str, float]], paper: list[tuple[str, float]]) -> str:
    a = [n for n, _ in sorted(ours, key=lambda t: -t[1])]
    b = [n for n, _ in sorted(paper, key=lambda t: -t[1])]
    if a == b and len({v for _, v in ours}) == len(ours):
        return "the same order"
    ties = len({round(v, 9) for _, v in ours}) < len(ours)
    return "a different order" + (" (ties: identical quantized models)" if ties else "")


def _pk(row: dict) -> str:
    p = row["paired"]
    return f"{p['changed']} ({p['right_to_wrong']}/{p['wrong_to_right']})"


def _note(row: dict) -> str:
    if row.get("same_model_as"):
        return f"same model as {row['same_model_as']}"
    if row.get("reused_from"):
        return f"= {row['reused_from']}"
    return f"{row['seconds']:.0f} s"


def _switches(config: dict) -> str:
    """The switches in which a row's config differs from the paper's method."""
    from adderquant.quant import QuantConfig

    base = asdict(QuantConfig.paper(config["bits"]))
    diff = [f"{k}={v}" for k, v in config.items() if k != "method" and base.get(k) != v]
    return ", ".join(diff) or "nothing"


def _grouping_note(gi: dict, same: list[dict]) -> str:
    ranges = (f"max|W| per layer {gi['max_w_min']:.1f}–{gi['max_w_max']:.1f}, r_x {gi['r_x_min']:.2f}–"
              f"{gi['r_x_max']:.2f}, max|W| / r_x {gi['max_w_over_r_x_min']:.0f}–{gi['max_w_over_r_x_max']:.0f}")
    head = (f"**Grouping.** With the paper's shared range min(r_wj, r_x) a group's scale differs from the "
            f"activation scale only when its weight range r_wj is below r_x. In the 4-bit g = 4 model "
            f"{gi['groups_below_r_x']} of {gi['groups']} groups ({gi['layers']} adder layers) have r_wj < r_x "
            f"({ranges}; `adderquant report ranges` shows them per channel). ")
    if gi["groups_below_r_x"] == 0:
        head += ("Every group therefore gets the same scale 2·r_x/(2^b−1), the weight clamp folds everything "
                 "beyond it into the bias, and the group assignment has no effect on the quantized model: ")
    else:
        head += "Only those groups can change the quantized model: "
    if same:
        head += (f"{len(same)} rows above are marked *same model as*: identical per-channel scales, integer "
                 "weights and biases as an evaluated row, hence bit-identical outputs. ")
    else:
        head += "no two grouping rows gave the same quantized model. "
    return head + ("The paper's ablation is on CIFAR-100 checkpoints after QAT, where the ranges and the "
                   "training may differ; its Tables 3–5 orderings cannot be reproduced by PTQ of this "
                   "checkpoint when the groups collapse.\n" if gi["groups_below_r_x"] == 0 else "\n")


def markdown(data: dict) -> str:
    setup = data["setup"]
    rows = data["rows"]
    get = {(r["table"], r["label"]): r for r in rows}
    fp = data["fp"]
    L: list[str] = []
    L.append("# Post-training quantization of the official AdderNet ResNet-20 (CIFAR-10)\n")
    L.append("Generated by `scripts/ptq_sweep.py` from `ptq_resnet20_cifar10.json` (every number below is "
             "in that file, with per-row timings). Do not edit by hand: rerun the script (`--markdown-only` "
             "rebuilds this file from the JSON).\n")
    L.append(f"- **Evaluation data: {setup['data_description']}.**")
    L.append(f"- Calibration: {setup['calib_size']} images drawn from the {setup['calib_from']} with seed "
             f"{setup['calib_seed']} (`calibration_subset`), one pass (`calibrate(..., min_alpha="
             f"{setup['min_alpha']})`) reused by every configuration.")
    L.append(f"- Model: `{setup['checkpoint']}` ({setup['model']}, the authors' checkpoint); first layer and "
             "classifier in full precision, as in the paper.")
    L.append("- Commands (in order; the JSON is resumable, so a sweep may take several):")
    for r in data["runs"]:
        L.append(f"  - `{r['command']}` — {r.get('started', '?')}, backend `{r['backend']}`, "
                 f"{r['threads']} threads, torch {r['torch']}, {r.get('wall_seconds', 0):.0f} s")
    total = sum(r.get("wall_seconds", 0) for r in data["runs"])
    expected = row_specs("all")
    missing = [f"{s['table']}: {s['label']}" for s in expected if (s["table"], s["label"]) not in get]
    L.append(f"- Rows: {len(rows)} of {len(expected)}"
             + (f"; **missing: {len(missing)}** ({', '.join(missing[:6])}{' …' if len(missing) > 6 else ''})"
                if missing else " (complete)") + f"; total wall time {total / 60:.1f} min.")
    L.append("- Paper numbers: Table 1 is ResNet-20 **CIFAR-10 PTQ** (comparable setting). Tables 3–5 are "
             "4-bit ResNet-20 on **CIFAR-100** after QAT (Sec. 4.4; 67.35 % = the QAT entry of Table 1). "
             "CIFAR-100 is not available here, so the ablations below are PTQ on CIFAR-10: compare orderings, "
             "not values.\n")
    L.append("Cells: top-1 % (change vs full precision, points). *changed* = test images whose top-1 class "
             "differs from the full-precision model's (right→wrong / wrong→right).\n")

    # main table
    L.append("## Main table: methods × bits\n")
    L.append(f"Full precision: **{fp['top1']:.2f} %** top-1, {fp['top5']:.2f} % top-5 ({fp['n']} images; "
             f"paper: {PAPER_FP:.2f} % on the full test set).\n")
    ours_row = next((r for r in rows if r["table"] == "main" and r["label"].startswith("ours")), None)
    extra = _switches(ours_row["config"]) if ours_row else "beyond-paper switches"
    L.append(f"| bits | QSSF-w | QSSF-a | QSSF (chosen) | paper's method | ours (paper + {extra}) "
             "| paper Table 1 (PTQ) |")
    L.append("|---|---|---|---|---|---|---|")
    for b in MAIN_BITS:
        cells = [_fmt(get.get(("main", f"{m} {b}-bit"))) for m in MAIN_METHODS]
        q = get.get(("main", f"qssf {b}-bit"))
        if q is not None:
            cells[2] += f" [{q['chosen']}]"
        paper = f"{PAPER_TABLE1[b]:.2f} ({PAPER_TABLE1[b] - PAPER_FP:+.2f})" if b in PAPER_TABLE1 else "–"
        L.append(f"| {b} | " + " | ".join(cells) + f" | {paper} |")
    L.append("")
    if data.get("qssf_choice"):
        L.append("QSSF = the better of QSSF-w/QSSF-a by top-1 on the calibration images (their training "
                 "labels): " + "; ".join(
                     f"{b}-bit: " + ", ".join(f"{k} {v:.1f} %" for k, v in c["calibration_top1"].items())
                     + f" → {c['chosen']}" for b, c in sorted(data["qssf_choice"].items(), key=lambda t: -int(t[0])))
                 + ".\n")
    L.append("Details (top-5, changed predictions (right→wrong/wrong→right), evaluation time):\n")
    L.append("| row | top-1 | top-5 | changed (r→w/w→r) | time |")
    L.append("|---|---|---|---|---|")
    for b in MAIN_BITS:
        for m in MAIN_METHODS:
            r = get.get(("main", f"{m} {b}-bit"))
            if r is not None:
                L.append(f"| {r['label']} | {r['top1']:.2f} | {r['top5']:.2f} | {_pk(r)} | {_note(r)} |")
    L.append("")

    # ablations
    t3 = [r for r in rows if r["table"] == "table3"]
    if t3:
        L.append("## Ablation (4 bits): sub-methods (paper Table 3)\n")
        L.append("G = 4 group-shared scales (else one scale per layer), W = lossless weight clamp, A = "
                 "α = 0.999 percentile activation clamp (else r_x = max|X|); every row uses the paper's shared "
                 "range min(r_wj, r_x) (`scale_source=\"min\"`).\n")
        L.append("| G | W | A | top-1 here (CIFAR-10 PTQ) | changed (r→w/w→r) | note | paper (CIFAR-100 QAT) |")
        L.append("|---|---|---|---|---|---|---|")
        pairs_ours, pairs_paper = [], []
        for r in t3:
            sw = r["switches"]
            k = (sw["groups"], sw["weight_clamp"], sw["act_clamp"])
            paper = PAPER_TABLE3.get(k)
            mark = ["✓" if f else "" for f in k]
            L.append(f"| {mark[0]} | {mark[1]} | {mark[2]} | {_fmt(r)} | {_pk(r)} | {_note(r)} | "
                     f"{paper if paper is not None else '–'} |")
            if paper is not None:
                pairs_ours.append((r["label"], r["top1"]))
                pairs_paper.append((r["label"], paper))
        L.append("")
        if pairs_ours:
            L.append(f"Order here: {_order(pairs_ours)}. Paper: {_order(pairs_paper)} — "
                     f"{_same_order(pairs_ours, pairs_paper)}.\n")
    t4 = [r for r in rows if r["table"] == "table4"]
    if t4:
        L.append("## Ablation (4 bits): number of groups (paper Table 4)\n")
        L.append("Relative FLOPs from `adderquant.analysis.energy.group_overhead_ratio(c=32, g)` "
                 "(c_in = c_out = 32, 3×3).\n")
        L.append("| g | relative FLOPs | top-1 here | changed (r→w/w→r) | note | paper (CIFAR-100 QAT) |")
        L.append("|---|---|---|---|---|---|")
        for r in t4:
            g = r["groups"]
            L.append(f"| {g} | {r['relative_flops']:.3f} (paper {PAPER_TABLE4_FLOPS[g]}) | {_fmt(r)} | {_pk(r)} "
                     f"| {_note(r)} | {PAPER_TABLE4[g]} |")
        L.append("")
        ours = [(r["label"], r["top1"]) for r in t4]
        paper = [(f"g={g}", v) for g, v in PAPER_TABLE4.items()]
        L.append(f"Order here: {_order(ours)}. Paper: {_order(paper)} — {_same_order(ours, paper)}.\n")
    t5 = [r for r in rows if r["table"] == "table5"]
    if t5:
        L.append("## Ablation (4 bits, g = 4): grouping feature (paper Table 5)\n")
        L.append("| feature | top-1 here | changed (r→w/w→r) | note | paper (CIFAR-100 QAT) |")
        L.append("|---|---|---|---|---|")
        for r in t5:
            L.append(f"| {r['label']} | {_fmt(r)} | {_pk(r)} | {_note(r)} | {PAPER_TABLE5[r['label']]} |")
        L.append("")
        ours = [(r["label"], r["top1"]) for r in t5]
        paper = list(PAPER_TABLE5.items())
        L.append(f"Order here: {_order(ours)}. Paper: {_order(paper)} — {_same_order(ours, paper)}.\n")
    grouped = [r for r in rows if r["table"] in ("table3", "table4", "table5") and r.get("groups_info")]
    if grouped:
        gi = get.get(("table4", "g=4"), grouped[0])["groups_info"]
        L.append(_grouping_note(gi, [r for r in grouped if r.get("same_model_as")]))
    ta = [r for r in rows if r["table"] == "alpha"]
    if ta:
        L.append("## Ablation (4 bits): activation clamp α\n")
        L.append("`percentile`: r_x = sorted|X|[ceil(α(n−1))] (the paper); `max_scale`: r_x = α·max|X| (the "
                 "alternative the paper mentions). Paper's method otherwise (g = 4, weight clamp).\n")
        L.append("| α | percentile | changed | max_scale | changed |")
        L.append("|---|---|---|---|---|")
        for a in ALPHAS:
            p = get.get(("alpha", f"percentile α={a:g}"))
            m = get.get(("alpha", f"max_scale α={a:g}"))
            L.append(f"| {a:g} | {_fmt(p)} | {_pk(p) if p else '–'} | {_fmt(m)} | {_pk(m) if m else '–'} |")
        L.append("")
    tl = [r for r in rows if r["table"] in ("lossless", "unsigned", "both")]
    if tl:
        L.append("## Beyond the paper: lossless activation clamp, unsigned grid\n")
        L.append("*lossless act. clamp*: inside a group, activations above the range are compensated by "
                 "−Σ_window excess (`lossless_act_clamp`); *unsigned grid*: layers whose calibration inputs are "
                 "all ≥ 0 (every adder layer of ResNet-20: they follow a ReLU) use the grid [0, 2^b−1] with "
                 "s = r/(2^b−1) for weights and activations (`unsigned_activations`, Theorem 1 on [0, q_p·s]). "
                 "*both*: the two together. `ours` in the main table is the switch set that measured best "
                 "(its config is in the JSON). See docs/quantization.md.\n")
        L.append("| bits | paper | + lossless act. clamp | + unsigned grid | + both | changed: paper / lossless "
                 "/ unsigned / both |")
        L.append("|---|---|---|---|---|---|")
        for b in MAIN_BITS:
            cand = [get.get(("lossless", f"{b}-bit off")), get.get(("lossless", f"{b}-bit on")),
                    get.get(("unsigned", f"{b}-bit")), get.get(("both", f"{b}-bit"))]
            ch = " / ".join(str(r["paired"]["changed"]) if r else "–" for r in cand)
            L.append(f"| {b} | " + " | ".join(_fmt(r) for r in cand) + f" | {ch} |")
        L.append("")
    tc = [r for r in rows if r["table"] == "clamp_to"]
    if tc:
        L.append("## The weight-clamp interval: paper's literal [−r_x, r_x] vs the representable interval\n")
        L.append("`range` clamps W to [−r_x, r_x] as written in the paper, but q_p·s = r_x(1 − 1/(2^b−1)) < r_x: "
                 "the clamped weights are not representable and rounding leaves a per-channel constant error "
                 "that BatchNorm amplifies. `representable` applies Theorem 1 to [q_n·s, q_p·s] (still exact).\n")
        L.append("| bits | range (paper literal) | representable (default) | changed range / representable |")
        L.append("|---|---|---|---|")
        for b in (8, 4):
            a, c = get.get(("clamp_to", f"{b}-bit range")), get.get(("clamp_to", f"{b}-bit representable"))
            ch = f"{a['paired']['changed'] if a else '–'} / {c['paired']['changed'] if c else '–'}"
            L.append(f"| {b} | {_fmt(a)} | {_fmt(c)} | {ch} |")
        L.append("")

    # timing
    L.append("## Timing\n")
    cal = data.get("calibration") or []
    p4 = get.get(("main", "paper 4-bit"))
    if cal and p4 and not p4.get("reused_from"):
        c = cal[0]["seconds"]
        L.append(f"- In the sweep, the paper's method at 4 bits: calibration {c:.1f} s "
                 f"({setup['calib_size']} images) + quantization {p4.get('quantize_seconds', 0):.2f} s + "
                 f"evaluation {p4['seconds']:.1f} s ({p4['n']:,} images) = "
                 f"**{c + p4.get('quantize_seconds', 0) + p4['seconds']:.1f} s** "
                 f"(shared calibration pass for α ≥ {setup['min_alpha']}; goal: < 60 s for 10,000 images on "
                 "the 2-core CPU).")
    for t in data.get("timing_one_config", []):
        L.append(f"- Standalone PTQ of one configuration ({t['config']}, `--timing`, run {t['run'] + 1}): "
                 f"calibration {t['calibration_seconds']:.1f} s + quantization {t['quantize_seconds']:.2f} s + "
                 f"evaluation {t['eval_seconds']:.1f} s ({t['n']:,} images) = **{t['total_seconds']:.1f} s** "
                 f"(top-1 {t['top1']:.2f} %; 1-min load average {t['loadavg_before']} before, "
                 f"{t['loadavg_after']} after, on 2 cores).")
    L.append(f"- Full-precision evaluation: {fp['seconds']:.1f} s ({fp['n']:,} images).")
    evals = [r for r in rows if not r.get("reused_from") and not r.get("same_model_as")]
    if evals:
        mean = sum(r["seconds"] for r in evals) / len(evals)
        L.append(f"- {len(evals)} distinct quantized models evaluated (mean {mean:.1f} s each); "
                 f"{len(rows) - len(evals)} rows reused an identical configuration or model.")
    L.append(f"- Total wall time over all runs: {total / 60:.1f} min. The machine was shared with other "
             "developers' jobs, so times are upper bounds.")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 directory or .npz (default %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="default: the official AdderNet ResNet-20 (adderquant.checkpoints.find_official_addernet)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test images only")
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="calibration subset seed")
    p.add_argument("--only", choices=("main", "ablation", "all"), default="all")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output path without suffix (.json and .md)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    p.add_argument("--restart", action="store_true", help="ignore an existing JSON and start over")
    p.add_argument("--timing", action="store_true",
                   help="also time one standalone PTQ configuration (calibration + quantization + evaluation)")
    p.add_argument("--markdown-only", action="store_true", help="only regenerate the .md from the .json")
    args = p.parse_args(argv)
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    if args.markdown_only:
        data = json.loads(out_json.read_text())
    else:
        data = run(args)
    out_md.write_text(markdown(data))
    print(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
