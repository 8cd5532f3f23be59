"""Training with the AdderNet recipe, resumable, single device or ``torchrun`` DDP.

Recipe (Chen et al., CVPR 2020, the authors' CIFAR script): SGD momentum 0.9, weight decay 5e-4 on
every parameter, global batch 256, learning rate ``lr · ½(1 + cos(π·epoch/epochs))`` stepped once per
epoch (lr 0.1: the authors' ``0.05·(1 + cos(π·epoch/400))``), adder weight gradients rescaled to norm
``η·sqrt(numel)`` with η = 0.2, random crop (4-pixel zero padding) + horizontal flip. The schedule is
:func:`adderquant.loop.cosine_schedule` and the steps run through :func:`adderquant.loop.sgd_epoch`.

Data stay in memory as uint8 tensors (on the GPU when there is one); augmentation and normalisation
run on the batch where it is. Each epoch is reproducible from ``(seed, epoch)`` alone: the shuffle
and augmentation generators are seeded from them, so a run resumed from ``state.pt`` ends with the
same weights as an uninterrupted one.

Files in ``out_dir``: ``log.jsonl`` (one JSON object per epoch), ``checkpoint.safetensors`` +
``checkpoint.json`` (:func:`adderquant.checkpoints.save`, loadable by ``adderquant eval``), and
``state.pt`` (model, optimizer, scheduler, epoch, RNG states; written atomically after the log line).

Multi-GPU: launch with ``torchrun --nproc-per-node G``; with ``WORLD_SIZE > 1`` the model is wrapped
in ``DistributedDataParallel``, each rank takes every G-th index of the epoch's permutation (padded
to equal length, as ``DistributedSampler`` does) and ``batch_size / G`` images per step, and only
rank 0 evaluates, logs and saves. A DDP step is the single-process step of the same global batch:

- the adaptive adder scaling (η) acts on the *all-reduced* gradient — inside the autograd backward it
  would see only this rank's gradient (DDP averages after the backward hooks), so under DDP the adder
  layers run with ``eta=None`` and an optimizer pre-step hook rescales the averaged gradient;
- the crop/flip parameters are drawn for the whole global batch on every rank (same seed), and each
  rank takes its own images' share, so an image is augmented as in the single-process run.

What still differs: BatchNorm normalises with each rank's batch statistics (PyTorch's SyncBatchNorm is
GPU-only; a model without BatchNorm trains identically), and a training set whose size is not a
multiple of G is padded with repeated images, as ``DistributedSampler`` does.

One run per ``out_dir`` at a time: the directory is locked (``flock`` on ``.lock``) while a run
writes into it, and a fresh run refuses a directory that holds another run's files unless told to
continue it (``resume``) or to replace it (``overwrite``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoints, models
from .data import CIFAR_ADDERNET_NORM, IMAGENET_NORM, Dataset, batches
from .data.augment import crop_flip as crop_flip_images
from .data.augment import crop_flip_params
from .evaluate import evaluate
from .loop import cosine_schedule, epoch_summary, sgd_epoch
from .nn import AdderConv2d
from .nn.functional import adaptive_scale
from .utils import atomic_write, json_dumps

LOG_NAME, STATE_NAME, CHECKPOINT_NAME, LOCK_NAME = "log.jsonl", "state.pt", "checkpoint", ".lock"

# Fields that define the optimisation trajectory: resuming with any of them changed is refused.
_RECIPE_FIELDS = ("model", "kind", "num_classes", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                  "eta", "seed", "amp", "limit_train", "normalization", "model_options", "padding")


@dataclass
class TrainConfig:
    model: str
    kind: str = "adder"
    num_classes: int | None = None  # default: the data set's class count
    epochs: int = 400
    batch_size: int = 256  # global: split over the ranks under DDP
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eta: float | None = 0.2  # AdderNet adaptive gradient scale of adder layers (None: off)
    seed: int = 0
    amp: bool = False  # bfloat16 autocast for the conventional layers; adder layers compute in fp32
    out_dir: str = "runs/train"
    limit_train: int | None = None  # first N training images only (tests, smoke runs)
    limit_test: int | None = None  # first N test images for the per-epoch evaluation
    eval_every: int = 1  # evaluate every k epochs (and always after the last)
    resume: bool = False  # continue from out_dir/state.pt when it exists
    overwrite: bool = False  # start over in an out_dir that holds another run's files (else refused)
    stop_after: int | None = None  # run at most this many epochs in this call (then resume later)
    time_limit: float | None = None  # seconds: stop after the epoch that would overrun this budget
    padding: int = 4  # random-crop padding
    normalization: tuple | None = None  # default: CIFAR_ADDERNET_NORM for CIFAR models
    model_options: dict = field(default_factory=dict)  # passed to models.create (e.g. head="linear")
    device: str | None = None  # default: cuda (this rank's GPU) if available, else cpu
    distributed: bool | None = None  # None: DDP when WORLD_SIZE > 1; True: DDP from the env even for 1
    progress: bool = False  # progress on stderr (adderquant.utils.progress_bar); the CLI turns it on

    def resolved_normalization(self) -> tuple:
        if self.normalization is not None:
            mean, std = self.normalization
            return tuple(mean), tuple(std)
        cifar = models.REGISTRY[self.model].dataset == "cifar" if self.model in models.REGISTRY else True
        return CIFAR_ADDERNET_NORM if cifar else IMAGENET_NORM


# --------------------------------------------------------------------------------------------- setup


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    ddp: bool = False  # wrap in DistributedDataParallel
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_world(config: TrainConfig) -> _World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = config.distributed if config.distributed is not None else size > 1
    if not wanted:
        return _World()
    if dist.is_initialized():
        owns = False
    else:
        on_gpu = torch.cuda.is_available() and str(config.device or "cuda").startswith("cuda")
        backend = "nccl" if on_gpu else "gloo"
        dist.init_process_group(backend=backend)  # MASTER_ADDR/PORT, RANK, WORLD_SIZE from torchrun
        owns = True
    return _World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True, owns)


def _device(config: TrainConfig, world: _World) -> torch.device:
    if config.device is not None and config.device != "cuda":
        return torch.device(config.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    if config.device == "cuda":
        raise ValueError("device cuda requested but CUDA is not available")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA too


def _epoch_generator(seed: int, epoch: int, stream: int, device: torch.device) -> torch.Generator:
    """Independent, reproducible random stream per (seed, epoch, purpose)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 101 + stream) % 2**63)
    return g


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so ``state.pt`` loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, cached], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a different GPU count: leave CUDA streams as seeded
            torch.cuda.set_rng_state_all(state["cuda"])


