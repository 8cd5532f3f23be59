"""Importer for the official AdderNet ``.pth`` (adder weights stored under ``.adder``; the loader has
already stripped DataParallel's ``module.`` prefix). Registered as ``"addernet-official"`` by the
package ``__init__``."""

from __future__ import annotations

from ..models import create
from .core import ADDERNET_NORM, Checkpoint, load_into, model_classes


def import_official_addernet(state: dict, name: str | None, options: dict) -> Checkpoint | None:
    """A :class:`Checkpoint` for the authors' AdderNet file, ``None`` for anything without ``.adder`` keys."""
    if not any(k.endswith(".adder") for k in state):
        return None
    name = name or "resnet20"
    mapped = {(k[: -len(".adder")] + ".weight" if k.endswith(".adder") else k): v for k, v in state.items()}
    num_classes = mapped["fc.weight"].shape[0] if "fc.weight" in mapped else None
    model = create(name, num_classes=num_classes, kind="adder")
    load_into(model, mapped, "official AdderNet checkpoint")
    return Checkpoint(model, name, "adder", model_classes(model), ADDERNET_NORM, "addernet-official")


__all__ = ["import_official_addernet"]
