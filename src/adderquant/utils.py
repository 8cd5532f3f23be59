"""Small helpers every layer of the package shares (this module imports nothing from adderquant).

One definition each of what used to be written several times: the environment variables, the default
device, the bit-width check, the convolution output size, atomic file writes, module swaps, and
"hook these layers while the model runs, then restore it".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

DATA_ENV = "ADDERQUANT_DATA"
CHECKPOINTS_ENV = "ADDERQUANT_CHECKPOINTS"


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, else CUDA when there is one, else the CPU; refuses CUDA it cannot have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def check_bits(bits, lo: int, hi: int, what: str = "bits") -> int:
    """``bits`` as an int in ``lo..hi``; a float (4.5), a bool or a string is refused, not truncated."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {bits!r}")
    if not lo <= bits <= hi:
        raise ValueError(f"{what} must be in {lo}..{hi}, got {bits}")
    return bits


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution (or pooling) along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash or a full disk leaves the old file (or none), never half of one. The file gets the mode
    a plain ``open`` would give it (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def finite_json(obj):
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively through dicts,
    lists and tuples: what :func:`json_dumps` writes, so no file or log line holds a bare ``NaN`` or
    ``Infinity`` (which strict JSON readers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_dumps(obj, **kwargs) -> str:
    """``json.dumps`` that never writes NaN/Infinity: non-finite floats become ``null`` (also those a
    ``default`` converter returns), and ``allow_nan=False`` refuses anything that slips through."""
    default = kwargs.pop("default", None)
    kwargs.pop("allow_nan", None)  # always False

    def convert(o):
        if default is None:
            raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")
        return finite_json(default(o))

    return json.dumps(finite_json(obj), allow_nan=False, default=convert, **kwargs)


class _StageLine:
    """A progress "bar" for a log file: iterates like ``tqdm`` and writes one line when the stage ends
    (its name, how many items, the seconds and the last postfix), never a carriage return."""

    disable = False

    def __init__(self, iterable: Iterable, desc: str, unit: str, stream):
        self.iterable, self.desc, self.unit, self.stream, self.postfix = iterable, desc, unit, stream, ""

    def set_postfix(self, **kwargs) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def __iter__(self):
        start, n = time.perf_counter(), 0
        for item in self.iterable:
            n += 1
            yield item
        extra = f", {self.postfix}" if self.postfix else ""
        unit = self.unit if n == 1 else self.unit + ("es" if self.unit.endswith(("ch", "s", "x")) else "s")
        print(f"{self.desc}: {n} {unit} in {time.perf_counter() - start:.1f} s{extra}", file=self.stream, flush=True)


def progress_bar(iterable: Iterable, desc: str, enabled: bool, *, total: int | None = None, unit: str = "batch"):
    """The package's one progress display, on stderr. ``enabled=False`` (every library function's
    default: the CLI turns it on): none. A terminal: a ``tqdm`` bar that clears itself when done.
    Anything else (a redirected log): one line per stage, written when the stage ends — no ``\r``
    flood. The result iterates like ``iterable`` and has ``tqdm``'s ``set_postfix`` and ``disable``."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(iterable, disable=True)
    if getattr(sys.stderr, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr)
    return _StageLine(iterable, desc, unit, sys.stderr)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@contextlib.contextmanager
def hooked(model: nn.Module, modules: Mapping[str, nn.Module], fn: Callable, *, pre: bool = True,
           eval_mode: bool = True) -> Iterator[None]:
    """While the block runs, call ``fn(name, module, inputs)`` before (``pre``) or ``fn(name, module,
    inputs, output)`` after each listed module's forward; the model is in eval mode meanwhile
    (``eval_mode``), and hooks and mode are restored however the block ends."""
    def bind(name):
        if pre:
            return lambda mod, inputs: fn(name, mod, inputs)
        return lambda mod, inputs, output: fn(name, mod, inputs, output)

    handles = [(m.register_forward_pre_hook if pre else m.register_forward_hook)(bind(n)) for n, m in modules.items()]
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
