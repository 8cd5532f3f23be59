"""The package's layering: kernels → nn → models → quant → checkpoints/integer/analysis → workflows → cli.

Each check runs in a fresh interpreter, since this one has long since imported everything: importing a
lower layer must not load any module of a layer above it (third-party modules do not matter).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

ABOVE_MODELS = ("adderquant.quant", "adderquant.checkpoints", "adderquant.analysis", "adderquant.integer",
                "adderquant.workflows", "adderquant.cli")
ABOVE_QUANT = ABOVE_MODELS[1:]


def _loaded_after(module: str, forbidden: tuple[str, ...]) -> list[str]:
    """The modules of the ``forbidden`` packages (or the packages themselves) that importing ``module``
    loads in a fresh interpreter."""
    code = (f"import sys, {module}\n"
            f"bad = {forbidden!r}\n"
            "print('\\n'.join(sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in bad))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"import {module} failed:\n{out.stderr}"
    return out.stdout.split()


@pytest.mark.parametrize("module", ["adderquant.models", "adderquant.kernels", "adderquant.nn", "adderquant.data"])
def test_lower_layers_do_not_load_upper_ones(module):
    assert _loaded_after(module, ABOVE_MODELS) == []


def test_quant_does_not_load_checkpoints_or_above():
    assert _loaded_after("adderquant.quant", ABOVE_QUANT) == []


def test_checkpoints_import_cleanly_with_both_importers():
    code = ("import adderquant.checkpoints as c\n"
            "assert [n for n, _ in c.IMPORTERS] == ['addernet-official', 'apot'], c.IMPORTERS\n"
            "assert callable(c.load) and callable(c.save)\n"
            "import adderquant\n"
            "assert adderquant.load_checkpoint is c.load and adderquant.save_checkpoint is c.save\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # the submodules on their own, each first in a fresh interpreter (no cycle whichever comes first)
    for sub in ("core", "apot", "addernet"):
        out = subprocess.run([sys.executable, "-c", f"import adderquant.checkpoints.{sub}"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"adderquant.checkpoints.{sub}: {out.stderr}"


def test_old_checkpoint_modules_are_gone():
    code = ("import importlib.util as u\n"
            "assert u.find_spec('adderquant.models.checkpoint') is None\n"
            "assert u.find_spec('adderquant.quant.apot_import') is None\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
