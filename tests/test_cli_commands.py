"""The quantize, energy and apot-qat commands end to end (small slices of the real data)."""

from __future__ import annotations

import importlib
import json

import pytest

from adderquant.cli import main


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_quantize_json_reports_paired_deltas(official_addernet, cifar_subset, capsys, tmp_path):
    save = tmp_path / "results.jsonl"
    rc = main(["quantize", "--checkpoint", str(official_addernet), "--data", str(cifar_subset), "--bits", "8",
               "--limit", "100", "--calib-size", "64", "--save", str(save), "--json"])
    out = _last_json(capsys)
    assert rc == 0
    for key in ("fp_top1", "top1", "n", "bits", "method", "groups", "calib_size", "seconds", "changed", "delta"):
        assert key in out
    assert out["n"] == 100 and out["bits"] == 8 and out["calib_size"] == 64
    assert abs(out["delta"]) <= 3.0  # 8-bit stays near full precision
    assert json.loads(save.read_text().splitlines()[-1])["top1"] == out["top1"]


def test_quantize_with_qat_reports_where_it_started(official_addernet, cifar_subset, capsys):
    rc = main(["quantize", "--checkpoint", str(official_addernet), "--data", str(cifar_subset), "--bits", "4",
               "--qat-epochs", "1", "--qat-limit-train", "64", "--limit", "50", "--calib-size", "32", "--json"])
    out = _last_json(capsys)
    assert rc == 0 and out["qat_epochs"] == 1 and 0 <= out["ptq_top1"] <= 100
    (epoch,) = out["qat_log"]
    assert epoch["test_n"] == 50 and epoch["test_top1"] == out["top1"]  # the final model is the one QAT left


def test_quantize_with_learned_ranges_logs_how_far_they_moved(official_addernet, cifar_subset, capsys, tmp_path):
    path = tmp_path / "m.aqz"
    rc = main(["quantize", "--checkpoint", str(official_addernet), "--data", str(cifar_subset), "--bits", "4",
               "--qat-epochs", "1", "--qat-limit-train", "64", "--qat-range-lr", "100", "--limit", "20",
               "--calib-size", "32", "--export", str(path), "--json"])
    (epoch,) = _last_json(capsys)["qat_log"]
    lo, hi = epoch["range_ratio"]
    assert rc == 0 and lo <= 1.0 <= hi and lo < hi and path.exists()  # learned ranges, folded and exported


def test_quantize_qssf_reports_the_chosen_variant(official_addernet, cifar_subset, capsys):
    rc = main(["quantize", "--checkpoint", str(official_addernet), "--data", str(cifar_subset), "--bits", "4",
               "--method", "qssf", "--limit", "50", "--calib-size", "32", "--json"])
    out = _last_json(capsys)
    assert rc == 0 and out["method"] in ("qssf (qssf-w)", "qssf (qssf-a)")
    assert set(out["qssf_calibration_scores"]) == {"qssf-w", "qssf-a"}


def test_energy_command_json(capsys):
    assert main(["energy", "--model", "resnet20", "--bits", "8", "4", "--json"]) == 0
    out = _last_json(capsys)
    names = [r["variant"] if "variant" in r else r.get("name") for r in out["rows"]]
    assert len(names) >= 4


def test_energy_plot_needs_accuracies(capsys, tmp_path):
    assert main(["energy", "--plot", str(tmp_path / "x.png")]) == 2
    assert "accuracies" in capsys.readouterr().err


def test_apot_qat_stage_saves_and_reloads(checkpoints_root, cifar_subset, capsys, tmp_path):
    fp32 = checkpoints_root / "apot-resnet20-cifar10-fp32.pth.tar"
    if not fp32.exists():
        pytest.skip(f"{fp32} absent")
    rc = main(["apot-qat", "--checkpoint", str(fp32), "--data", str(cifar_subset), "--schedule", "4",
               "--epochs-per-stage", "1", "--max-steps", "1", "--limit-train", "64", "--batch-size", "32",
               "--out", str(tmp_path), "--json"])
    out = _last_json(capsys)
    assert rc == 0 and out["stages"][0]["bits"] == 4
    rc = main(["eval", "--checkpoint", out["stages"][0]["checkpoint"], "--data", str(cifar_subset), "--limit", "64",
               "--json"])
    assert rc == 0 and _last_json(capsys)["format"] == "adderquant"


