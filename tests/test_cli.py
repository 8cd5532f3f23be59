"""The ``adderquant`` command line: eval on the official checkpoint, a train → eval round trip on
tiny synthetic data, and the error paths (exit code 2, one line on stderr, no traceback)."""

from __future__ import annotations

import json

import pytest

from adderquant.cli import COMMANDS, main


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.data
@pytest.mark.slow
def test_eval_official_checkpoint_json(official_addernet, cifar_subset, capsys):
    rc = main(["eval", "--model", "resnet20", "--checkpoint", str(official_addernet),
               "--data", str(cifar_subset), "--limit", "200", "--json"])
    assert rc == 0
    out = _last_json(capsys)
    assert {"top1", "top5", "n", "model", "checkpoint", "data", "seconds", "format"} <= set(out)
    assert out["n"] == 200 and out["model"] == "resnet20" and out["format"] == "addernet-official"
    assert out["top1"] > 80 and out["top5"] >= out["top1"]


def test_train_then_eval_round_trip(tiny_npz, tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc = main(["train", "--model", "resnet20", "--kind", "adder", "--data", str(tiny_npz), "--epochs", "1",
               "--batch-size", "8", "--out", str(out_dir), "--json"])
    assert rc == 0
    trained = _last_json(capsys)
    assert trained["finished"] and trained["epochs_done"] == 1
    assert (out_dir / "log.jsonl").read_text().count("\n") == 1
    rc = main(["eval", "--checkpoint", trained["checkpoint"], "--data", str(tiny_npz),
               "--limit", "4", "--json"])
    assert rc == 0
    ev = _last_json(capsys)
    assert ev["n"] == 4 and ev["format"] == "adderquant" and ev["model"] == "resnet20"


def test_data_from_environment(tiny_npz, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADDERQUANT_DATA", str(tmp_path / "missing"))
    rc = main(["train", "--model", "resnet20", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert rc == 2 and "does not exist" in _error(capsys)
    monkeypatch.delenv("ADDERQUANT_DATA")
    rc = main(["train", "--model", "resnet20", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert rc == 2 and "ADDERQUANT_DATA" in _error(capsys)


def test_eval_error_paths(tiny_npz, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ADDERQUANT_DATA", raising=False)
    rc = main(["eval", "--checkpoint", str(tmp_path / "nope.pth"), "--data", str(tiny_npz)])
    assert rc == 2 and "checkpoint not found" in _error(capsys)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    rc = main(["eval", "--checkpoint", str(garbage), "--data", str(tiny_npz)])
    err = _error(capsys)
    assert rc == 2 and "damaged or not a PyTorch checkpoint" in err
    assert "unsafe" not in err and "weights_only" not in err  # never advised for a broken file


def test_eval_mismatched_and_missing_data(official_addernet, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ADDERQUANT_DATA", raising=False)
    rc = main(["eval", "--model", "resnet32", "--checkpoint", str(official_addernet),
               "--data", str(tmp_path)])
    assert rc == 2 and "does not match" in _error(capsys)
    rc = main(["eval", "--checkpoint", str(official_addernet), "--data", str(tmp_path / "missing")])
    assert rc == 2 and "does not exist" in _error(capsys)
    rc = main(["eval", "--checkpoint", str(official_addernet)])
    assert rc == 2 and "ADDERQUANT_DATA" in _error(capsys)


def test_models_and_help(capsys):
    assert main(["models", "--json"]) == 0
    names = [m["name"] for m in _last_json(capsys)["models"]]
    assert "resnet20" in names and "vgg_small" in names
    assert main([]) == 0
    assert "eval" in capsys.readouterr().out


def test_commands_are_pairs():
    names = []
    for add, run in COMMANDS:
        assert add.__name__.startswith("_add_") and run.__name__ == "_run_" + add.__name__[len("_add_"):]
        names.append(add.__name__[len("_add_"):])
    assert {"train", "eval", "models"} <= set(names)
