"""Command line: ``adderquant <command> ...``.

Each command is a pair of small functions: ``_add_<cmd>(subparsers)`` builds its parser and
``_run_<cmd>(args) -> int`` calls the Python API; the pairs are listed in :data:`COMMANDS`. To add
a command, write its pair and append one entry. Keep the work in the library: a ``_run_`` function
only turns arguments into API calls and results into output.

Conventions: ``--json`` makes the LAST stdout line one JSON object (progress bars go to stderr);
the exception types the library raises for bad input (:data:`USER_ERRORS`) become a one-line
``adderquant <cmd>: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .checkpoints import find_official_addernet
from .quant.config import METHODS, RANGE_SEARCH_METRICS, RANGE_SEARCH_SCOPES
from .utils import CHECKPOINTS_ENV, DATA_ENV, json_dumps


def _jsonable(obj):
    """JSON fallback: dataclasses as dicts, tensors and arrays as lists, anything else as text."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _emit(args, payload: dict, human: str) -> None:
    """Print ``human`` text, or with ``--json`` one JSON line (the last stdout line; NaN/inf as null)."""
    if getattr(args, "json", False):
        print(json_dumps(payload, default=_jsonable), flush=True)
    else:
        print(human, flush=True)


def _add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        p.add_argument("--data", default=os.environ.get(DATA_ENV),
                       help=f"data set: a .npz, a shard directory, ... (default: ${DATA_ENV})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (the last line)")


def _data(args):
    from .data import load_dataset

    if not args.data:
        raise FileNotFoundError(f"no data set given: pass --data PATH or set {DATA_ENV}")
    return load_dataset(args.data)


def _device(args) -> str:
    """The device ``--device`` names (default: CUDA when there is one); every command that takes
    ``--device`` calls this first, so a device it cannot have is refused before any work."""
    from .utils import default_device

    return str(default_device(args.device))


# ---------------------------------------------------------------------------------------------- train


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model with the AdderNet recipe (resumable; torchrun for DDP)",
                       description="Train with SGD momentum 0.9, wd 5e-4, cosine lr, crop+flip. Writes "
                                   "log.jsonl, checkpoint.safetensors/.json and state.pt into --out.")
    p.add_argument("--model", required=True, help="registered model name (see `adderquant models`)")
    p.add_argument("--kind", default="adder", choices=("adder", "conv"))
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--eta", type=float, default=0.2, help="adder adaptive gradient scale (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default runs/<model>-<kind>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/state.pt when present")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds another run's files (without it, refused)")
    p.add_argument("--stop-after", type=int, default=None, help="run at most N epochs now (resume later)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop after the epoch that would overrun this many seconds")
    p.add_argument("--limit-train", type=int, default=None, help="use the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (adder layers stay fp32)")
    _add_common(p)
    return p


def _run_train(args) -> int:
    from .train import TrainConfig, train

    _device(args)
    dataset = _data(args)
    config = TrainConfig(
        model=args.model, kind=args.kind, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        eta=args.eta, seed=args.seed, amp=args.amp,
        out_dir=args.out or f"runs/{args.model}-{args.kind}-s{args.seed}",
        limit_train=args.limit_train, limit_test=args.limit_test, eval_every=args.eval_every,
        resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after, time_limit=args.time_limit,
        device=args.device, progress=not args.json)
    result = train(config, dataset)
    if result["rank"] != 0:
        return 0
    last = result["last"]
    top1 = last.get("test_top1")
    human = (f"{args.model} ({args.kind}) on {dataset.name}: {result['epochs_done']}/{args.epochs} epochs"
             + (f", test top-1 {top1:.2f} %" if top1 is not None else "")
             + f"; checkpoint {result['checkpoint']}")
    _emit(args, {**result, "data": args.data, "dataset": dataset.name}, human)
    return 0


# ----------------------------------------------------------------------------------------------- eval


def _add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on the test split",
                       description="Evaluate any supported checkpoint (adderquant safetensors, the official "
                                   "AdderNet .pth, registered importers, plain state_dicts).")
    p.add_argument("--model", default=None,
                   help="model name (required for plain state_dicts; checked against the checkpoint)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--kind", default=None, choices=("adder", "conv"), help="needed for plain state_dicts")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test images")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--unsafe-load", action="store_true",
                   help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")
    p.add_argument("--bits", type=int, default=None, help="bit width of an APoT checkpoint (the file does not say)")
    p.add_argument("--runtime", choices=("engine", "numpy"), default="engine",
                   help="what runs an .aqz file: the integer engine (PyTorch integer ops and the C kernels; "
                        "fastest) or the torch-free NumPy runtime (same integers)")
    _add_common(p)
    return p


