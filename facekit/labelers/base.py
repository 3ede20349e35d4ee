"""Labelers: pluggable models that turn a batch into label columns for the ``labels`` stage.

A labeler is a plain class (no Ray, no pipeline) so it can be tried in a notebook on a list of images;
the stage composes the configured ones. Short names map to classes here; anything else is
``module.path:ClassName``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from facekit.common import Batch


@runtime_checkable
class Labeler(Protocol):
    """Adds label columns. ``labels`` returns exactly the columns named by ``fields``, one value per row
    (None where it cannot say). A labeler class also has a ``params_model`` ClassVar and is built as
    ``cls(params)``, cheaply (the driver builds stages to read their columns); models load in
    ``setup``, once per worker. ``model_info()`` (name, revision) is optional, for lineage; so is
    ``reads()``, the upstream columns it uses besides the image (without it the stage loads them all)."""

    name: str

    def fields(self) -> tuple[pa.Field, ...]: ...

    def setup(self) -> None: ...

    def labels(self, batch: Batch) -> dict[str, list[Any]]: ...


# Short names a config may use; anything else must be "module.path:ClassName".
LABELERS: dict[str, str] = {
    "pose": "facekit.labelers.pose:PoseBinLabeler",
    "clip": "facekit.labelers.clip:ClipLabeler",
    "genderage": "facekit.labelers.genderage:GenderAgeLabeler",
}


def labeler_class(kind: str) -> Any:
    target = LABELERS.get(kind, kind)
    if ":" not in target:
        raise ValueError(f"unknown labeler {kind!r}; known: {', '.join(sorted(LABELERS))}, or 'module:Class'")
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not hasattr(cls, "params_model"):
        raise ValueError(f"labeler {kind!r}: {target} is not a labeler class with a params_model")
    return cls


