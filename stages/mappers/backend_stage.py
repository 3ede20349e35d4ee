"""Stages whose work is a face model from ``facekit.backends`` (a detector, an embedder)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from facekit.backends.base import BackendParams, build_backend
from stages.base import Params, Stage

BP = TypeVar("BP", bound=BackendParams)


class BackendStage(Stage[BP]):
    """``doctor`` reports what the configured backend cannot find for the stage's ``role``; ``build_model``
    loads that backend, with the options the params carry."""

    role: ClassVar[Literal["detector", "embedder"]]

    @classmethod
    def doctor(cls, params: Params) -> list[str]:
        assert isinstance(params, BackendParams)
        return params.missing_files(cls.role)

    def build_model(self) -> Any:
        return build_backend(self.params.backend, self.role, self.params.options)
