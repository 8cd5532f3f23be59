"""Real multi-process training: two ranks with the gloo backend on localhost (``torch.multiprocessing``
spawn, the environment ``torchrun`` would set), through :func:`adderquant.train.train` itself.

A DDP step must be the single-process step of the same global batch: the adaptive adder scaling (η)
has to act on the all-reduced gradient, and each image must get the crop/flip it gets in the
single-process run. The model normalises with GroupNorm, not BatchNorm (per-rank batch statistics
are the one documented difference; PyTorch's SyncBatchNorm is GPU-only). Breaking either of the two
(η per rank, or per-rank crop draws) moves the weights by 0.1–0.2, far outside the tolerance.
Resuming under DDP must land on the same weights as the uninterrupted DDP run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

WORKER = textwrap.dedent('''
    import os
    import sys

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch import nn

    CREATED = []


    def build(num_classes, kind, **options):
        from adderquant.nn import AdderConv2d

        # GroupNorm, not BatchNorm: normalised per image, so the ranks' batches do not change it
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                              AdderConv2d(4, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
                              AdderConv2d(6, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, num_classes))
        CREATED.append(model)
        return model


    def weights(path):
        torch.save({k: v.detach().clone() for k, v in CREATED[-1].state_dict().items()}, path)


    def main(rank, world, port, data, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from adderquant import models
        from adderquant.data import load_dataset
        from adderquant.train import TrainConfig, train

        models.REGISTRY["tiny_adder"] = models.ModelSpec(build, "cifar", 10)
        ds = load_dataset(data)
        base = dict(model="tiny_adder", epochs=2, batch_size=8, lr=0.05, seed=3, limit_test=4, device="cpu")
        train(TrainConfig(**base, out_dir=f"{out}/ddp"), ds)
        weights(f"{out}/ddp-rank{rank}.pt")
        train(TrainConfig(**base, out_dir=f"{out}/resume", stop_after=1), ds)
        train(TrainConfig(**base, out_dir=f"{out}/resume", resume=True), ds)
        weights(f"{out}/resume-rank{rank}.pt")
        dist.barrier()
        if rank == 0:  # the same recipe in one process, the whole global batch per step
            train(TrainConfig(**base, out_dir=f"{out}/single", distributed=False), ds)
            weights(f"{out}/single.pt")
        dist.barrier()
        dist.destroy_process_group()


    if __name__ == "__main__":
        port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        mp.spawn(main, args=(2, port, data, out), nprocs=2, join=True)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    data = root / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8), y_train=np.arange(32) % 10,
             x_test=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), y_test=np.arange(4) % 10)
    script = root / "worker.py"
    script.write_text(WORKER)
    try:
        proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(data), str(root)],
                              capture_output=True, text=True, timeout=180, env={**_env(), "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("the two-rank run did not finish within 180 s")
    if proc.returncode != 0 and ("Address already in use" in proc.stderr or "EADDRINUSE" in proc.stderr):
        pytest.skip("could not bind a localhost port for the process group")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: torch.load(root / f"{name}.pt", weights_only=True)
            for name in ("ddp-rank0", "ddp-rank1", "resume-rank0", "resume-rank1", "single")}


def _env() -> dict:
    import os

    return dict(os.environ)


def test_both_ranks_hold_identical_parameters(ddp_run):
    a, b = ddp_run["ddp-rank0"], ddp_run["ddp-rank1"]
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_equals_single_process_training_of_the_global_batch(ddp_run):
    ddp, single = ddp_run["ddp-rank0"], ddp_run["single"]
    moved = 0.0
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
        moved += float((single[k] - ddp[k]).abs().max())
    assert moved < 1e-3


def test_resume_under_ddp_lands_on_the_uninterrupted_weights(ddp_run):
    for rank in (0, 1):
        done, resumed = ddp_run[f"ddp-rank{rank}"], ddp_run[f"resume-rank{rank}"]
        for k in done:
            torch.testing.assert_close(resumed[k], done[k], rtol=0, atol=0, msg=k)
