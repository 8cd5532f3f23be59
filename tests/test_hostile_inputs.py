"""Issue 13, robustness: every bad input ends in one clear line and exit code 2 (no traceback, no
silent wrong result, no file left behind), calibration streams any iterable in bounded memory, and
progress output suits a terminal and a log alike."""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import adderquant
from adderquant.cli import COMMANDS, main
from adderquant.quant import QuantConfig, calibrate, quantize
from adderquant.quant.observers import percentile_index
from adderquant.utils import atomic_write, json_dumps, progress_bar
from test_cli import _error

README = Path(__file__).resolve().parents[1] / "README.md"


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def small_adder():
    from adderquant.models.resnet_cifar import CifarResNet

    torch.manual_seed(0)
    return CifarResNet(8).eval()


def _calib(n=40, seed=1):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- 1. streaming, bounded calibration


def _all_inputs(model, calib):
    """Brute force: every |input| value of every adder layer, kept whole."""
    from adderquant.nn import AdderConv2d
    from adderquant.utils import hooked

    seen = {}
    adders = {n: m for n, m in model.named_modules() if isinstance(m, AdderConv2d)}
    with hooked(model, adders, lambda n, _m, inp: seen.setdefault(n, []).append(inp[0].abs().flatten())), \
            torch.no_grad():
        model(calib)
    return {n: torch.cat(v) for n, v in seen.items()}


def test_a_long_generator_is_calibrated_exactly_in_bounded_memory(small_adder):
    calib = _calib(200)
    config = QuantConfig.paper(4, alpha=0.999)
    cap = 2000  # values kept per layer, far fewer than the layers see (up to 200·16·8·8 = 204,800)
    batches = (calib[i : i + 2] for i in range(0, 200, 2))  # 100 batches, length unknown
    obs = calibrate(small_adder, batches, config, max_kept=cap)
    exact = _all_inputs(small_adder, calib)
    for name, o in obs.items():
        assert o._top.numel() <= cap
        assert o.count == exact[name].numel() > 20 * cap // 2
        want = float(torch.sort(exact[name]).values[percentile_index(o.count, 0.999)])
        assert o.percentile() == want and o.max == float(exact[name].max())


def test_a_generator_past_what_it_keeps_is_refused_not_approximated(small_adder):
    batches = (_calib(2, seed=s) for s in range(50))
    with pytest.raises(ValueError, match="exact 0.999 percentile .* pass fewer images"):
        calibrate(small_adder, batches, QuantConfig.paper(4), max_kept=10)


def test_a_dataloader_gives_the_tensor_result_and_keeps_what_the_tensor_path_keeps(small_adder):
    calib = _calib(40)
    loader = DataLoader(TensorDataset(calib, torch.zeros(40)), batch_size=7)
    for config in (QuantConfig.paper(4), QuantConfig.ours_fast(4)):
        a, b = quantize(small_adder, calib, config), quantize(small_adder, loader, config)
        assert [v["r_x"] for v in a.layers.values()] == [v["r_x"] for v in b.layers.values()]
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)  # BN correction on the same 40 images
    by_tensor = calibrate(small_adder, calib, QuantConfig.paper(4))
    by_loader = calibrate(small_adder, loader, QuantConfig.paper(4))
    for name in by_tensor:
        assert by_loader[name]._top.numel() == by_tensor[name]._top.numel()  # the sampler's length bounds n


def test_quantize_keeps_only_the_first_images_of_an_iterable_for_whole_tensor_steps(small_adder):
    batches = (_calib(4, seed=s) for s in range(25))  # 100 images, one pass
    with pytest.warns(UserWarning, match=r"BN correction used the first 16 of the 100 .*tensor_images=16"):
        result = quantize(small_adder, batches, QuantConfig.paper_unsigned(4, bn_correction="mean"), tensor_images=16)
    assert result.layers


