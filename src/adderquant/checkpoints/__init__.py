"""Checkpoints: adderquant's safetensors + JSON format and importers for the authors' files.

    from adderquant import checkpoints
    ck = checkpoints.load("addernet-resnet20-cifar10.pth")   # a Checkpoint: model, normalization, ...
    checkpoints.save(ck.model, "out/model", name=ck.name, kind=ck.kind, num_classes=ck.num_classes,
                     normalization=ck.normalization)

This package sits above ``quant`` (it may import ``models``, ``data``, ``quant`` and ``utils``; none of
those import it). :mod:`.core` holds the format and the importer registry; the two importers below
are registered here, in this order, so ``load`` tries the official AdderNet format first.
"""

from __future__ import annotations

from . import addernet, apot
from .core import (
    ADDERNET_NORM,
    CHECKPOINTS_ENV,
    IMPORTERS,
    OFFICIAL_ADDERNET,
    Checkpoint,
    Importer,
    find_official_addernet,
    load,
    load_into,
    model_classes,
    register_importer,
    save,
    strip_prefix,
)

register_importer("addernet-official", addernet.import_official_addernet)
register_importer("apot", apot.import_apot)

__all__ = ["ADDERNET_NORM", "CHECKPOINTS_ENV", "IMPORTERS", "OFFICIAL_ADDERNET", "Checkpoint", "Importer",
           "addernet", "apot", "find_official_addernet", "load", "load_into", "model_classes",
           "register_importer", "save", "strip_prefix"]
