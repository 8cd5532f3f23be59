"""Model registry and checkpoints: shapes, the official AdderNet format, safetensors round trips."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from adderquant import checkpoints, models
from adderquant.nn import AdderConv2d


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56", "vgg_small"])
def test_cifar_models_run_and_twins_share_shapes(name):
    adder, conv = models.create(name, kind="adder"), models.create(name, kind="conv")
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert shapes(adder) == shapes(conv)
    with torch.no_grad():
        assert adder.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    layers = [m for m in adder.modules() if isinstance(m, (nn.Conv2d, nn.Linear, AdderConv2d))]
    assert not isinstance(layers[0], AdderConv2d) and not isinstance(layers[-1], AdderConv2d)
    assert not any(isinstance(m, AdderConv2d) for m in conv.modules())


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_imagenet_models_build_on_meta(name, blocks):
    with torch.device("meta"):
        m = models.create(name, num_classes=1000).eval()
        y = m(torch.empty(1, 3, 224, 224))
    assert y.shape == (1, 1000)
    assert sum(1 for n, _ in m.named_modules() if n.count(".") == 1 and n.startswith("layer")) == blocks


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.create("resnet21")
    with pytest.raises(ValueError, match="kind"):
        models.create("resnet20", kind="shift")


def test_official_checkpoint_is_detected_and_mapped(official_addernet):
    ck = checkpoints.load(official_addernet)
    assert (ck.name, ck.kind, ck.num_classes, ck.format) == ("resnet20", "adder", 10, "addernet-official")
    raw = torch.load(official_addernet, map_location="cpu", weights_only=True)
    assert torch.equal(ck.model.layer2[0].downsample[0].weight,
                       raw["module.layer2.0.downsample.0.adder"])
    assert ck.normalization == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def test_official_format_is_recognised_on_synthetic_state(tmp_path):
    model = models.create("resnet20")
    state = {"module." + (k[:-7] + ".adder" if k.endswith(".weight") and "conv" in k and "layer" in k
                          or k.endswith("downsample.0.weight") else k): v for k, v in model.state_dict().items()}
    path = tmp_path / "official.pth"
    torch.save(state, path)
    ck = checkpoints.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)


def test_mismatch_names_missing_and_unexpected_keys(tmp_path):
    state = models.create("resnet20").state_dict()
    state = {("module." + k).replace("layer1.0.conv1.weight", "layer1.0.conv1.adder"): v for k, v in state.items()}
    del state["module.layer3.2.bn2.running_var"]
    state["module.extra.adder"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        checkpoints.load(path)
    assert "layer3.2.bn2.running_var" in str(err.value) and "extra.weight" in str(err.value)


def test_untrusted_pickles_need_opt_in(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": models.create("resnet20").state_dict(), "note": ValueError("a pickled object")}, path)
    with pytest.raises(ValueError, match="unsafe"):
        checkpoints.load(path, "resnet20", kind="adder")
    assert checkpoints.load(path, "resnet20", kind="adder", unsafe=True).format == "state_dict"


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_broken_files_are_never_offered_unsafe_loading(tmp_path, damage):
    """A damaged file is reported as damaged; only a sound pickle of foreign objects mentions the opt-in."""
    path = tmp_path / "model.pth"
    torch.save(models.create("resnet20").state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(ValueError, match="damaged or not a PyTorch checkpoint") as err:
        checkpoints.load(path, "resnet20", kind="adder")
    assert "unsafe" not in str(err.value)


def test_broken_adderquant_checkpoints_fail_in_one_line(tmp_path):
    model = models.create("resnet20")
    path = checkpoints.save(model, tmp_path / "m", name="resnet20", kind="adder", num_classes=10,
                            normalization=((0.5,) * 3, (0.25,) * 3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged or not a safetensors file"):
        checkpoints.load(path)
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps({"kind": "adder"}))
    with pytest.raises(ValueError, match="lacks"):
        checkpoints.load(path)
    with pytest.raises(TypeError, match="str or os.PathLike"):
        checkpoints.load(None)


def test_save_load_round_trip_with_metadata(tmp_path):
    model = models.create("resnet20", kind="conv", head="linear")
    norm = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    path = checkpoints.save(model, tmp_path / "run" / "model", name="resnet20", kind="conv", num_classes=10,
                           normalization=norm, accuracy=12.5, train_args={"epochs": 1})
    assert path.name == "model.safetensors" and (tmp_path / "run" / "model.json").exists()
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["accuracy"] == 12.5 and info["head"] == "linear"
    ck = checkpoints.load(path)
    assert ck.normalization == norm and ck.meta["train_args"] == {"epochs": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    model = models.create("resnet20")
    target = tmp_path / "m"
    checkpoints.save(model, target, name="resnet20", kind="adder", num_classes=10, normalization=((0,), (1,)))
    before = (tmp_path / "m.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.core, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(model, target, name="resnet20", kind="adder", num_classes=10, normalization=((0,), (1,)))
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.safetensors"]


def test_adder_shapes_are_read_off_the_model():
    from adderquant.models import adder_shapes

    shapes = adder_shapes("resnet20")
    got = {(s.c_in, s.size, s.c_out, s.kernel, s.stride, s.padding) for s in shapes}
    assert len(shapes) == len(got) == 7
    assert got == {(16, 32, 16, 3, 1, 1), (16, 32, 32, 3, 2, 1), (16, 32, 32, 1, 2, 0), (32, 16, 32, 3, 1, 1),
                   (32, 16, 64, 3, 2, 1), (32, 16, 64, 1, 2, 0), (64, 8, 64, 3, 1, 1)}
    assert shapes[0].label == "16->16 3x3 @32x32"