def test_range_search_keeps_its_own_images_of_an_iterable_and_the_warning_names_that_bound(small_adder):
    batches = (_calib(4, seed=s) for s in range(25))
    config = QuantConfig.paper_unsigned(4, bn_correction="mean", range_search=True, range_search_images=32)
    with pytest.warns(UserWarning, match=r"first 32 of the 100 .*range_search_images=32"):
        quantize(small_adder, batches, config, tensor_images=16)


@pytest.mark.parametrize("bad, message", [
    (lambda c: (c * 40).to(torch.uint8), "uint8, .*normalise them first"),
    (lambda c: c.double(), "float64 but the model computes in torch.float32"),
    (lambda c: c[0], "4-D"),
    (lambda c: c.permute(0, 2, 3, 1).contiguous()[..., :3].reshape(40, 8, 3, 8), "3 channels|channels"),
    (lambda c: c.permute(0, 2, 3, 1), "channels last"),
    (lambda c: c[:, :1], "1 channels, the model's first layer takes 3"),
    (lambda c: c[:0], "no images"),
    (lambda c: c.numpy(), "NumPy array"),
    (lambda c: "images.npz", "got str"),
    (lambda c: [c[:4], c[:4, :1]], "calibration batch 2 have 1 channels"),
    (lambda c: [c[:4], c[:4].numpy()], "calibration batch 2 must be tensors"),
])
def test_calibration_images_the_model_cannot_take_are_refused_in_one_line(small_adder, bad, message):
    with pytest.raises((TypeError, ValueError), match=message) as info:
        quantize(small_adder, bad(_calib(40)), QuantConfig.paper(4))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- 2. progress


def test_the_library_shows_no_progress_unless_asked(small_adder, capsys):
    from adderquant.evaluate import evaluate

    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    evaluate(small_adder, x, torch.zeros(6, dtype=torch.long), ((0.5,) * 3, (0.25,) * 3), batch_size=2)
    quantize(small_adder, _calib(8), QuantConfig.ours_fast(4))
    assert capsys.readouterr().err == ""