def _run_eval(args) -> int:
    from . import checkpoints
    from .evaluate import evaluate

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
    if args.checkpoint.endswith(".aqz"):
        ignored = [flag for flag, given in (("--model", args.model), ("--kind", args.kind), ("--bits", args.bits),
                                             ("--unsafe-load", args.unsafe_load),
                                             ("--device", args.device not in (None, "cpu"))) if given]
        if ignored:
            raise ValueError(f"{args.checkpoint} is an integer model that carries its own graph: "
                             f"{', '.join(ignored)} does not apply to it")
        return _eval_aqz(args)
    device = _device(args)
    options = {"bits": args.bits} if args.bits is not None else {}
    ckpt = checkpoints.load(args.checkpoint, args.model, kind=args.kind, unsafe=args.unsafe_load, **options)
    if args.bits is not None and ckpt.format != "apot":
        raise ValueError(f"--bits is the bit width of an APoT checkpoint; {args.checkpoint} is a {ckpt.format} "
                         "checkpoint (quantize it with `adderquant quantize --bits`)")
    dataset = _data(args)
    if args.model is not None and ckpt.name != args.model:
        raise ValueError(f"{args.checkpoint} holds a {ckpt.name}, not a {args.model}")
    if args.kind is not None and ckpt.kind != args.kind:
        raise ValueError(f"{args.checkpoint} holds a {ckpt.kind} model, not {args.kind}")
    if ckpt.num_classes != len(dataset.classes):
        raise ValueError(f"{args.checkpoint} has {ckpt.num_classes} classes but {dataset.name} has "
                         f"{len(dataset.classes)}")
    n = len(dataset.x_test) if args.limit is None else min(args.limit, len(dataset.x_test))
    model = ckpt.model.to(device)
    res = evaluate(model, dataset.x_test[:n], dataset.y_test[:n], ckpt.normalization,
                   batch_size=args.batch_size, device=device, progress=not args.json)
    payload = {**res.summary(), "model": ckpt.name, "kind": ckpt.kind, "format": ckpt.format,
               "checkpoint": args.checkpoint, "data": args.data, "dataset": dataset.name,
               "device": device, "normalization": ckpt.normalization}
    human = (f"{ckpt.name} ({ckpt.kind}, {ckpt.format}) on {dataset.name} test, {res.n} images: "
             f"top-1 {res.top1:.2f} %, top-5 {res.top5:.2f} % ({res.seconds:.1f} s)")
    _emit(args, payload, human)
    return 0


def _eval_aqz(args) -> int:
    """An exported integer model, run by the integer engine or the NumPy-only runtime (identical integers)."""
    from .integer import IntegerEngine, NumpyRuntime, evaluate_aqz

    runner = (IntegerEngine if args.runtime == "engine" else NumpyRuntime)(args.checkpoint)  # checked first
    dataset = _data(args)
    n = len(dataset.x_test) if args.limit is None else min(args.limit, len(dataset.x_test))
    res = evaluate_aqz(runner, dataset.x_test[:n].numpy(), dataset.y_test[:n].numpy(), batch_size=args.batch_size)
    payload = {**res, "format": "aqz", "runtime": args.runtime, "checkpoint": args.checkpoint, "data": args.data,
               "dataset": dataset.name, "device": "cpu"}
    human = (f"{args.checkpoint} (integer, {args.runtime} runtime) on {dataset.name} test, {res['n']} images: "
             f"top-1 {res['top1']:.2f} %, top-5 {res['top5']:.2f} % ({res['seconds']:.1f} s)")
    _emit(args, payload, human)
    return 0


# --------------------------------------------------------------------------------------------- models


