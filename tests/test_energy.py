"""Operation counts, Proposition 2 / Table 4, energy table and reports (``adderquant.analysis``: counting,
energy, energy_report)."""

from __future__ import annotations

import json
import math

import pytest
from torch import nn

from adderquant.analysis.counting import count_model, count_named
from adderquant.analysis.energy import (
    EnergyTable,
    accumulator_bits,
    energy,
    group_overhead_ratio,
    proposition2_ratio,
    resolve_apot_terms,
    tally,
    tally_flops,
)
from adderquant.analysis.energy_report import energy_command, load_accuracies, model_report, variant_row
from adderquant.nn import AdderConv2d

# -- per-layer counts, by hand --------------------------------------------------------------------


def test_conv_layer_counts_by_hand():
    # 3 → 4 channels, 3×3, padding 1 on 5×5: 4·5·5 = 100 outputs, K = 3·3·3 = 27 terms each
    c = count_model(nn.Conv2d(3, 4, 3, padding=1, bias=False), (1, 3, 5, 5))
    (lc,) = c.layers
    assert (lc.type, lc.role, lc.in_elems, lc.out_elems, lc.fan_in, lc.weight_elems) == (
        "conv", "first", 75, 100, 27, 108)
    assert lc.raw_ops() == {"mult": 2700, "add": 2600}
    assert lc.macs == 2700 and lc.flops() == 5300


def test_conv_bias_stride_and_linear_by_hand():
    # 2 → 3, 3×3, stride 2, no padding on 7×7: 3×3 output, 27 outputs, K = 18; bias: one more add each
    c = count_model(nn.Conv2d(2, 3, 3, stride=2), (1, 2, 7, 7))
    assert c.layers[0].raw_ops() == {"mult": 27 * 18, "add": 27 * 17 + 27}
    lin = count_model(nn.Linear(10, 4), (1, 10)).layers[0]
    assert lin.raw_ops() == {"mult": 40, "add": 4 * 9 + 4} and lin.macs == 40


def test_adder_layer_counts_by_hand():
    c = count_model(AdderConv2d(3, 4, 3, padding=1), (1, 3, 5, 5), mark_first_last=False)
    (lc,) = c.layers
    assert lc.type == "adder" and lc.role == "body"
    # per output: K subtractions, K absolute values, K − 1 accumulations
    assert lc.raw_ops() == {"sub": 2700, "abs": 2700, "add": 2600}
    assert lc.flops() == 5300 and lc.flops(count_abs=True) == 8000


def test_bn_relu_pool_residual_counts():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                          nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
    c = count_model(model, (1, 1, 4, 4))
    ops = {lc.type: lc.raw_ops() for lc in c.layers}
    assert ops["bn"] == {"mult": 32, "add": 32} and ops["relu"] == {"cmp": 32}
    assert ops["maxpool"] == {"cmp": 3 * 8}  # 2·2·2 outputs, window 4
    assert ops["avgpool"] == {"add": 3 * 2, "mult": 2}  # 2×2 → 1×1 per channel
    assert c.layers[1].source == 0  # the BatchNorm reads the convolution's output
    rn = count_named("resnet20", "adder")
    adds = [lc for lc in rn.layers if lc.type == "add"]
    assert len(adds) == 9 and sum(lc.out_elems for lc in adds) == 3 * (16384 + 8192 + 4096)


def test_resnet20_macs_and_twins():
    conv, adder = count_named("resnet20", "conv"), count_named("resnet20", "adder")
    # 40.55 M for the 3×3 layers and the head (the commonly quoted "41 M") + 2 × 131072 for the two
    # 1×1 down-sampling shortcuts of the AdderNet layout
    assert conv.macs == adder.macs == 40_813_184
    assert adder.totals()["adder_macs"] == 40_813_184 - 27 * 16384 - 640
    roles = [lc.role for lc in conv.weight_layers()]
    assert roles[0] == "first" and roles[-1] == "last" and set(roles[1:-1]) == {"body"}
    assert conv.params == 270_896


# -- Proposition 2 and Table 4 -----------------------------------------------------------------------


@pytest.mark.parametrize("c,g", [(16, 2), (32, 4), (64, 8), (7, 3)])
def test_group_overhead_closed_form_matches_explicit_count(c, g):
    layer = count_model(AdderConv2d(c, c, 3, padding=1), (1, c, 6, 6), mark_first_last=False)
    one = tally_flops(tally(layer, 4, groups=1))
    grouped = tally_flops(tally(layer, 4, groups=g))
    assert grouped / one - 1 == pytest.approx(group_overhead_ratio(c, g), rel=1e-12)
    assert one == (2 * 9 * c + 1) * c * 36  # 2K + 1 FLOPs per output element