def _recipe(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["normalization"] = [list(v) for v in config.resolved_normalization()]
    return {k: d[k] for k in _RECIPE_FIELDS}


def _check_config(config: TrainConfig, dataset: Dataset) -> None:
    if config.model not in models.REGISTRY:
        raise ValueError(f"unknown model {config.model!r}; choose from {models.names()}")
    if config.epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {config.epochs}")
    for name in ("lr", "momentum", "weight_decay"):
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '≥ 0'}, got {value}")
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be ≥ 2 (BatchNorm), got {config.batch_size}")
    if config.eval_every < 1:
        raise ValueError(f"eval_every must be ≥ 1, got {config.eval_every}")
    if config.num_classes is not None and config.num_classes < len(dataset.classes):
        raise ValueError(f"num_classes={config.num_classes} but {dataset.name} has "
                         f"{len(dataset.classes)} classes")
    if config.limit_train is not None and config.limit_train < 2:
        raise ValueError(f"limit_train must be ≥ 2, got {config.limit_train}")
    if config.resume and config.overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in out_dir, or replace it")


# ---------------------------------------------------------------------------------------------- train


def _shard(n: int, epoch: int, config: TrainConfig, world: _World) -> torch.Tensor:
    """This rank's indices for ``epoch``: a seeded permutation, padded to a multiple of the world
    size and strided over the ranks (the ``DistributedSampler`` scheme)."""
    order = torch.randperm(n, generator=_epoch_generator(config.seed, epoch, 0, torch.device("cpu")))
    if world.size > 1:
        total = math.ceil(n / world.size) * world.size
        order = torch.cat([order, order[: total - n]])
        order = order[world.rank :: world.size]
    return order