def test_progress_in_a_log_is_one_line_per_stage_without_carriage_returns(small_adder, capsys):
    from adderquant.evaluate import evaluate

    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    evaluate(small_adder, x, torch.zeros(6, dtype=torch.long), ((0.5,) * 3, (0.25,) * 3), batch_size=2,
             progress=True)
    quantize(small_adder, _calib(8), QuantConfig.authors(4, bn_recalibration=2, bn_batch_size=4), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["eval", "calibrate", "BN re-estimation"]
    assert lines[0].startswith("eval: 3 batches in ")


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert isinstance(progress_bar(range(3), "x", True), tqdm)
    assert list(progress_bar(range(3), "x", False)) == [0, 1, 2]


def test_cli_training_log_has_no_carriage_returns(tiny_npz, tmp_path, capsys):
    rc = main(["train", "--model", "resnet20", "--data", str(tiny_npz), "--epochs", "1", "--batch-size", "8",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 0 and "\r" not in err and err.splitlines()[0].startswith("epoch 1/1: 2 batches in ")


# ------------------------------------------------------------------------- 3. one run per directory


def _train(tiny_npz, out, *extra):
    return main(["train", "--model", "resnet20", "--data", str(tiny_npz), "--epochs", "1", "--batch-size", "8",
                 "--out", str(out), "--json", *extra])


def test_a_second_training_into_a_locked_directory_is_refused(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it
        rc = _train(tiny_npz, out)
        err = _error(capsys)
    finally:
        os.close(fd)
    assert rc == 2 and "in use by another training run" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    assert _train(tiny_npz, out) == 0  # the lock is gone with its holder


def test_a_fresh_run_does_not_wipe_a_finished_one(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_npz, out) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = _train(tiny_npz, out)
    err = _error(capsys)
    assert rc == 2 and "holds a training run (last logged epoch 1)" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _train(tiny_npz, out, "--overwrite") == 0
    assert _train(tiny_npz, out, "--resume") == 0  # finished: nothing more to do, nothing lost
    assert (out / "log.jsonl").read_text().count("\n") == 1
    assert _train(tiny_npz, out, "--resume", "--overwrite") == 2
    assert "exclude each other" in _error(capsys)


# -------------------------------------------------------------------------------- 4. NaN and the logs


@pytest.mark.parametrize("flag", ["nan", "inf", "-1", "0"])
def test_a_non_finite_learning_rate_is_refused_before_any_work(tiny_npz, tmp_path, capsys, flag):
    rc = _train(tiny_npz, tmp_path / "run", "--lr", flag)
    assert rc == 2 and "lr must be a finite number" in _error(capsys)
    assert not (tmp_path / "run").exists()
    rc = main(["quantize", "--checkpoint", str(tmp_path / "absent.pth"), "--data", str(tiny_npz),
               "--qat-epochs", "1", "--qat-lr", flag])
    assert rc == 2 and "lr must be a finite number" in _error(capsys)  # before the checkpoint is looked for


def test_a_diverged_training_stops_and_its_log_holds_no_bare_nan(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _train(tiny_npz, out, "--lr", "1e30")
    err = _error(capsys)
    assert rc == 2 and "training diverged in epoch 1" in err and "nothing was saved" in err
    record = _strict_json((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["train_loss"] is None and record["lr"] == 1e30
    assert not (out / "state.pt").exists() and not (out / "checkpoint.safetensors").exists()


def test_json_output_maps_non_finite_numbers_to_null():
    text = json_dumps({"lr": float("nan"), "loss": [float("inf"), 1.5], "t": (float("-inf"),)})
    assert _strict_json(text) == {"lr": None, "loss": [None, 1.5], "t": [None]}
    from adderquant.cli import _emit, _jsonable

    class Args:
        json = True

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        _emit(Args(), {"x": torch.tensor([float("nan"), 2.0]), "y": float("nan")}, "")
    assert _strict_json(buf.getvalue()) == {"x": [None, 2.0], "y": None}
    assert _jsonable(torch.tensor(1.0)) == 1.0


# --------------------------------------------------------------------------- 5. groups: used or refused


def test_groups_beyond_a_layers_channels_are_refused_not_capped(capsys, official_addernet, tiny_npz):
    rc = main(["energy", "--groups", "1000"])
    assert rc == 2 and "groups=1000 but adder layer" in _error(capsys)
    rc = main(["quantize", "--checkpoint", str(official_addernet), "--data", str(tiny_npz / "absent"),
               "--groups", "1000"])
    err = _error(capsys)
    assert rc == 2 and "groups=1000 but adder layer layer1.0.conv1 has only 16 output channels" in err


# -------------------------------------------------------------- 6. energy reads what quantize --save wrote


def test_energy_plot_takes_the_records_quantize_saves(official_addernet, tiny_npz, tmp_path, capsys):
    saved = tmp_path / "R.jsonl"
    for bits in ("4", "8"):
        assert main(["quantize", "--checkpoint", str(official_addernet), "--data", str(tiny_npz), "--bits", bits,
                     "--calib-size", "8", "--limit", "4", "--save", str(saved), "--json"]) == 0
    records = [_strict_json(line) for line in saved.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["adder", "adder"]
    old = tmp_path / "old.jsonl"  # what --save wrote before it recorded the kind
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "kind"}) + "\n" for r in records))
    for path in (saved, old):
        capsys.readouterr()
        rc = main(["energy", "--plot", str(tmp_path / "p.png"), "--accuracies", str(path), "--json"])
        assert rc == 0, capsys.readouterr().err
        out = _strict_json(capsys.readouterr().out.splitlines()[-1])
        assert len(out["points"]) == 2 and (tmp_path / "p.png").stat().st_size > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"method": "apot", "bits": 4, "top1": 90}\n')
    assert main(["energy", "--plot", str(tmp_path / "q.png"), "--accuracies", str(bad)]) == 2
    assert "record 0 lacks ['kind']" in _error(capsys)


# ----------------------------------------------------------------- 7. checkpoints for another command


def test_an_apot_checkpoint_given_to_quantize_says_which_command_takes_it(checkpoints_root, tiny_npz, capsys):
    path = checkpoints_root / "apot-resnet20-cifar10-4bit.pth.tar"
    if not path.exists():
        pytest.skip(f"{path} absent")
    rc = main(["quantize", "--checkpoint", str(path), "--bits", "4", "--data", str(tiny_npz)])
    err = _error(capsys)
    assert rc == 2 and "adderquant eval --checkpoint" in err and "--bits 4" in err and "APoT" in err
    assert "pass it with --bits" not in err
    fp32 = checkpoints_root / "apot-resnet20-cifar10-fp32.pth.tar"
    if fp32.exists():
        rc = main(["quantize", "--checkpoint", str(fp32), "--data", str(tiny_npz / "absent")])
        assert rc == 2 and "holds a CNN" in _error(capsys)  # before the data are read


def test_apot_qat_on_an_addernet_is_one_clear_line(official_addernet, tiny_npz, capsys):
    rc = main(["apot-qat", "--checkpoint", str(official_addernet), "--data", str(tiny_npz / "absent")])
    err = _error(capsys)
    assert rc == 2 and "holds an AdderNet" in err and "adderquant quantize" in err


# ---------------------------------------------------------------------------------- 8. --device cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("argv", [
    ["train", "--model", "resnet20", "--epochs", "1"],
    ["eval", "--checkpoint", "absent.pth"],
    ["quantize", "--checkpoint", "absent.pth"],
    ["apot-qat", "--checkpoint", "absent.pth"],
    ["report", "ranges", "--checkpoint", "absent.pth"],
])
def test_cuda_without_cuda_is_refused_before_any_work(argv, tmp_path, capsys):
    rc = main([*argv, "--device", "cuda", "--data", str(tmp_path / "absent"), *(
        ["--out", str(tmp_path / "run")] if argv[0] in ("train", "report") else [])])
    assert rc == 2 and "CUDA is not available" in _error(capsys)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 9. registry and README


def test_models_kind_conv_and_every_command_in_the_readme_table(capsys):
    assert main(["models", "--kind", "conv", "--json"]) == 0
    rows = _strict_json(capsys.readouterr().out.splitlines()[-1])["models"]
    assert rows and all(r["kinds"] == ["conv"] for r in rows)
    table = [line for line in README.read_text().splitlines() if line.startswith("| `adderquant ")]
    documented = {re.match(r"\| `adderquant ([a-z-]+(?: ranges)?)", line).group(1) for line in table}
    commands = {add.__name__[len("_add_"):].replace("_", "-") for add, _ in COMMANDS}
    assert "report ranges" in documented
    assert {c.split()[0] for c in documented} == commands


# --------------------------------------------------------------------------------- 10. damaged files


def _shards(tmp_path, damage):
    root = tmp_path / "shards"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train-0", "test"):
        np.savez_compressed(root / f"{name}.npz", x=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
                            y=np.arange(12) % 10)
    (root / "meta.json").write_text(json.dumps({"classes": [str(i) for i in range(10)], "train": ["train-0.npz"],
                                                "test": ["test.npz"]}))
    shard = root / "train-0.npz"
    data = shard.read_bytes()
    shard.write_bytes(damage(data))
    return root


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b[:-30], lambda b: os.urandom(len(b)),
                                    lambda b: b[:30] + bytes(x ^ 0xFF for x in b[30:200]) + b[200:]])
