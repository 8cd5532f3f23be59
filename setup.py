"""Build hook for the optional C extension; all metadata lives in pyproject.toml.

``adderquant._adder_cpu`` is plain C (no torch headers, so pip's isolated build needs only
setuptools) and is reached through ctypes by ``adderquant.kernels.cpu``. It is optional: without a
compiler the package still installs and every adder op is served by the pure-PyTorch reference.
No ``-march`` flag: AVX2/AVX-512 code paths carry target attributes and are chosen at run time.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/openmp"], []
else:
    compile_args = ["-O3", "-fopenmp", "-std=gnu11", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    link_args = ["-fopenmp"]

setup(
    ext_modules=[
        Extension(
            "adderquant._adder_cpu",
            sources=["csrc/adder_cpu.c", "csrc/int_ops.c", "csrc/int_net.c"],
            depends=["csrc/aq_common.h"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ]
)