def _add_models(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the registered models")
    p.add_argument("--kind", default=None, choices=("adder", "conv"),
                   help="every registered model exists in both kinds (conv: the CNN twin with identical shapes)")
    p.add_argument("--json", action="store_true", help="print the list as one JSON line")
    return p


def _run_models(args) -> int:
    from . import models

    kinds = [args.kind] if args.kind else ["adder", "conv"]
    rows = [{"name": n, "dataset": models.REGISTRY[n].dataset, "num_classes": models.REGISTRY[n].num_classes,
             "input_size": models.input_size(n), "kinds": kinds} for n in models.names()]
    human = "\n".join(f"{r['name']:<12} {r['dataset']:<9} {r['num_classes']:>5} classes  "
                      f"{r['input_size']}×{r['input_size']}  {' '.join(r['kinds'])}" for r in rows)
    _emit(args, {"models": rows}, human)
    return 0


# ------------------------------------------------------------------------------------------- quantize

def _add_quantize(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help="post-training quantization (optionally QAT) of an AdderNet",
                       description="Quantize with the paper's method (group-shared scales, lossless weight clamp, "
                                   "outlier clamp), 'ours-fast' (the paper's method on the unsigned grid for "
                                   "post-ReLU inputs, BatchNorm correction and range search as chosen per width on "
                                   "held-out training images), 'ours' (ours-fast plus learned rounding at the "
                                   "widths where held-out images chose it), 'authors' (their published code) or the "
                                   "QSSF baselines; evaluate paired with full precision.")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--checkpoint", default=None,
                   help=f"checkpoint (default: the official AdderNet ResNet-20 under ${CHECKPOINTS_ENV} "
                        "or ../shared/checkpoints)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--method", default="ours-fast", choices=METHODS,
                   help="ours-fast (default: the best preset without learned rounding, seconds), ours (the best "
                        "measured; learned rounding adds about 30-60 s for ResNet-20 on 2 CPU cores), paper, "
                        "authors, paper-unsigned, qssf …")
    p.add_argument("--groups", type=int, default=None, help="groups of output channels (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="outlier percentile α (default 0.999)")
    p.add_argument("--calib-size", type=int, default=1024, help="calibration images from the training split")
    p.add_argument("--bn-recalibration", type=int, default=None, metavar="N",
                   help="re-estimate BatchNorm statistics on N augmented calibration batches after quantizing "
                        "(default: 0 = off; 200 for --method authors)")
    p.add_argument("--bn-correction", default=None, choices=("mean", "mean_var"),
                   help="correct the float model's BatchNorm statistics for the quantization shift (any method)")
    p.add_argument("--range-search", action="store_true", default=None,
                   help="choose each adder layer's activation range by output MSE (any method on the uniform grid)")
    p.add_argument("--range-search-scope", default=None, choices=RANGE_SEARCH_SCOPES,
                   help="one activation range per adder layer, per weight group, or groups formed by the search "
                        "(regroup) (ours: as chosen per width)")
    p.add_argument("--range-search-metric", default=None, choices=RANGE_SEARCH_METRICS,
                   help="what scores a candidate range: the layer's output mse, the mse less each channel's mean "
                        "error (centered), the mse weighted by each element's effect on the prediction (fisher), "
                        "or the whole model's KL from the float one (kl: minutes)")
    p.add_argument("--learned-rounding", type=int, default=None, metavar="N",
                   help="learn the adder weights' rounding, N iterations per block (any method; ours: 200 where "
                        "chosen)")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the calibration images")
    p.add_argument("--quantize-first-last", action="store_true",
                   help="first and last layers at 8 bits (implied by --export)")
    p.add_argument("--qat-epochs", type=int, default=0, help="quantization-aware training epochs (paper: 50)")
    p.add_argument("--qat-lr", type=float, default=None, help="QAT learning rate (default: the recipe's, 3e-4)")
    p.add_argument("--qat-limit-train", type=int, default=None, help="QAT on the first N training images")
    p.add_argument("--qat-clip-grad-norm", type=float, default=None,
                   help="cap the total gradient norm in QAT (not in the paper, not needed with latent weights)")
    p.add_argument("--qat-literal", action="store_true",
                   help="the paper's literal QAT: train the clamped weights (no STE through the fold, which the "
                        "unsigned grid needs; see docs/quantization.md)")
    p.add_argument("--qat-distill", type=float, default=None, metavar="ALPHA",
                   help="weight of distillation from the full-precision model in the QAT loss (0: off)")
    p.add_argument("--qat-temperature", type=float, default=None, help="distillation temperature")
    p.add_argument("--qat-schedule", choices=("epoch", "step"), default=None,
                   help="cosine learning-rate decay stepped per epoch or per batch")
    p.add_argument("--qat-bn-reestimate", type=int, default=None, metavar="N",
                   help="exact BatchNorm statistics on N training batches after QAT")
    p.add_argument("--qat-freeze-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorms keep the PTQ model's running statistics during QAT, their affine parameters "
                        "train (default: on; --no-qat-freeze-bn trains them on batch statistics)")
    p.add_argument("--qat-range-lr", type=float, default=None, metavar="LR",
                   help="learn the shared ranges (LSQ) at this learning rate (default: the recipe's)")
    p.add_argument("--qat-holdout", type=int, default=None, metavar="N",
                   help="hold N training images out of QAT and score them after every epoch")
    p.add_argument("--qat-keep-best", action="store_true",
                   help="return the state (the PTQ start included) that scored best on the --qat-holdout images")
    p.add_argument("--qat-checkpoint", default=None, metavar="FILE",
                   help="write the QAT state to FILE after every epoch (atomic)")
    p.add_argument("--qat-resume", action="store_true", help="continue QAT from --qat-checkpoint")
    p.add_argument("--qat-log", default=None, metavar="FILE", help="append one JSON line per QAT epoch to FILE")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test images")
    p.add_argument("--export", default=None, help="write the integer model to FILE.aqz (first/last layers at 8 bits)")
    p.add_argument("--save", default=None, help="append the JSON result to this JSON-lines file")
    _add_common(p)
    return p


def _checkpoint_or_default(args) -> str:
    path = args.checkpoint or find_official_addernet()
    if path is None:
        raise FileNotFoundError(f"no checkpoint given: pass --checkpoint or set {CHECKPOINTS_ENV}")
    return path


def _quantize_run(args):
    """The run's configs from the flags, every check done before any work."""
    from .quant import preset
    from .quant.qat import QATConfig, check_qat_files
    from .workflows import PTQRun

    _device(args)
    overrides = {k: v for k, v in {"groups": args.groups, "alpha": args.alpha,
                                   "bn_recalibration": args.bn_recalibration, "bn_correction": args.bn_correction,
                                   "range_search": args.range_search, "range_search_scope": args.range_search_scope,
                                   "range_search_metric": args.range_search_metric,
                                   "learned_rounding": args.learned_rounding}.items() if v is not None}
    if args.quantize_first_last or args.export:
        overrides["quantize_first_last"] = True
    config = preset(args.method, args.bits, **overrides)
    if args.export and config.bits > 8:
        raise ValueError(f"--export: the integer path takes adder layers of ≤ 8 bits, got --bits {config.bits}")
    if args.qat_epochs < 0:
        raise ValueError(f"--qat-epochs must be ≥ 0, got {args.qat_epochs}")
    if args.qat_limit_train is not None and args.qat_limit_train < 2:
        raise ValueError(f"--qat-limit-train must be ≥ 2 images, got {args.qat_limit_train}")
    qat = None
    if args.qat_epochs:
        recipe = {k: v for k, v in {"distill": args.qat_distill, "temperature": args.qat_temperature,
                                    "schedule": args.qat_schedule, "bn_reestimate": args.qat_bn_reestimate,
                                    "holdout": args.qat_holdout, "range_lr": args.qat_range_lr,
                                    "freeze_bn": args.qat_freeze_bn, "lr": args.qat_lr}.items()
                  if v is not None}
        qat = QATConfig(epochs=args.qat_epochs, limit_train=args.qat_limit_train,
                        eval_limit=args.limit, clip_grad_norm=args.qat_clip_grad_norm, latent=not args.qat_literal,
                        checkpoint=args.qat_checkpoint, resume=args.qat_resume, log_path=args.qat_log,
                        keep_best=args.qat_keep_best, **recipe)
        check_qat_files(qat)
    elif args.qat_resume or args.qat_checkpoint or args.qat_keep_best:
        raise ValueError("--qat-checkpoint/--qat-resume/--qat-keep-best need --qat-epochs")
    for path in (args.export, args.save, args.qat_checkpoint, args.qat_log):
        _check_writable(path)
    return PTQRun(quant=config, calib_size=args.calib_size, seed=args.seed, limit=args.limit, qat=qat,
                  device=args.device)


def _check_writable(path: str | None) -> None:
    """Refuse an output path that cannot be written, before the work whose result it would hold."""
    if path is None:
        return
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path} is a directory, not a file to write")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PermissionError(f"cannot write {path}: permission denied")


