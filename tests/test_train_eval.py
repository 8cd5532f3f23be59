"""evaluate / paired / train: correctness on tiny synthetic data, one short real training run.

The reference adder backward is slow on CPU (≈ 0.2–0.5 s per 32×32 image per step), so synthetic
runs use 8×8 images (the CIFAR ResNets pool adaptively) and the real run trains on 16 images.
"""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from adderquant import checkpoints
from adderquant.data import CIFAR_ADDERNET_NORM, Dataset, load_dataset, normalize
from adderquant.evaluate import EvalResult, evaluate, paired
from adderquant.models import create
from adderquant.train import TrainConfig, seed_everything, train


def _synthetic(n_train=16, n_test=8, size=8, seed=1) -> Dataset:
    g = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    return Dataset("synthetic", images(n_train), torch.arange(n_train) % 10, images(n_test),
                   torch.arange(n_test) % 10, [str(i) for i in range(10)], "memory")


def _tiny_config(out, **kw) -> TrainConfig:
    base = dict(model="resnet20", kind="adder", epochs=3, batch_size=8, padding=1, out_dir=str(out),
                progress=False)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- evaluate


def test_evaluate_matches_manual_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 7))
    model.train()  # evaluate must switch to eval mode and restore this
    x = torch.randint(0, 256, (53, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 7, (53,))
    norm = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    res = evaluate(model, x, y, norm, batch_size=10, progress=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(normalize(x, *norm))
    top5 = logits.topk(5, 1).indices
    assert res.n == 53
    assert torch.equal(res.predictions, logits.argmax(1))
    assert res.predictions.dtype == torch.int64
    assert res.top1 == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert res.top5 == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())
    assert res.seconds >= 0 and set(res.summary()) == {"top1", "top5", "n", "seconds"}


def test_evaluate_few_classes_and_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randint(0, 256, (6, 3, 2, 2), dtype=torch.uint8)
    res = evaluate(model, x, torch.zeros(6, dtype=torch.int64), ((0, 0, 0), (1, 1, 1)), progress=False)
    assert res.top5 == 100.0  # top-k capped at the class count
    with pytest.raises(TypeError):
        evaluate(model, x.float(), torch.zeros(6, dtype=torch.int64), ((0, 0, 0), (1, 1, 1)))
    with pytest.raises(ValueError):
        evaluate(model, x, torch.zeros(5, dtype=torch.int64), ((0, 0, 0), (1, 1, 1)))


def test_paired_counts():
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    a = EvalResult(50.0, 100.0, 6, torch.tensor([0, 1, 2, 9, 9, 9]), 0.0)  # right on 0, 1, 2
    b = EvalResult(50.0, 100.0, 6, torch.tensor([0, 7, 2, 3, 4, 8]), 0.0)  # right on 0, 2, 3, 4
    b.top1 = 100 * 4 / 6
    out = paired(a, b, y)
    assert out["right_to_wrong"] == 1  # image 1
    assert out["wrong_to_right"] == 2  # images 3, 4
    assert out["changed"] == 4  # images 1, 3, 4, 5 (5: wrong -> other wrong)
    assert out["delta"] == pytest.approx(100 * 4 / 6 - 50)
    assert out["n"] == 6
    with pytest.raises(ValueError):
        paired(a, EvalResult(0, 0, 5, torch.zeros(5, dtype=torch.int64), 0.0), y)


# ---------------------------------------------------------------------------------------------- train


def test_resume_gives_same_weights(tmp_path):
    ds = _synthetic()
    full = train(_tiny_config(tmp_path / "full"), ds)
    part = train(_tiny_config(tmp_path / "split", stop_after=2), ds)
    assert part["epochs_done"] == 2 and not part["finished"]
    rest = train(_tiny_config(tmp_path / "split", resume=True), ds)
    assert full["finished"] and rest["finished"] and rest["resumed_from"] == 2
    a = load_file(tmp_path / "full" / "checkpoint.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert [r["lr"] for r in log] == pytest.approx([0.1, 0.075, 0.025])
    # Resuming with a different recipe is refused.
    with pytest.raises(ValueError, match="different configuration"):
        train(_tiny_config(tmp_path / "split", resume=True, lr=0.05), ds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_path_world_of_one(tmp_path, monkeypatch):
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1",
                 "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    ds = _synthetic()
    # A time budget that one epoch already overruns: stops after the first of two epochs.
    out = train(_tiny_config(tmp_path, epochs=2, distributed=True, device="cpu", time_limit=1e-9), ds)
    assert out["world_size"] == 1 and out["epochs_done"] == 1 and not out["finished"]
    assert not torch.distributed.is_initialized()  # the group we opened is closed again
    assert (tmp_path / "checkpoint.safetensors").exists()


@pytest.mark.data
@pytest.mark.slow
def test_short_real_training_run(cifar_subset, tmp_path):
    """Adder ResNet-20, the full recipe, 3 steps on 16 real CIFAR-10 images: learns, logs, saves."""
    ds = load_dataset(cifar_subset)
    config = TrainConfig("resnet20", kind="adder", epochs=3, batch_size=16, limit_train=16, limit_test=16,
                         out_dir=str(tmp_path), seed=0, progress=False)
    x = normalize(ds.x_train[:16], *CIFAR_ADDERNET_NORM)
    y = ds.y_train[:16]

    def clean_loss(model):  # on the un-augmented images, batch statistics (running ones are barely set)
        model.train()
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    seed_everything(0)
    before = clean_loss(create("resnet20", kind="adder"))  # the same initial weights train() starts from
    result = train(config, ds)
    assert result["finished"] and result["epochs_done"] == 3

    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    for r in log:
        assert {"epoch", "lr", "train_loss", "train_acc", "test_top1", "seconds", "images_per_s"} <= set(r)
        assert math.isfinite(r["train_loss"]) and r["images_per_s"] > 0 and 0 <= r["test_top1"] <= 100

    ckpt = checkpoints.load(tmp_path / "checkpoint.safetensors")
    assert (ckpt.name, ckpt.kind, ckpt.num_classes, ckpt.format) == ("resnet20", "adder", 10, "adderquant")
    assert ckpt.meta["epoch"] == 3
    assert ckpt.normalization == CIFAR_ADDERNET_NORM
    after = clean_loss(ckpt.model)
    assert after < before, (before, after)
    assert (tmp_path / "state.pt").exists()