def test_export_then_eval_with_both_integer_runtimes(official_addernet, cifar_subset, capsys, tmp_path):
    aqz = tmp_path / "r20w4.aqz"
    rc = main(["quantize", "--checkpoint", str(official_addernet), "--data", str(cifar_subset), "--bits", "4",
               "--quantize-first-last", "--limit", "40", "--calib-size", "64", "--export", str(aqz), "--json"])
    assert rc == 0 and aqz.exists()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(aqz), "--data", str(cifar_subset), "--limit", "40", "--json"]) == 0
    out = _last_json(capsys)
    assert out["format"] == "aqz" and out["runtime"] == "engine" and out["n"] == 40 and 50 < out["top1"] <= 100
    assert main(["eval", "--checkpoint", str(aqz), "--data", str(cifar_subset), "--limit", "40", "--json",
                 "--runtime", "numpy"]) == 0
    out_numpy = _last_json(capsys)
    assert out_numpy["runtime"] == "numpy" and (out_numpy["top1"], out_numpy["top5"]) == (out["top1"], out["top5"])
    blob = bytearray(aqz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    aqz.write_bytes(bytes(blob))
    assert main(["eval", "--checkpoint", str(aqz), "--data", str(cifar_subset), "--limit", "4"]) == 2
    assert "checksum" in capsys.readouterr().err


def test_report_ranges_writes_plots(official_addernet, cifar_subset, capsys, tmp_path):
    rc = main(["report", "ranges", "--checkpoint", str(official_addernet), "--data", str(cifar_subset),
               "--calib-size", "16", "--out", str(tmp_path), "--json"])
    assert rc == 0
    stats = _last_json(capsys)["stats"]["layer1.1.conv2"]
    assert stats["r_x"] > 0 and len(stats["w_max"] if "w_max" in stats else stats["group_weight_max"]) > 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"ranges.json", "ranges.txt", "ranges_layer1_1_conv2.png", "distributions_layer1_1_conv2.png"} <= names


def test_quantize_export_needs_no_other_flag(official_addernet, cifar_subset, capsys, tmp_path):
    """An export implies 8-bit first/last layers; the file runs on the integer engine with the same top-1."""
    path = tmp_path / "m.aqz"
    rc = main(["quantize", "--checkpoint", str(official_addernet), "--data", str(cifar_subset), "--limit", "40",
               "--calib-size", "32", "--export", str(path), "--json"])
    out = _last_json(capsys)
    assert rc == 0 and path.exists() and out["config"]["quantize_first_last"] is True
    assert main(["eval", "--checkpoint", str(path), "--data", str(cifar_subset), "--limit", "40", "--json"]) == 0
    # the integers equal the float64 fake-quant model; the float32 one that quantize evaluates may differ
    # on an image whose top logits its rounding swaps (docs/results/integer_exactness.md): at most one here
    assert abs(_last_json(capsys)["top1"] - out["top1"]) <= 100 / 40


@pytest.mark.parametrize(("extra", "message"), [
    (["--bits", "9", "--export", "{tmp}/m.aqz"], "≤ 8 bits"),
    (["--export", "{tmp}"], "is a directory"),
    (["--export", "{tmp}/missing/m.aqz"], "does not exist"),
    (["--bits", "1"], "bits must be in 2..16"),
    (["--method", "qssf", "--groups", "2"], "QSSF .* takes no groups"),
    (["--qat-epochs", "1", "--qat-limit-train", "0"], "qat-limit-train"),
    (["--qat-epochs", "1", "--qat-lr", "nan"], "lr must be a finite number"),
    (["--qat-epochs", "1", "--qat-range-lr", "-1"], "range_lr must be a finite number ≥ 0"),
    (["--qat-epochs", "1", "--qat-range-lr", "1", "--qat-literal"], "learnable ranges .* need latent weights"),
    (["--qat-epochs", "1", "--qat-keep-best"], "keep_best .* needs holdout"),
    (["--qat-keep-best"], "need --qat-epochs"),
])
def test_quantize_refuses_bad_flags_before_any_work(extra, message, capsys, tmp_path, monkeypatch):
    """These fail while building the configs: no checkpoint or data set is even read."""
    import re

    monkeypatch.setattr("adderquant.cli._data", lambda args: pytest.fail("data was loaded before the check"))
    argv = ["quantize", "--checkpoint", str(tmp_path / "never-read.pth")] + [a.format(tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_eval_refuses_flags_that_do_not_apply(official_addernet, cifar_subset, capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(official_addernet), "--data", str(cifar_subset), "--bits", "4"]) == 2
    assert "APoT" in capsys.readouterr().err
    fake = tmp_path / "m.aqz"
    fake.write_bytes(b"x")
    assert main(["eval", "--checkpoint", str(fake), "--data", str(cifar_subset), "--model", "resnet20"]) == 2
    assert "--model does not apply" in capsys.readouterr().err


def test_models_lists_both_kinds(capsys):
    assert main(["models", "--kind", "conv", "--json"]) == 0
    assert all(r["kinds"] == ["conv"] for r in _last_json(capsys)["models"])


@pytest.mark.parametrize(("flags", "freeze_bn", "lr"), [
    ([], True, 3e-4),  # the recipe's defaults (frozen BatchNorms, chosen on held-out images)
    (["--no-qat-freeze-bn", "--qat-lr", "1e-4"], False, 1e-4),  # the recipe the earlier QAT runs used
    (["--qat-freeze-bn"], True, 3e-4),
])
def test_quantize_qat_recipe_flags_reach_the_config(flags, freeze_bn, lr, monkeypatch, tmp_path, capsys):
    seen = []

    def stop(config):
        seen.append(config)
        raise ValueError("stopped after building the QAT config")

    monkeypatch.setattr(importlib.import_module("adderquant.quant.qat"), "check_qat_files", stop)
    assert main(["quantize", "--checkpoint", str(tmp_path / "never-read.pth"), "--qat-epochs", "1"] + flags) == 2
    (config,) = seen
    assert config.freeze_bn is freeze_bn and config.lr == lr