def _load_adder_checkpoint(path: str, model: str | None):
    """The checkpoint at ``path`` if it holds an AdderNet, else one line saying what it is and which
    command takes it — before any data is read."""
    from .checkpoints import load
    from .checkpoints.apot import APoTBitsMissing

    try:
        ckpt = load(path, model)
    except APoTBitsMissing:
        raise ValueError(f"{path} is a quantized APoT checkpoint (a CNN), and `adderquant quantize` quantizes "
                         f"AdderNets: evaluate it with `adderquant eval --checkpoint {path} --bits 4` (its width), "
                         "or train APoT stages with `adderquant apot-qat`") from None
    if ckpt.kind != "adder":
        raise ValueError(f"{path} holds a CNN ({ckpt.format} checkpoint of {ckpt.name}), and `adderquant quantize` "
                         "quantizes AdderNets (adder layers): for CNNs use `adderquant apot-qat`")
    return ckpt


def _run_quantize(args) -> int:
    from .quant.ptq import check_adder_model
    from .workflows import ptq_run

    run = _quantize_run(args)
    path = _checkpoint_or_default(args)
    ckpt = _load_adder_checkpoint(path, args.model)
    check_adder_model(ckpt.model, run.quant)  # e.g. --groups beyond a layer's channels, before any work
    dataset = _data(args)
    report = ptq_run(ckpt, dataset, run, progress=not args.json)
    summary = {**report.summary, "kind": ckpt.kind, "checkpoint": path, "data": args.data, "dataset": dataset.name}
    human = (f"{summary['model']} {summary['method']} {summary['bits']}-bit on {dataset.name} test "
             f"({summary['n']} images): top-1 {summary['top1']:.2f} % (FP {summary['fp_top1']:.2f} %, "
             f"{summary['delta']:+.2f}; {summary['changed']} predictions changed) in {summary['seconds']:.1f} s")
    if not args.json:  # the result is on screen before any file is written
        print(human, flush=True)
    if args.export:
        from .integer import export
        from .utils import progress_bar

        for _ in progress_bar([args.export], "export", not args.json, unit="file"):  # a stage line in logs
            summary["export"] = str(export(report.quant, args.export, name=ckpt.name,
                                           normalization=ckpt.normalization,
                                           meta={k: summary[k] for k in ("method", "bits", "top1", "n")}))
        if not args.json:
            print(f"wrote {summary['export']}", flush=True)
    if args.save:
        with open(args.save, "a") as fh:
            fh.write(json_dumps(summary, default=str) + "\n")
    if args.json:
        _emit(args, summary, human)
    return 0