def test_damaged_npz_shards_and_files_are_one_line(tiny_npz, tmp_path, capsys, damage):
    root = _shards(tmp_path, damage)
    rc = main(["train", "--model", "resnet20", "--epochs", "1", "--data", str(root), "--out", str(tmp_path / "r")])
    err = _error(capsys)
    assert rc == 2 and "train-0.npz" in err and "damaged" in err
    single = tmp_path / "single.npz"
    single.write_bytes(damage(tiny_npz.read_bytes()))
    rc = main(["eval", "--checkpoint", str(tmp_path / "x.pth"), "--data", str(single)])  # data read after
    assert rc == 2


def test_damaged_checkpoints_are_one_line_and_never_advise_unsafe_loading(official_addernet, tiny_npz, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    assert _train(tiny_npz, out) == 0
    capsys.readouterr()
    tensors = (out / "checkpoint.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(tensors[: len(tensors) // 2])
    (tmp_path / "cut.json").write_text((out / "checkpoint.json").read_text())
    sidecar = json.loads((out / "checkpoint.json").read_text())
    del sidecar["model"]
    (tmp_path / "nomodel.safetensors").write_bytes(tensors)
    (tmp_path / "nomodel.json").write_text(json.dumps(sidecar))
    pth = official_addernet.read_bytes()
    (tmp_path / "cut.pth").write_bytes(pth[: len(pth) // 2])
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    for name, message in [("cut.safetensors", "damaged or not a safetensors file"),
                          ("nomodel.safetensors", "lacks ['model']"),
                          ("cut.pth", "damaged or not a PyTorch checkpoint"),
                          ("random.pth", "damaged or not a PyTorch checkpoint")]:
        rc = main(["eval", "--checkpoint", str(tmp_path / name), "--data", str(tiny_npz)])
        err = _error(capsys)
        assert rc == 2 and message in err, (name, err)
        assert "unsafe" not in err and "weights_only" not in err
    with pytest.raises(TypeError, match="checkpoint path must be a str or os.PathLike, got NoneType"):
        adderquant.load_checkpoint(None)


def _aqz_bytes():
    from safetensors.numpy import save

    from adderquant.integer.runtime_numpy import GRAPH_FORMAT, pack_aqz

    graph = {"format": GRAPH_FORMAT, "input": {"name": "image", "dtype": "uint8", "shape": [None, 3, 8, 8]},
             "output": {"name": "image", "frac_bits": 0, "shape": [None, 3, 8, 8]}, "nodes": [], "meta": {}}
    return pack_aqz(graph, save({"t": np.zeros(2, np.int8)}))


@pytest.mark.parametrize("offset", range(8, 56))
def test_a_flipped_header_byte_of_an_aqz_reads_as_damage_not_a_version(tmp_path, capsys, offset):
    from adderquant.integer.runtime_numpy import parse_aqz

    data = bytearray(_aqz_bytes())
    parse_aqz(bytes(data))  # the intact file parses
    for flip in (0x01, 0x02, 0x80):
        bad = bytearray(data)
        bad[offset] ^= flip
        with pytest.raises(ValueError) as info:
            parse_aqz(bytes(bad), "f.aqz")
        msg = str(info.value)
        assert "unsupported format version" not in msg, msg
        assert ("corrupted" in msg or "checksum mismatch" in msg or "truncated" in msg), msg
    bad = bytearray(data)
    bad[8] ^= 0x02  # version 1 → 3: the most version-like damage
    path = tmp_path / "bad.aqz"
    path.write_bytes(bytes(bad))
    rc = main(["eval", "--checkpoint", str(path), "--data", str(tmp_path / "absent")])  # the file is read first
    err = _error(capsys)
    assert rc == 2 and "corrupted header" in err


# -------------------------------------------------------------------------------------------- 11. umask


def test_written_files_follow_the_umask(tmp_path, small_adder):
    from adderquant.integer.export import write_aqz
    from adderquant.integer.graph import IntegerGraph

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        adderquant.save_checkpoint(small_adder, tmp_path / "ck", name="resnet8", kind="adder", num_classes=10,
                                   normalization=((0.5,) * 3, (0.25,) * 3))
        write_aqz(IntegerGraph([], {"t": np.zeros(2, np.int8)}, {"name": "image", "dtype": "uint8", "shape": [None]},
                               {"name": "image", "frac_bits": 0, "shape": [None]}), tmp_path / "m.aqz")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    want = plain.stat().st_mode & 0o777
    assert want == 0o640
    for name in ("a.txt", "ck.safetensors", "ck.json", "m.aqz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_no_warnings_leak_from_a_tensor_calibration(small_adder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(small_adder, _calib(16), QuantConfig.ours_fast(4))