def _global_crop_flip(padding: int, generator: torch.Generator, world: _World):
    """Crop + flip of this rank's share of a global batch: the parameters are drawn for all
    ``world.size`` ranks' images (the same draws on every rank) and rank r takes the r-th of every
    ``world.size`` — the positions its images hold in the global batch (:func:`_shard`). With one
    process this is exactly :func:`adderquant.data.random_crop_flip`."""
    def augment(xb: torch.Tensor, step: int) -> torch.Tensor:
        dy, dx, flips = crop_flip_params(len(xb) * world.size, padding, True, generator, xb.device)
        mine = slice(world.rank, None, world.size)
        return crop_flip_images(xb, dy[mine], dx[mine], flips[mine], padding)
    return augment


def _scale_after_all_reduce(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Under DDP: move the adaptive adder scaling from the autograd backward (where it would see this
    rank's gradient only) to an optimizer pre-step hook, which sees the all-reduced one. Returns a
    function that undoes it (the layers get their η back)."""
    etas = {m: m.eta for m in model.modules() if isinstance(m, AdderConv2d) and m.eta is not None}
    for m in etas:
        m.eta = None  # the backward leaves the gradient unscaled

    def pre_step(_optimizer, _args, _kwargs):
        for m, eta in etas.items():
            if m.weight.grad is not None:
                m.weight.grad = adaptive_scale(m.weight.grad, eta)

    handle = optimizer.register_step_pre_hook(pre_step)

    def undo():
        handle.remove()
        for m, eta in etas.items():
            m.eta = eta
    return undo


def _train_epoch(model, optimizer, x, y, epoch, config, world, device, norm) -> dict:
    idx = _shard(len(x), epoch, config, world).to(x.device)
    loader = batches(x[idx], y[idx], max(2, config.batch_size // world.size), shuffle=False, device=device)
    augment = _global_crop_flip(config.padding, _epoch_generator(config.seed, epoch, 1, device), world)
    stats = sgd_epoch(model, optimizer, loader, norm, augment=augment, amp=config.amp,
                      desc=f"epoch {epoch + 1}/{config.epochs}", progress=world.main and config.progress)
    totals = torch.stack([stats["loss_sum"], stats["correct"].double(),
                          torch.tensor(float(stats["images"]), device=device, dtype=torch.float64)])
    if world.size > 1:
        dist.all_reduce(totals)
    loss_total, correct_total, n_total = totals.tolist()
    return {**epoch_summary({"loss_sum": loss_total, "correct": correct_total, "images": int(n_total)}),
            "images": int(n_total)}


def _out_of_time(started: float, ran: int, limit: float, world: _World, device: torch.device) -> bool:
    """Would one more epoch (at the mean pace so far) overrun ``limit``? Rank 0 decides for all, so
    the ranks never disagree (a rank left waiting in a collective would hang)."""
    elapsed = time.perf_counter() - started
    stop = torch.tensor([elapsed + elapsed / ran > limit], dtype=torch.int32, device=device)
    if world.size > 1:
        dist.broadcast(stop, 0)
    return bool(stop.item())


def train(config: TrainConfig, dataset: Dataset) -> dict:
    """Train ``config.model`` on ``dataset``; returns a summary (also the last ``log.jsonl`` record).

    Raises ``ValueError`` for an inconsistent configuration, including resuming a run whose
    ``state.pt`` was written with a different recipe.
    """
    _check_config(config, dataset)
    world = _init_world(config)
    try:
        device = _device(config, world)
        lock = _claim_out_dir(config, world, device)
        try:
            return _train(config, dataset, world, device)
        finally:
            if lock is not None:
                os.close(lock)  # releases the flock; the (empty) lock file stays, see _claim_out_dir
    finally:
        if world.owns_group:
            dist.destroy_process_group()


_RUN_FILES = (LOG_NAME, STATE_NAME, CHECKPOINT_NAME + ".safetensors", CHECKPOINT_NAME + ".json")


def _claim_out_dir(config: TrainConfig, world: _World, device: torch.device) -> int | None:
    """Rank 0 locks ``out_dir`` for this run and checks what it holds; every rank learns the verdict
    (a rank left alone in a collective would hang). Returns the lock's file descriptor (rank 0).

    The lock is ``flock`` on ``out_dir/.lock``, released when the descriptor closes (also when the
    process dies). The file itself is left in place: deleting it on release would let a run that opened
    it just before lock a file no longer in the directory while a third run locks a new one."""
    fd, error = None, None
    if world.main:
        try:
            fd = _lock_and_check(config)
        except ValueError as err:
            error = err
    if world.size > 1:
        flag = torch.tensor([0 if error is None else 1], device=device)
        dist.all_reduce(flag)
        if int(flag.item()) and error is None:
            raise ValueError(f"rank 0 refused the output directory {config.out_dir} (its message says why)")
    if error is not None:
        raise error
    return fd


def _lock_and_check(config: TrainConfig) -> int:
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out} is in use by another training run (it holds the lock {out / LOCK_NAME}): "
                             "wait for that run to end, or choose another --out") from None
        present = [n for n in _RUN_FILES if (out / n).exists() and (n != LOG_NAME or (out / n).stat().st_size)]
        resumable = config.resume and (out / STATE_NAME).exists()
        if present and not resumable and not config.overwrite:
            hint = "--resume (resume=True) to continue it, " if (out / STATE_NAME).exists() else ""
            raise ValueError(f"{out} holds {_describe_run(out)} ({', '.join(present)}): pass {hint}--overwrite "
                             "(overwrite=True) to replace it, or choose another --out")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _describe_run(out: Path) -> str:
    """'a training run (last logged epoch 3)' from the log's last record, as far as it can be read."""
    try:
        lines = [line for line in (out / LOG_NAME).read_text().splitlines() if line.strip()]
        return f"a training run (last logged epoch {int(json.loads(lines[-1])['epoch'])})"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "a training run"


def _train(config: TrainConfig, dataset: Dataset, world: _World, device: torch.device) -> dict:
    norm = config.resolved_normalization()
    num_classes = config.num_classes or len(dataset.classes)
    out = Path(config.out_dir)
    log_path, state_path = out / LOG_NAME, out / STATE_NAME

    seed_everything(config.seed)
    model = models.create(config.model, num_classes=num_classes, kind=config.kind, **config.model_options)
    for m in model.modules():
        if isinstance(m, AdderConv2d):
            m.eta = config.eta
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.epochs)  # stepped once per epoch

    start_epoch = 0
    if config.resume and state_path.exists():
        try:  # tensors and plain values only: a planted pickle cannot run code
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot resume from {state_path}: not a training state written by adderquant "
                             f"({type(err).__name__}); remove it to start over") from err
        needed = {"recipe", "model", "optimizer", "scheduler", "rng", "epoch"}
        if not isinstance(state, dict) or not needed <= set(state):
            raise ValueError(f"cannot resume from {state_path}: not a training state written by adderquant "
                             "(keys missing); remove it to start over")
        if state["recipe"] != _recipe(config):
            diff = {k: (state["recipe"].get(k), v) for k, v in _recipe(config).items()
                    if state["recipe"].get(k) != v}
            raise ValueError(f"{state_path} was written with a different configuration (saved, now): {diff}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch = state["epoch"]
        if world.main and log_path.exists():  # drop records of an epoch that did not reach state.pt
            kept = [line for line in log_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] <= start_epoch]
            log_path.write_text("".join(line + "\n" for line in kept))
    elif world.main:  # a fresh run: the directory was clean, or overwrite was asked for
        log_path.write_text("")
        for name in (STATE_NAME, CHECKPOINT_NAME + ".safetensors", CHECKPOINT_NAME + ".json"):
            (out / name).unlink(missing_ok=True)

    core = model
    undo_scaling = None
    if world.ddp:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        undo_scaling = _scale_after_all_reduce(core, optimizer)  # η on the all-reduced gradient
    try:
        return _run_epochs(config, dataset, world, device, model, core, optimizer, scheduler, start_epoch,
                           out, norm, num_classes)
    finally:
        if undo_scaling is not None:
            undo_scaling()