# --------------------------------------------------------------------------------------------- energy


def _add_energy(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("energy", help="operation counts and energy: CNN vs AdderNet vs quantized AdderNet",
                       description="Per-image operation and energy account (Horowitz 45 nm by default).")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--bits", type=int, nargs="+", default=None, help="bit widths (default 8 6 5 4)")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--first-last-bits", type=int, default=None, help="first/last layers quantized to this width")
    p.add_argument("--acc-bits", default="32", help="accumulator width: a number or 'auto' (no-overflow width)")
    p.add_argument("--table", default=None, help="JSON file replacing entries of the energy table")
    p.add_argument("--plot", default=None, help="draw accuracy vs energy to this PNG (needs --accuracies)")
    p.add_argument("--accuracies", default=None, help="results JSON (lines) from `adderquant quantize --save`")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (the last line)")
    return p


def _run_energy(args) -> int:
    from .analysis.energy_report import energy_command

    acc_bits = args.acc_bits if args.acc_bits == "auto" else int(args.acc_bits)
    text, data = energy_command(args.model, args.bits, plot_path=args.plot,
                                accuracies_json=args.accuracies, groups=args.groups,
                                first_last_bits=args.first_last_bits, acc_bits=acc_bits, energy_table=args.table)
    _emit(args, data, text)
    return 0


# -------------------------------------------------------------------------------------------- apot-qat


