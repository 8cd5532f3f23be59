"""The README's performance section is generated from committed benchmark results and kept in step."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "perf_tables.py"


def _module():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling docblocks, as when it is run
    spec = importlib.util.spec_from_file_location("perf_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_and_performance_md_match_the_committed_results():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_results_render_with_their_ratios():
    """The GPU section is rendered from bench_gpu.py's JSON fields (no GPU result is committed yet)."""
    layer = {"layer": "16->16 3x3 @32x32", "batch": 256, "fwd_T_mac_per_s": {"triton": 11.5},
             "fwd_ms": {"triton": 0.5, "conv_tf32": 0.1}, "fwd_bwd_ms": {"reference": 20.0, "triton": 0.4},
             "fwd_bwd_peak_mb": {"triton": 30.2, "conv_tf32": 25.0},
             "int8_T_byteops_per_s": {"fp32": 14.0, "int32": 6.0, "vabsdiff4": 41.3}}
    epoch = {"kind": "adder", "backend": "triton", "extrapolated": False, "epoch_s": 4.2, "ms_per_step": 21.4}
    text = _module().gpu_section({"device": "NVIDIA H100", "layers": [layer], "epoch": [epoch]})
    row = next(line for line in text.splitlines() if line.startswith("| 16->16"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["16->16 3x3 @32x32", "11.50", "5.00×", "50.00×",
                                                              "30 / 25", "41.3"]
    assert "| adder / triton | 4.2 | 21.4 |" in text and "NVIDIA H100, batch 256" in text


def test_readme_markers_are_required():
    import pytest

    with pytest.raises(SystemExit, match="markers"):
        _module().readme_with("# no markers here", "block")


def test_readme_ptq_table_and_presets_md_match_the_committed_results():
    script = ROOT / "scripts" / "ptq_presets.py"
    result = subprocess.run([sys.executable, str(script), "--markdown-only", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_qat_table_matches_the_committed_runs():
    script = ROOT / "scripts" / "qat_table.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
