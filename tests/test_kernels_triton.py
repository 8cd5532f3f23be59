"""The ``triton`` adder backend against the float64 reference: Triton's CPU interpreter here, CUDA when present.

Why a child process: ``TRITON_INTERPRET`` must be set before triton builds the kernels, i.e. before
``adderquant`` is first imported — and in a pytest run other test modules import it earlier in the
same process (setting the variable here and reloading modules would also leak the interpreter into
them). So one child, this file run as a script with ``ADDERQUANT_TRITON_INTERPRET=1`` and
``TRITON_INTERPRET=1`` in its environment, runs every comparison and writes one JSON record per
(case, op); the parametrised tests below assert on those records. A second, smaller child turns
autotuning on so that every GPU tile config runs once through the interpreter.

Checked: forward (fp32; fp16/bf16 inputs), input gradient (both clamp forms), weight gradient, the
autograd path of ``adder_conv2d``, and the int8 forward in every mode (fp32-exact, int32, vabsdiff4
emulated) on int8 and uint8 activations including −128/127/0/255 — exact. Shapes are tiny (the
interpreter is slow) but cover odd channel counts, odd sizes, stride 2, padding 0/1/2, dilation 2,
1×1/3×3/5×5/3×5 kernels, batch 1, and partial pixel/channel tiles. Grouped layers (groups 2 and
depthwise): the backend has no grouped kernels, the dispatch runs the dense ones once per group on
channel slices; forward, both gradients and the int8 forward are checked that way (never on a GPU yet).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
FP32_TOL = 1e-5
HALF_TOL = {"float16": 1e-3, "bfloat16": 8e-3}  # the result is rounded to the input's dtype

# (N, C, H, W, O, kernel, stride, padding, dilation)
CASES = [
    (2, 3, 7, 9, 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 5, 9, 8, 7, (3, 3), (2, 2), (0, 0), (2, 2)),
    (1, 7, 5, 6, 9, (1, 1), (2, 2), (0, 0), (1, 1)),
    (1, 3, 8, 7, 4, (5, 5), (1, 1), (2, 2), (1, 1)),
    (2, 5, 6, 5, 6, (3, 5), (1, 2), (2, 0), (1, 1)),
    (1, 7, 7, 7, 3, (3, 3), (2, 2), (1, 1), (2, 2)),
    (2, 4, 9, 10, 10, (3, 3), (1, 1), (1, 1), (1, 1)),
]
FLOAT_OPS = ["forward", "grad_input_sat", "grad_input_exact", "grad_weight"]
INT_OPS = [f"int8_{mode}_{x}" for mode in ("auto", "int32", "vabsdiff4") for x in ("int8", "uint8")]
HALF_CASES = {0: ("float16", "bfloat16"), 2: ("float16", "bfloat16")}
AUTOTUNE_CASES = [0, 2]  # every GPU tile config is checked on these, through the interpreter
GROUPED_CASE = (2, 8, 6, 7, 8, (3, 3), (1, 1), (1, 1), (1, 1))
GROUPED = (2, 8)  # groups (8: depthwise); the dispatch slices, the dense kernels compute
GROUPED_OPS = ("forward", "grad_input", "grad_weight", "int8")
TUNED_OPS = ("forward", "grad_input_sat", "grad_weight", "int8_auto_uint8", "int8_vabsdiff4_int8")


def case_id(case) -> str:
    n, c, h, w, o, k, s, p, d = case
    return f"n{n}c{c}_{h}x{w}_o{o}_k{k[0]}x{k[1]}_s{s[0]}{s[1]}_p{p[0]}{p[1]}_d{d[0]}{d[1]}"


# --------------------------------------------------------------------------------------------------
# the comparisons (run by the interpreter child, or in-process on CUDA)
# --------------------------------------------------------------------------------------------------


def _rel(got, want) -> float:
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _int_inputs(case, device, gen):
    n, c, h, w, o, k, *_ = case
    xq = torch.randint(-128, 128, (n, c, h, w), generator=gen, dtype=torch.int8)
    xu = torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)
    wq = torch.randint(-128, 128, (o, c, *k), generator=gen, dtype=torch.int8)
    xq.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)
    xu.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)
    wq[0].view(-1)[0], wq[-1].view(-1)[-1] = -128, 127
    return xq.to(device), xu.to(device), wq.to(device)


def run_comparisons(device: str, case_indices=None, ops=None) -> list[dict]:
    """Every op of every case against the float64 reference; one record per (case, op)."""
    from adderquant import kernels

    records = []

    def record(case, op, fn):
        if ops is not None and op not in ops:
            return
        rec = {"case": case_id(case), "op": op}
        try:
            rec.update(fn())
        except Exception as e:  # noqa: BLE001  (reported per record, asserted by the test)
            rec["error"] = f"{type(e).__name__}: {e}"
        records.append(rec)

    def ref(fn, *args):
        with kernels.use_backend("reference"):
            return fn(*args)

    def tri(fn, *args):
        with kernels.use_backend("triton"):
            return fn(*args)

    for index, case in enumerate(CASES):
        if case_indices is None or index in case_indices:
            _compare_case(index, case, device, record, ref, tri)
    if case_indices is None:
        for groups in GROUPED:
            _compare_grouped(groups, device, record, ref, tri)
    return records


def _compare_grouped(groups, device, record, ref, tri) -> None:
    """A grouped layer: the dispatch runs the dense Triton kernels once per group on channel slices."""
    from adderquant import kernels

    case = GROUPED_CASE
    n, c, h, w, o, k, s, p, d = case
    gen = torch.Generator().manual_seed(100 + groups)
    x = 0.6 * torch.randn(n, c, h, w, generator=gen)
    wt = 0.6 * torch.randn(o, c // groups, *k, generator=gen)
    y_ref = ref(kernels.adder_forward, x.double(), wt.double(), s, p, d, groups)
    g = torch.randn(y_ref.shape, generator=gen)
    xd, wd, gd = x.to(device), wt.to(device), g.to(device)
    xq = torch.randint(-128, 128, (n, c, h, w), generator=gen, dtype=torch.int8)
    wq = torch.randint(-128, 128, (o, c // groups, *k), generator=gen, dtype=torch.int8)
    checks = {
        "forward": lambda: (tri(kernels.adder_forward, xd, wd, s, p, d, groups), y_ref),
        "grad_input": lambda: (tri(kernels.adder_grad_input, gd, xd, wd, s, p, d, groups),
                               ref(kernels.adder_grad_input, g.double(), x.double(), wt.double(), s, p, d, groups)),
        "grad_weight": lambda: (tri(kernels.adder_grad_weight, gd, xd, wd, s, p, d, groups),
                                ref(kernels.adder_grad_weight, g.double(), x.double(), wt.double(), s, p, d, groups)),
    }
    for op, fn in checks.items():
        def compare(fn=fn):
            got, want = fn()
            return {"err": _rel(got.cpu(), want), "tol": FP32_TOL}

        record(case, f"grouped{groups}_{op}", compare)

    def integer():
        got = tri(kernels.int_adder_conv2d, xq.to(device), wq.to(device), s, p, d, groups)
        want = ref(kernels.int_adder_conv2d, xq, wq, s, p, d, groups)
        return {"exact": bool(got.dtype == torch.int32 and torch.equal(got.cpu(), want))}

    record(case, f"grouped{groups}_int8", integer)


def _compare_case(index, case, device, record, ref, tri) -> None:
    from adderquant import kernels
    from adderquant.kernels import triton_adder as ta
    from adderquant.nn.functional import adder_conv2d

    n, c, h, w, o, k, s, p, d = case
    gen = torch.Generator().manual_seed(index)
    x = torch.randn(n, c, h, w, generator=gen)
    wt = torch.randn(o, c, *k, generator=gen)
    y_ref = ref(kernels.adder_forward, x.double(), wt.double(), s, p, d)
    # gradient scaled so that W − X falls on both sides of the HardTanh clip at ±1
    g = torch.randn(y_ref.shape, generator=gen)
    xs, ws = 0.6 * x, 0.6 * wt
    xd, wd, gd = x.to(device), wt.to(device), g.to(device)

    def fwd():
        y = tri(kernels.adder_forward, xd, wd, s, p, d)
        return {"err": _rel(y.cpu(), y_ref), "tol": FP32_TOL, "dtype": str(y.dtype)}

    def grad_input(mode):
        def fn():
            ta.GRAD_INPUT_CLAMP = mode
            try:
                got = tri(kernels.adder_grad_input, gd, xs.to(device), ws.to(device), s, p, d)
            finally:
                ta.GRAD_INPUT_CLAMP = "sat"
            want = ref(kernels.adder_grad_input, g.double(), xs.double(), ws.double(), s, p, d)
            return {"err": _rel(got.cpu(), want), "tol": FP32_TOL}

        return fn

    def grad_weight():
        got = tri(kernels.adder_grad_weight, gd, xd, wd, s, p, d)
        want = ref(kernels.adder_grad_weight, g.double(), x.double(), wt.double(), s, p, d)
        return {"err": _rel(got.cpu(), want), "tol": FP32_TOL}

    record(case, "forward", fwd)
    record(case, "grad_input_sat", grad_input("sat"))
    record(case, "grad_input_exact", grad_input("exact"))
    record(case, "grad_weight", grad_weight)

    for dtype_name in HALF_CASES.get(index, ()):

        def half(dtype_name=dtype_name):
            dt = getattr(torch, dtype_name)
            xh, wh = x.to(dt), wt.to(dt)
            got = tri(kernels.adder_forward, xh.to(device), wh.to(device), s, p, d)
            want = ref(kernels.adder_forward, xh.double(), wh.double(), s, p, d)
            return {"err": _rel(got.cpu(), want), "tol": HALF_TOL[dtype_name], "dtype": str(got.dtype)}

        record(case, f"forward_{dtype_name}", half)

    xq, xu, wq = _int_inputs(case, device, gen)
    for mode in ("auto", "int32", "vabsdiff4"):
        for name, xi in (("int8", xq), ("uint8", xu)):

            def integer(mode=mode, xi=xi):
                ta.INT8_MODE = mode
                try:
                    got = tri(kernels.int_adder_conv2d, xi, wq, s, p, d)
                finally:
                    ta.INT8_MODE = "auto"
                want = ref(kernels.int_adder_conv2d, xi.cpu(), wq.cpu(), s, p, d)
                return {"exact": bool(got.dtype == torch.int32 and torch.equal(got.cpu(), want))}

            record(case, f"int8_{mode}_{name}", integer)

    if index == 0:

        def autograd():
            xa, wa = xd.clone().requires_grad_(True), wd.clone().requires_grad_(True)
            with kernels.use_backend("triton"):
                out = adder_conv2d(xa, wa, stride=s, padding=p, dilation=d)
                out.backward(gd)
            xr, wr = x.double().requires_grad_(True), wt.double().requires_grad_(True)
            with kernels.use_backend("reference"):
                adder_conv2d(xr, wr, stride=s, padding=p, dilation=d).backward(g.double())
            err = max(_rel(out.detach().cpu(), y_ref), _rel(xa.grad.cpu(), xr.grad), _rel(wa.grad.cpu(), wr.grad))
            return {"err": err, "tol": FP32_TOL}

        def dispatch():
            # with no backend forced, the triton backend must be the one picked for these tensors
            picked = kernels._pick("forward", xd, wd)
            return {"exact": getattr(picked, "__self__", None) is ta.BACKEND}

        record(case, "autograd", autograd)
        record(case, "dispatch", dispatch)


# --------------------------------------------------------------------------------------------------
# the child process
# --------------------------------------------------------------------------------------------------

_CHILD_ENV = {"TRITON_INTERPRET": "1", "ADDERQUANT_TRITON_INTERPRET": "1", "ADDERQUANT_BACKEND": ""}


def _start_child(out: Path, autotune: bool):
    env = {**os.environ, **_CHILD_ENV, "ADDERQUANT_TRITON_AUTOTUNE": "1" if autotune else "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out)] + (["--autotune"] if autotune else [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def _collect(child) -> dict:
    proc, out = child
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter child failed (rc {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    data = json.loads(out.read_text())
    return {(r["case"], r["op"]): r for r in data["records"]} | {("meta", "meta"): data["meta"]}


def _worker(argv: list[str]) -> None:
    out = Path(argv[argv.index("--worker") + 1])
    torch.set_num_threads(1)
    from adderquant.kernels import triton_adder as ta

    meta = {"interpret": ta.INTERPRET, "autotune": ta.AUTOTUNE, "backend": ta.BACKEND is not None}
    if "--autotune" in argv:
        records = run_comparisons("cpu", AUTOTUNE_CASES, ops=set(TUNED_OPS))
    else:
        records = run_comparisons("cpu")
        # each GPU tile config on its own (the autotune child's stand-in timer only ever keeps the first)
        lists = ("FWD", "INT8", "GI", "GW")
        for i in range(_n_gpu_configs()):
            for name in lists:
                gpu = getattr(ta, f"GPU_{name}_CONFIGS")
                setattr(ta, f"_{name}_CONFIGS", [gpu[i % len(gpu)]])
            for rec in run_comparisons("cpu", AUTOTUNE_CASES, ops=set(TUNED_OPS)):
                rec["op"] += f"@config{i}"
                records.append(rec)
    out.write_text(json.dumps({"meta": meta, "records": records}))


def _n_gpu_configs() -> int:
    from adderquant.kernels import triton_adder as ta

    return max(len(ta.GPU_FWD_CONFIGS), len(ta.GPU_INT8_CONFIGS), len(ta.GPU_GI_CONFIGS), len(ta.GPU_GW_CONFIGS))


def _check(rec: dict | None) -> None:
    assert rec is not None, "no record: the comparison did not run"
    assert "error" not in rec, rec["error"]
    if "exact" in rec:
        assert rec["exact"], rec
    else:
        assert rec["err"] < rec["tol"], rec


if __name__ == "__main__":
    _worker(sys.argv)
    sys.exit(0)

if not HAVE_TRITON:
    pytest.skip("triton is not installed (it comes with the dev extra on Linux x86-64)", allow_module_level=True)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    results = _collect(_start_child(tmp_path_factory.mktemp("triton") / "plain.json", autotune=False))
    meta = results[("meta", "meta")]
    assert meta == {"interpret": True, "autotune": False, "backend": True}, meta
    return results


@pytest.fixture(scope="module")
def autotuned(tmp_path_factory):
    results = _collect(_start_child(tmp_path_factory.mktemp("triton") / "autotune.json", autotune=True))
    assert results[("meta", "meta")]["autotune"] is True
    return results


_PAIRS = [(case_id(c), op) for c in CASES for op in FLOAT_OPS + INT_OPS]
_PAIRS += [(case_id(CASES[i]), f"forward_{dt}") for i, dts in HALF_CASES.items() for dt in dts]
_PAIRS += [(case_id(CASES[0]), "autograd"), (case_id(CASES[0]), "dispatch")]
_PAIRS += [(case_id(GROUPED_CASE), f"grouped{g}_{op}") for g in GROUPED for op in GROUPED_OPS]


@pytest.mark.parametrize("case,op", _PAIRS, ids=[f"{c}-{o}" for c, o in _PAIRS])
def test_interpreter_matches_reference(interpreted, case, op):
    _check(interpreted.get((case, op)))


_TUNED = [(case_id(CASES[i]), op) for i in AUTOTUNE_CASES for op in TUNED_OPS]
_CONFIGS = [(c, f"{op}@config{i}") for i in range(_n_gpu_configs()) for c, op in _TUNED]


@pytest.mark.parametrize("case,op", _CONFIGS, ids=[f"{c}-{o}" for c, o in _CONFIGS])
def test_each_gpu_tile_config(interpreted, case, op):
    """The GPU tile configs (512–1024 pixels × 16–32 channels), each alone, through the interpreter."""
    _check(interpreted.get((case, op)))


@pytest.mark.parametrize("case,op", _TUNED, ids=[f"{c}-{o}" for c, o in _TUNED])
def test_autotune_launch_path(autotuned, case, op):
    """The autotuned launch (grid from META, keys), every config run once by a stand-in timer."""
    _check(autotuned.get((case, op)))


def test_cpu_tensors_not_taken_without_the_interpreter_switch():
    from adderquant import kernels
    from adderquant.kernels import triton_adder as ta

    assert not ta.INTERPRET
    assert "triton" in kernels.available_backends()
    x, w = torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3)
    assert not ta.BACKEND.supports("forward", x, w)
    assert not ta.BACKEND.supports("int_forward", x.to(torch.int8), w.to(torch.int8))
    picked = kernels._pick("forward", x, w)
    assert getattr(picked, "__self__", None) is not ta.BACKEND


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from adderquant import kernels\n"
        "from adderquant.kernels import triton_adder\n"
        "assert triton_adder.BACKEND is None and 'triton' not in kernels.available_backends()\n"
        "import torch; y = kernels.adder_forward(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), 1, 1)\n"
        "assert y.shape == (1, 3, 4, 4)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kernels_compile_for_sm90_offline():
    """The GPU code path itself (the interpreter never compiles): sm_90 SASS via the wheel's ptxas, no GPU.

    No register spills; the vabsdiff4 path really is VABSDIFF4.U8; the sat clamp really is a
    saturating FADD/FFMA; the forward's inner loop stays mostly FADDs (the layout the kernel relies on).
    """
    from adderquant.kernels import triton_sass

    only = {"forward fp32", "int8 vabsdiff4", "grad_input sat", "grad_weight"}
    try:
        rows = triton_sass.sass_report(first_config_only=True, only=only)
    except (FileNotFoundError, RuntimeError) as e:
        pytest.skip(f"no offline sm_90 toolchain: {e}")
    by = {r["kernel"]: r for r in rows}
    assert set(by) == only
    for r in rows:
        assert r["stack_bytes"] == 0 and r["loop_local_memory_ops"] == 0, (r["kernel"], r["registers"])
    assert "VABSDIFF4.U8" in by["int8 vabsdiff4"]["sass"]
    assert "FFMA.SAT" in by["grad_input sat"]["sass"] or "FADD.SAT" in by["grad_input sat"]["sass"]
    assert by["forward fp32"]["loop_work_fraction"] > 0.7, by["forward fp32"]["loop_mix"]


@pytest.mark.gpu
def test_cuda_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    records = run_comparisons("cuda")
    failures = []
    for rec in records:
        try:
            _check(rec)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)