def _add_apot_qat(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("apot-qat", help="APoT quantization-aware training with progressive initialisation",
                       description="Train a CNN through an APoT schedule (e.g. fp32 → 4 → 3 → 2 bits), each stage "
                                   "starting from the previous one; saves one checkpoint per stage.")
    p.add_argument("--checkpoint", required=True, help="full-precision CNN (the APoT fp32 file or our conv twin)")
    p.add_argument("--model", default=None)
    p.add_argument("--schedule", type=int, nargs="+", default=[4, 3, 2], help="bit widths (32 = float stage)")
    p.add_argument("--epochs-per-stage", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.04)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=None, help="stop each stage after N steps (smoke runs)")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N training images")
    p.add_argument("--out", default="runs/apot", help="directory for apot-<b>bit.safetensors/.json")
    _add_common(p)
    return p


def _run_apot_qat(args) -> int:
    from dataclasses import replace

    from . import checkpoints
    from .quant.apot_qat import apot_progressive_qat

    device = _device(args)
    ckpt = checkpoints.load(args.checkpoint, args.model, kind="conv")
    if ckpt.kind != "conv":
        raise ValueError(f"{args.checkpoint} holds an AdderNet ({ckpt.format} checkpoint of {ckpt.name}), and "
                         "`adderquant apot-qat` trains CNNs (APoT): quantize AdderNets with `adderquant quantize`")
    dataset = _data(args)
    if args.limit_train:
        dataset = replace(dataset, x_train=dataset.x_train[: args.limit_train],
                          y_train=dataset.y_train[: args.limit_train])
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    stages = apot_progressive_qat(ckpt.model.to(device), dataset, schedule=args.schedule,
                                  epochs_per_stage=args.epochs_per_stage, lr=args.lr, norm=ckpt.normalization,
                                  log=log, batch_size=args.batch_size, max_steps=args.max_steps)
    rows = []
    for bits, stage in stages.items():
        path = checkpoints.save(stage.model, f"{args.out}/apot-{bits}bit", name=ckpt.name, kind="conv",
                               num_classes=ckpt.num_classes, normalization=ckpt.normalization,
                               apot_bits=None if bits == 32 else bits, accuracy=stage.top1, source=args.checkpoint)
        rows.append({"bits": bits, "top1": stage.top1, "checkpoint": str(path)})
    human = "\n".join(f"{r['bits']:>2} bits: top-1 {r['top1']:.2f} %  → {r['checkpoint']}" for r in rows)
    _emit(args, {"stages": rows, "data": args.data, "dataset": dataset.name}, human)
    return 0


# --------------------------------------------------------------------------------------------- report


def _add_report(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="reports: `report ranges` = per-channel weight vs activation ranges + plots")
    p.add_argument("what", choices=("ranges",))
    p.add_argument("--checkpoint", default=None, help="default: the official AdderNet ResNet-20")
    p.add_argument("--layer", default=None, help="layer to plot (default layer1.1.conv2, the paper's Figure 2)")
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--alpha", type=float, default=0.999)
    p.add_argument("--out", default="runs/report", help="directory for ranges.json/.txt and the PNGs")
    p.add_argument("--prefix", default="", help="prefix of the file names written into --out")
    _add_common(p)
    return p


def _run_report(args) -> int:
    from .analysis.ranges import report_ranges

    device = _device(args)
    path = _checkpoint_or_default(args)
    result = report_ranges(path, _data(args), args.out, layer=args.layer, calib_size=args.calib_size,
                           alpha=args.alpha, progress=not args.json, prefix=args.prefix, device=device)
    result["data"] = args.data
    _emit(args, result, f"wrote the range report for {path} into {args.out}")
    return 0


# ------------------------------------------------------------------------------------------- registry

# (build the parser, run it): append a pair to add a command.
COMMANDS: list[tuple[Callable, Callable[[argparse.Namespace], int]]] = [
    (_add_train, _run_train),
    (_add_eval, _run_eval),
    (_add_models, _run_models),
    (_add_quantize, _run_quantize),
    (_add_energy, _run_energy),
    (_add_apot_qat, _run_apot_qat),
    (_add_report, _run_report),
]


# What the library raises for bad input (values, types, files, ops the integer path cannot lower).
USER_ERRORS = (ValueError, TypeError, OSError, NotImplementedError, OverflowError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="adderquant",
        description="AdderNets and their low-bit quantization: train, evaluate, quantize, measure.")
    parser.add_argument("--version", action="version", version=f"adderquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add, run in COMMANDS:
        add(sub).set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # the reader went away (`adderquant models | head`): nothing left to say
        sys.stderr.close()
        return 0
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the API wrote
        print(f"adderquant {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"adderquant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