def _run_epochs(config, dataset, world, device, model, core, optimizer, scheduler, start_epoch, out, norm,
                num_classes) -> dict:
    log_path, state_path = out / LOG_NAME, out / STATE_NAME

    n = len(dataset.x_train) if config.limit_train is None else min(config.limit_train, len(dataset.x_train))
    x_train, y_train = dataset.x_train[:n].to(device), dataset.y_train[:n].to(device)
    n_test = len(dataset.x_test) if config.limit_test is None else min(config.limit_test, len(dataset.x_test))
    x_test, y_test = dataset.x_test[:n_test], dataset.y_test[:n_test]

    record: dict = {}
    epoch, ran, started = start_epoch, 0, time.perf_counter()
    while epoch < config.epochs:
        if config.stop_after is not None and ran >= config.stop_after:
            break
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        stats = _train_epoch(model, optimizer, x_train, y_train, epoch, config, world, device, norm)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        scheduler.step()
        epoch += 1
        ran += 1
        top1 = eval_seconds = None
        if world.main and (epoch % config.eval_every == 0 or epoch == config.epochs) and n_test:
            res = evaluate(core, x_test, y_test, norm, device=device, progress=config.progress)
            top1, eval_seconds = res.top1, res.seconds
        record = {"epoch": epoch, "lr": lr, "train_loss": stats["train_loss"],
                  "train_acc": stats["train_acc"], "test_top1": top1, "seconds": seconds,
                  "images_per_s": stats["images"] / seconds,
                  "eval_seconds": eval_seconds, "n_train": n, "n_test": n_test}
        if not math.isfinite(stats["train_loss"]):  # the same all-reduced value on every rank
            if world.main:
                with log_path.open("a") as f:
                    f.write(json_dumps(record) + "\n")
            kept = f"{out} keeps epoch {epoch - 1}" if epoch > 1 else "nothing was saved"
            raise ValueError(f"training diverged in epoch {epoch}: the mean training loss is not finite (lr {lr:g}); "
                             f"{kept}; lower the learning rate and start over")
        if world.main:
            checkpoints.save(core, out / CHECKPOINT_NAME, name=config.model, kind=config.kind,
                            num_classes=num_classes, normalization=norm, epoch=epoch, test_top1=top1,
                            data=dataset.name, data_source=dataset.source, config=dataclasses.asdict(config))
            with log_path.open("a") as f:
                f.write(json_dumps(record) + "\n")  # NaN/inf (a diverged loss) as null
            state = {"epoch": epoch, "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": _rng_state(), "recipe": _recipe(config)}
            atomic_write(state_path, lambda tmp, state=state: torch.save(state, tmp))
        if world.size > 1:
            dist.barrier()
        if config.time_limit is not None and _out_of_time(started, ran, config.time_limit, world, device):
            break

    return {"epochs_done": epoch, "finished": epoch >= config.epochs, "resumed_from": start_epoch,
            "out_dir": str(out), "checkpoint": str(out / (CHECKPOINT_NAME + ".safetensors")),
            "log": str(log_path), "last": record, "model": config.model, "kind": config.kind,
            "rank": world.rank, "world_size": world.size}


__all__ = ["TrainConfig", "train", "seed_everything"]