def test_proposition2_closed_form():
    for c in (16, 32, 64, 256):
        assert proposition2_ratio(c, 4) == pytest.approx(1 / (6 * c + 1), rel=1e-12)
        # our count differs from the paper's form by O(1/c²): same "≈ 1/(6c+1)"
        assert group_overhead_ratio(c, 4) == pytest.approx(1 / (6 * c + 1), rel=1 / c)


def test_table4_relative_flops():
    # the paper prints three decimals: agreement to half a unit of the last digit (5e-4) is exact
    # agreement with the printed table
    for g, paper in ((1, 1.0), (2, 1.002), (4, 1.005), (8, 1.012)):
        ours = 1 + group_overhead_ratio(32, g)
        assert abs(ours - paper) <= 5e-4 and round(ours, 3) == paper


# -- energy table ------------------------------------------------------------------------------------


def test_scaling_rules():
    t = EnergyTable()
    assert t.add(8) == 0.03 and t.add(16) == 0.05 and t.add(32) == 0.1 and t.mult(32) == 3.1
    for b in (2, 4, 5, 6):  # below the 8-bit anchor: add ∝ b, mult ∝ b²
        assert t.add(b) == pytest.approx(0.03 * b / 8) and t.mult(b) == pytest.approx(0.2 * (b / 8) ** 2)
    widths = range(1, 65)
    adds, mults = [t.add(b) for b in widths], [t.mult(b) for b in widths]
    assert all(a < b for a, b in zip(adds, adds[1:], strict=False))  # monotone across anchors
    assert all(a < b for a, b in zip(mults, mults[1:], strict=False))
    assert t.add(12) == pytest.approx(0.03 * (0.05 / 0.03) ** math.log2(12 / 8))  # log-log interpolation
    assert t.add(64) == pytest.approx(0.2)
    assert t.add(32, "fp") == 0.9 and t.mult(16, "fp") == 1.1
    with pytest.raises(ValueError, match="floating-point"):
        t.add(8, "fp")
    assert t.op("int4_abs") == 0.0 and t.op("fp32_cmp") == 0.9
    assert t.memory_pj_per_bit == pytest.approx(100 / 64)


def test_energy_table_json_round_trip_and_errors(tmp_path):
    custom = EnergyTable(int_add={4: 0.01, 8: 0.03}, memory_level="dram", abs_cost=0.5)
    path = tmp_path / "table.json"
    custom.to_json(path)
    assert EnergyTable.from_json(path) == custom
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"fp_mult": {"32": 4.0, "16": 1.0}}))
    t = EnergyTable.from_json(partial)
    assert t.mult(32, "fp") == 4.0 and t.int_add == EnergyTable().int_add
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"int_adds": {"8": 0.03}}))
    with pytest.raises(ValueError, match=r"unknown energy-table key\(s\) \['int_adds'\]"):
        EnergyTable.from_json(bad)
    with pytest.raises(ValueError, match="memory_level"):
        EnergyTable(memory_level="l2")


def test_energy_prices_a_tally():
    counts = {"ops": {"body": {"int4_add": 1000, "int32_add": 10}, "scales": {"fp32_mult": 2}},
              "memory_bits": {"weights": 640}}
    e = energy(counts)
    assert e["pJ"] == pytest.approx({"int4_add": 15.0, "int32_add": 1.0, "fp32_mult": 7.4})
    assert e["compute_uJ"] == pytest.approx(23.4e-6) and e["memory_uJ"] == pytest.approx(1000e-6)
    assert e["total_uJ"] == pytest.approx(e["compute_uJ"] + e["memory_uJ"])
    assert energy({"fp32_add": 10})["compute_uJ"] == pytest.approx(9e-6)


def test_accumulator_width():
    assert accumulator_bits("adder", 4, 144, "auto") == 4 + 1 + 8
    assert accumulator_bits("conv", 4, 144, "auto") == 8 + 8
    assert accumulator_bits("adder", 4, 144, 32) == 32
    with pytest.raises(ValueError):
        accumulator_bits("adder", 4, 144, "wide")


# -- reports -----------------------------------------------------------------------------------------


