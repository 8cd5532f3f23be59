"""Small helpers every layer of the package shares (this module imports nothing from adderquant).

One definition each of what used to be written several times: the environment variables, the default
device, the bit-width check, the convolution output size, atomic file writes, module swaps, and
"hook these layers while the model runs, then restore it".
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
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
