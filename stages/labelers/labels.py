"""labels: attribute columns from pluggable labelers, and the balance report of the dataset card.

A ``Labeler`` turns a batch into label columns. The stage composes the configured labelers, so a
CLIP zero-shot labeler, an MLLM labeler or a gender/age model is one class plus one config entry:

    - stage: labels
      params:
        labelers:
          - {kind: pose, params: {yaw_edge: 20}}
          - {kind: my_pkg.labels:GlassesLabeler, params: {...}}

A labeler declares its columns up front (``fields``, from its params only) because the runner writes
manifests with a fixed schema before any model loads; ``setup`` is where it loads models.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator

from facekit.labelers.base import Labeler, labeler_class
from stages.base import (
    Batch,
    ModelInfo,
    Params,
    Resources,
    Stage,
    StageContext,
    Strict,
)


class LabelerConfig(Strict):
    """One labeler: its kind and its own params (validated against the labeler's params model)."""

    kind: str = Field(description="pose, clip, insightface, or module:Class of a labeler")
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True, description="the labeler's own params")

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        labeler_class(kind)
        return kind

    @field_validator("params")
    @classmethod
    def _valid(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # A field validator, so that an error in the params is reported under `params`.
        if "kind" in info.data:
            labeler_class(info.data["kind"]).params_model.model_validate(params)
        return params

    def build(self) -> Labeler:
        cls = labeler_class(self.kind)
        return cls(cls.params_model.model_validate(self.params))


class LabelParams(Params):
    labelers: tuple[LabelerConfig, ...] = Field(
        (LabelerConfig(kind="pose"),), description="labelers run per sample; their columns must not collide")

    @model_validator(mode="after")
    def _distinct_columns(self) -> LabelParams:
        seen: dict[str, str] = {}
        for cfg in self.labelers:
            for f in cfg.build().fields():
                if f.name in seen:
                    raise ValueError(f"labelers {seen[f.name]!r} and {cfg.kind!r} both write {f.name!r}")
                seen[f.name] = cfg.kind
        return self


class LabelStage(Stage[LabelParams]):
    """Adds attribute columns (pose bin, CLIP zero-shot, gender/age) from pluggable labelers."""

    name: ClassVar[str] = "labels"
    version: ClassVar[str] = "1"
    resources: ClassVar[Resources] = Resources(cpus=0.25)
    batch_size: ClassVar[int] = 256
    columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("pose_bin", pa.string()),)  # the default labelers'

    def __init__(self, params: LabelParams, context: StageContext) -> None:
        super().__init__(params, context)
        self.labelers: list[Labeler] = [cfg.build() for cfg in self.params.labelers]

    def output_fields(self) -> tuple[pa.Field, ...]:
        return tuple(f for lab in self.labelers for f in lab.fields())

    def input_columns(self) -> tuple[str, ...]:
        """What the labelers read from earlier stages (a labeler may declare ``reads()``)."""
        return tuple(dict.fromkeys(c for lab in self.labelers for c in getattr(lab, "reads", tuple)()))

    def projected_columns(self) -> set[str] | None:
        """Every column when a labeler does not say what it reads (a plugin): it may use any of them."""
        if any(not hasattr(lab, "reads") for lab in self.labelers):
            return None
        return super().projected_columns()

    def setup(self) -> None:
        for lab in self.labelers:
            lab.setup()

    def model_info(self) -> ModelInfo:
        infos = [i for i in (getattr(lab, "model_info", ModelInfo)() for lab in self.labelers) if i.name]
        return ModelInfo(name="+".join(i.name for i in infos), revision="+".join(i.revision for i in infos))

    def process(self, batch: Batch) -> Batch:
        rows = self.rows(batch)
        for lab in self.labelers:
            for col, values in lab.labels(batch).items():
                rows.column(col, values)
        return rows.batch()


# ------------------------------------------------------------------------------------ balance

# Columns that identify samples rather than describe them.
