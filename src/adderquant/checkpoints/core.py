"""Checkpoints: safetensors + a JSON sidecar of metadata, written atomically; the importer registry.

``save`` writes ``X.safetensors`` (tensors) and ``X.json`` (model name, kind, classes, head,
normalisation, training arguments, accuracy). ``load`` accepts those, any registered importer's
format (the package registers the official AdderNet ``.pth`` and the APoT authors' files), and a
plain state_dict of a registered model. PyTorch pickles are read with ``weights_only=True`` unless
the caller passes ``unsafe=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.normalization import CIFAR_ADDERNET_NORM as ADDERNET_NORM
from ..models import create
from ..quant.apot_layers import apot_quantize
from ..utils import CHECKPOINTS_ENV, DATA_ENV, atomic_write, json_dumps


@dataclass
class Checkpoint:
    """A model ready for evaluation plus what is needed to feed it."""

    model: nn.Module
    name: str
    kind: str
    num_classes: int
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    format: str
    meta: dict = field(default_factory=dict)


# An importer gets (state_dict, model name or None, options) and returns a Checkpoint or None.
Importer = Callable[[dict, str | None, dict], "Checkpoint | None"]
IMPORTERS: list[tuple[str, Importer]] = []

OFFICIAL_ADDERNET = "addernet-resnet20-cifar10.pth"


def find_official_addernet() -> str | None:
    """The authors' AdderNet ResNet-20 (the embedded default of the CLI, scripts and benchmarks):
    under ``$ADDERQUANT_CHECKPOINTS``, beside ``$ADDERQUANT_DATA``, or in ``../shared/checkpoints``."""
    roots = [os.environ.get(CHECKPOINTS_ENV)]
    if os.environ.get(DATA_ENV):
        roots.append(str(Path(os.environ[DATA_ENV]).parent / "checkpoints"))
    roots.append("../shared/checkpoints")
    for root in filter(None, roots):
        path = Path(root) / OFFICIAL_ADDERNET
        if path.exists():
            return str(path)
    return None


def register_importer(name: str, importer: Importer) -> None:
    """Add (or replace) the importer called ``name``; ``load`` tries importers in registration order."""
    IMPORTERS[:] = [(n, f) for n, f in IMPORTERS if n != name] + [(name, importer)]


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save(model: nn.Module, path: str | os.PathLike, *, name: str, kind: str, num_classes: int,
         normalization, **meta) -> Path:
    """Write ``model`` as safetensors + JSON metadata; both writes are temp-file + rename."""
    tensors_path, meta_path = _paths(path)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    info = {"model": name, "kind": kind, "num_classes": num_classes,
            "head": getattr(model, "head", None),
            "normalization": {"mean": list(normalization[0]), "std": list(normalization[1])}, **meta}
    atomic_write(tensors_path, lambda tmp: save_file(state, tmp, metadata={"format": "adderquant"}))
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json_dumps(info, indent=2, default=str)))
    return tensors_path


def load_into(model: nn.Module, state: dict, source: str) -> None:
    """``load_state_dict`` with a message naming missing and unexpected keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        def show(keys):
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "") or "none"
        shapes = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                           for k in bad_shape[:4])
        raise ValueError(f"{source} does not match the model: missing keys: {show(missing)}; "
                         f"unexpected keys: {show(unexpected)}" + (f"; shape mismatch: {shapes}" if shapes else ""))
    model.load_state_dict(state)


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def model_classes(model: nn.Module) -> int:
    fc = model.fc if hasattr(model, "fc") else model.classifier
    return fc.out_features if isinstance(fc, nn.Linear) else fc.out_channels


def _read_torch(path: Path, unsafe: bool) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError … for bad files
        if not unsafe and "Unsupported global" in str(err):  # a sound pickle holding non-tensor objects
            raise ValueError(f"{path} holds Python objects besides tensors, which are not loaded without opt-in: "
                             "pass unsafe=True / --unsafe-load only if you trust who wrote the file") from err
        # torch's own message may advise weights_only=False, which is no remedy for a broken file: left out
        raise ValueError(f"{path} is damaged or not a PyTorch checkpoint ({type(err).__name__})") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state_dict of tensors")
    return strip_prefix(dict(obj))


def load(path: str | os.PathLike, name: str | None = None, *, kind: str | None = None,
         unsafe: bool = False, **options) -> Checkpoint:
    """Load any supported checkpoint; ``name``/``kind`` are needed only for bare state_dicts."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.suffix in (".safetensors", ".json"):
        tensors_path, meta_path = _paths(p)
        if not meta_path.exists():
            raise FileNotFoundError(f"{tensors_path} has no metadata file {meta_path}")
        try:
            info = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path} is not valid JSON ({err})") from err
        missing = [k for k in ("model", "kind", "num_classes", "normalization") if not isinstance(info, dict)
                   or k not in info]
        if missing:
            raise ValueError(f"{meta_path} is not an adderquant checkpoint sidecar: it lacks {missing}")
        extra = {"head": info["head"]} if info.get("head") else {}
        model = create(info["model"], num_classes=info["num_classes"], kind=info["kind"], **extra)
        if info.get("apot_bits"):  # an APoT model: rebuild its quantized layers, then load thresholds too
            model = apot_quantize(model, int(info["apot_bits"]), recalibrate_bn=False)
        try:
            tensors = load_file(tensors_path)
        except Exception as err:  # safetensors raises its own SafetensorError for a truncated or foreign file
            raise ValueError(f"{tensors_path} is damaged or not a safetensors file ({err})") from err
        load_into(model, tensors, str(tensors_path))
        norm = info["normalization"]
        return Checkpoint(model, info["model"], info["kind"], info["num_classes"],
                          (tuple(norm["mean"]), tuple(norm["std"])), "adderquant", info)
    state = _read_torch(p, unsafe)
    for _, importer in IMPORTERS:
        ckpt = importer(state, name, options)
        if ckpt is not None:
            ckpt.meta.setdefault("source", str(p))
            return ckpt
    if name is None or kind is None:
        raise ValueError(f"{p} is a plain state_dict: pass the model name and kind (--model, --kind)")
    fc_w = state.get("fc.weight")
    model = create(name, num_classes=None if fc_w is None else fc_w.shape[0], kind=kind,
                   **({"head": "linear"} if fc_w is not None and fc_w.dim() == 2 and name.startswith("resnet")
                      and name in ("resnet20", "resnet32", "resnet56") else {}))
    load_into(model, state, str(p))
    norm = options.get("normalization", ADDERNET_NORM)
    return Checkpoint(model, name, kind, model_classes(model), norm, "state_dict", {"source": str(p)})
