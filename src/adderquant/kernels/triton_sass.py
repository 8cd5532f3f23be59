"""Offline compile report for the Triton adder kernels (no GPU needed): each kernel and tile config
compiled for ``sm_<arch>`` with the ptxas/cuobjdump shipped in the triton wheel — registers, stack and
the innermost loop's instruction mix. Static evidence only; ``benchmarks/bench_gpu.py --sass`` and the
tests use it. Kept apart from :mod:`adderquant.kernels.triton_adder`, which only runs kernels."""

from __future__ import annotations

import re
import time

from . import triton_adder as ta


def _sass_instructions(sass: str):
    """(label, opcode) pairs of a cuobjdump/nvdisasm listing (label rows have opcode None)."""
    out = []
    for line in sass.splitlines():
        s = line.strip()
        if re.fullmatch(r"[.$\w]+:", s):
            out.append((s[:-1], None, s))
            continue
        m = re.match(r"^\S*\t(@!?U?P\w+ )?([A-Z][A-Z0-9]*)(\S*)", s)
        if m:
            out.append((None, m.group(2) + m.group(3), s))
    return out


def _innermost_loop(sass: str) -> list[str]:
    """Opcodes of the largest loop body that contains no other loop (the reduction loop)."""
    ins = _sass_instructions(sass)
    where = {lab: i for i, (lab, _, _) in enumerate(ins) if lab}
    loops = []
    for i, (_, op, text) in enumerate(ins):
        if op and op.startswith("BRA"):
            m = re.search(r"BRA\S*\s+`?\(?([.$\w]+)", text)
            if m and m.group(1) in where and where[m.group(1)] < i:
                loops.append((where[m.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops if (c, d) != (a, b))]
    if not inner:
        return []
    a, b = max(inner, key=lambda t: t[1] - t[0])
    return [op for _, op, _ in ins[a : b + 1] if op]


def sass_report(arch: int = 90, first_config_only: bool = False, only=None, log=None) -> list[dict]:
    """Compile every kernel (and tile config) for ``sm_<arch>`` without a GPU; registers and inner-loop mix.

    Uses the ptxas/cuobjdump shipped in the triton wheel. Each row: kernel, config, registers, stack
    bytes, local-memory ops in the loop, the innermost loop's instruction count, how many of those do
    the arithmetic (``loop_work_fraction``), its opcode mix, and the SASS text. ``only`` picks kernels
    by name. Static evidence only: it says nothing about speed on a real GPU.
    """
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if ta.triton is None or ta.INTERPRET:
        raise RuntimeError("sass_report needs triton, and TRITON_INTERPRET off")
    bin_dir = Path(ta.triton.__file__).parent / "backends" / "nvidia" / "bin"
    f32 = "*fp32"
    specs = [
        ("forward fp32", ta._fwd_kernel, {"x_ptr": f32, "w_ptr": f32, "y_ptr": f32}, {"ACC_INT": False},
         ta.GPU_FWD_CONFIGS, "OP", {"FADD"}),
        ("int8 fp32-exact", ta._fwd_kernel, {"x_ptr": "*i8", "w_ptr": f32, "y_ptr": "*i32"}, {"ACC_INT": False},
         ta.GPU_INT8_CONFIGS, "OP", {"FADD"}),
        ("int8 int32", ta._fwd_kernel, {"x_ptr": "*i8", "w_ptr": "*i32", "y_ptr": "*i32"}, {"ACC_INT": True},
         ta.GPU_INT8_CONFIGS[:1], "OP", {"IADD3", "IABS", "VIADD", "IMAD"}),
        ("int8 vabsdiff4", ta._fwd_vabsdiff4_kernel,
         {"x_ptr": "*i32", "w_ptr": "*i32", "bias_ptr": "*i32", "y_ptr": "*i32"}, {"USE_ASM": True},
         ta.GPU_INT8_CONFIGS, "OP", {"VABSDIFF4"}),
        ("grad_input sat", ta._grad_input_kernel, {"g_ptr": f32, "x_ptr": f32, "w_ptr": f32, "dx_ptr": f32},
         {"SAT": True}, ta.GPU_GI_CONFIGS, "CP", {"FADD", "FFMA"}),
        ("grad_input exact", ta._grad_input_kernel, {"g_ptr": f32, "x_ptr": f32, "w_ptr": f32, "dx_ptr": f32},
         {"SAT": False}, ta.GPU_GI_CONFIGS[:1], "CP", {"FADD", "FFMA", "FMNMX"}),
        ("grad_weight", ta._grad_weight_kernel, {"g_ptr": f32, "x_ptr": f32, "part_ptr": f32}, {},
         ta.GPU_GW_CONFIGS, None, {"FFMA"}),
    ]  # fmt: skip
    rows = []
    for name, kernel, ptrs, flags, configs, padded, useful in specs:
        if only is not None and name not in only:
            continue
        params = kernel.params
        for cfg in configs[:1] if first_config_only else configs:
            consts = {"KH": 3, "KW": 3, "s0": 1, "s1": 1, **flags, **cfg.kwargs}
            sig, attrs = {}, {}
            for i, p in enumerate(params):
                if p.name in consts or p.is_constexpr:
                    sig[p.name] = "constexpr"
                elif p.name in ptrs:
                    sig[p.name] = ptrs[p.name]
                    attrs[(i,)] = [["tt.divisibility", 16]]
                else:
                    sig[p.name] = "i32"
                    if p.name == padded:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            t0 = time.perf_counter()
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
            compiled = ta.triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
            seconds = time.perf_counter() - t0
            sass = compiled.asm["sass"]
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run(
                    [str(bin_dir / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True
                ).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            body = _innermost_loop(sass)
            counts: dict[str, int] = {}
            for op in body:
                base = op.split(".")[0]
                counts[base] = counts.get(base, 0) + 1
            work = sum(v for k, v in counts.items() if k in useful)
            rows.append(
                {
                    "kernel": name,
                    "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                    "registers": int(m.group(1)) if m else None,
                    "stack_bytes": int(m.group(2)) if m else None,
                    "loop_local_memory_ops": sum(v for k, v in counts.items() if k in ("LDL", "STL")),
                    "loop_instructions": len(body),
                    "loop_work_instructions": work,
                    "loop_work_fraction": work / len(body) if body else None,
                    "loop_mix": dict(sorted(counts.items(), key=lambda t: -t[1])[:8]),
                    "compile_s": round(seconds, 2),
                    "sass": sass,
                }
            )
            r = rows[-1]
            cfg_s = " ".join(f"{k}={v}" for k, v in r["config"].items())
            frac = "-" if r["loop_work_fraction"] is None else f"{r['loop_work_fraction']:.0%}"
            if log is not None:
                log(
                f"{name:17s} {cfg_s:52s} regs {r['registers']} stack {r['stack_bytes']}B  inner loop "
                f"{len(body)} instr, {work} work ({frac})  {r['loop_mix']}"
                )
    return rows