def test_model_report_resnet20():
    rows = model_report("resnet20", (32, 4), apot_terms=2)
    by = {r["label"]: r for r in rows}
    assert set(by) == {"CNN FP32", "CNN int4", "CNN APoT 4b (2 terms)", "AdderNet FP32", "AdderNet int4 g=4"}
    cnn, adder = by["CNN FP32"], by["AdderNet FP32"]
    assert cnn["ratio_vs_cnn_fp32"] == 1.0
    # body: M MACs, O outputs: CNN 3.7·M + 0.9·(M − O) pJ; adder 0.9·M (|x − w|) + 0.9·(M − O)
    body = [lc for lc in count_named("resnet20", "adder").layers if lc.role == "body"]
    m, o = sum(lc.macs for lc in body), sum(lc.out_elems for lc in body)
    assert cnn["parts_uJ"]["body"] == pytest.approx((3.7 * m + 0.9 * (m - o)) * 1e-6, rel=1e-12)
    assert adder["parts_uJ"]["body"] == pytest.approx((0.9 * m + 0.9 * (m - o)) * 1e-6, rel=1e-12)
    q = by["AdderNet int4 g=4"]
    assert q["ops"]["body"]["int4_add"] == 40_370_176 and q["groups"] == 4
    assert q["total_uJ"] < adder["total_uJ"] < cnn["total_uJ"]
    auto = variant_row("resnet20", "adder", "paper", 4, acc_bits="auto")
    assert auto["parts_uJ"]["body"] < q["parts_uJ"]["body"]


def test_energy_command_and_plot(tmp_path):
    acc = tmp_path / "results.jsonl"
    recs = [{"kind": "conv", "method": "fp32", "bits": 32, "top1": 68.0},
            {"kind": "conv", "method": "brecq", "bits": 4, "top1": 66.0},
            {"kind": "adder", "method": "fp32", "bits": 32, "top1": 67.6},
            {"kind": "adder", "method": "paper", "bits": 8, "top1": 67.58},
            {"kind": "adder", "method": "paper", "bits": 4, "top1": 67.35},
            {"kind": "adder", "method": "qssf-w", "bits": 4, "top1": 64.61},
            {"kind": "adder", "method": "paper", "bits": 4, "top1": 60.0, "model": "resnet32"}]
    acc.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    png = tmp_path / "fig6.png"
    text, data = energy_command("resnet20", [8, 4], plot_path=png, accuracies_json=acc)
    assert "AdderNet int4 g=4" in text and "67.35" in text and "× CNN FP32" in text
    assert len(data["points"]) == 6  # the resnet32 record is skipped
    qssf = next(p for p in data["points"] if p["method"] == "qssf-w")
    assert qssf["groups"] == 1 and qssf["label"] == "AdderNet int4 g=1"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text2, data2 = energy_command("resnet20", [4])
    assert text2.splitlines()[2].startswith("CNN FP32") and "points" not in data2
    assert json.loads(json.dumps(data2))["rows"][0]["label"] == "CNN FP32"  # JSON-able as it is
    with pytest.raises(ValueError, match="--plot needs --accuracies"):
        energy_command("resnet20", [4], plot_path=png)


def test_load_accuracies_formats(tmp_path):
    rec = {"kind": "adder", "method": "paper", "bits": 4, "top1": 67.35}
    for i, text in enumerate((json.dumps([rec, rec]), json.dumps({"results": [rec, rec]}),
                              json.dumps(rec) + "\n" + json.dumps(rec) + "\n")):
        p = tmp_path / f"a{i}.json"
        p.write_text(text)
        assert load_accuracies(p) == [rec, rec]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"kind": "adder", "bits": 4}]))
    with pytest.raises(ValueError, match="lacks"):
        load_accuracies(p)


def test_apot_terms_and_tally():
    assert resolve_apot_terms(2)(4) == 2.0
    assert resolve_apot_terms(lambda b: [0, 1, 2, 1])(4) == 2.0  # per-level counts → worst case
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                          nn.Conv2d(4, 2, 1, bias=False))
    c = count_model(model, (1, 3, 5, 5))
    body = tally(c, 4, apot_terms=2)["ops"]["body"]  # middle layer: 100 outputs, K = 36
    assert body == {"int8_shift": 2 * 3600, "int8_add": 3600, "int32_add": 3500}
    assert tally(c, 4)["ops"]["body"] == {"int4_mult": 3600, "int32_add": 3500}
