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

import importlib
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stages.base import (
    IDENTITY_ID,
    KEY,
    PARENT_ID,
    SAMPLE_ID,
    Batch,
    ModelInfo,
    Params,
    Resources,
    Stage,
    StageContext,
    rows_ok,
)


@runtime_checkable
class Labeler(Protocol):
    """Adds label columns. ``labels`` returns exactly the columns named by ``fields``, one value per row
    (None where it cannot say). A labeler class also has a ``params_model`` ClassVar and is built as
    ``cls(params)``, cheaply (the driver builds stages to read their columns); models load in
    ``setup``, once per worker. ``model_info()`` (name, revision) is optional, for lineage."""

    name: str

    def fields(self) -> tuple[pa.Field, ...]: ...

    def setup(self) -> None: ...

    def labels(self, batch: Batch) -> dict[str, list[Any]]: ...


# ------------------------------------------------------------------------------------ pose bins


class PoseBinParams(Params):
    """|yaw| <= yaw_edge and |pitch| <= pitch_edge is frontal; otherwise the larger of |yaw| / yaw_edge
    and |pitch| / pitch_edge picks left/right or up/down. Bins name where the nose points in the image
    (yaw > 0: image right)."""

    yaw_edge: float = Field(15.0, gt=0, le=90)
    pitch_edge: float = Field(15.0, gt=0, le=90)
    yaw_column: str = "yaw"  # written by quality
    pitch_column: str = "pitch"


POSE_BINS = ("frontal", "left", "right", "up", "down")


def pose_bin(yaw: float | None, pitch: float | None, yaw_edge: float, pitch_edge: float) -> str | None:
    if yaw is None or pitch is None:
        return None
    ry, rp = abs(yaw) / yaw_edge, abs(pitch) / pitch_edge
    if ry <= 1.0 and rp <= 1.0:
        return "frontal"
    if ry >= rp:
        return "right" if yaw > 0 else "left"
    return "up" if pitch > 0 else "down"


class PoseBinLabeler:
    """Pose bins from the pose scores already in the batch; no model."""

    name = "pose"
    params_model: ClassVar[type[Params]] = PoseBinParams

    def __init__(self, params: PoseBinParams) -> None:
        self.params = params

    def fields(self) -> tuple[pa.Field, ...]:
        return (pa.field("pose_bin", pa.string()),)

    def setup(self) -> None:
        pass

    def labels(self, batch: Batch) -> dict[str, list[Any]]:
        p = self.params
        n = len(batch[SAMPLE_ID])
        yaws = batch.get(p.yaw_column) or [None] * n
        pitches = batch.get(p.pitch_column) or [None] * n
        bins = [pose_bin(y, q, p.yaw_edge, p.pitch_edge) for y, q in zip(yaws, pitches, strict=True)]
        return {"pose_bin": bins}

    def model_info(self) -> ModelInfo:
        return ModelInfo()


# Short names a config may use; anything else must be "module.path:ClassName".
LABELERS: dict[str, str] = {
    "pose": "stages.labels:PoseBinLabeler",
    "clip": "stages.clip_labels:ClipLabeler",
    "genderage": "stages.genderage:GenderAgeLabeler",
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


class LabelerConfig(BaseModel):
    """One labeler: its kind and its own params (validated against the labeler's params model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid(self) -> LabelerConfig:
        labeler_class(self.kind).params_model.model_validate(self.params)
        return self

    def build(self) -> Labeler:
        cls = labeler_class(self.kind)
        return cls(cls.params_model.model_validate(self.params))


class LabelParams(Params):
    labelers: tuple[LabelerConfig, ...] = (LabelerConfig(kind="pose"),)

    @model_validator(mode="after")
    def _distinct_columns(self) -> LabelParams:
        seen: dict[str, str] = {}
        for cfg in self.labelers:
            for f in cfg.build().fields():
                if f.name in seen:
                    raise ValueError(f"labelers {seen[f.name]!r} and {cfg.kind!r} both write {f.name!r}")
                seen[f.name] = cfg.kind
        return self


class LabelStage(Stage):
    name: ClassVar[str] = "labels"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = LabelParams
    resources: ClassVar[Resources] = Resources(cpus=0.25)
    batch_size: ClassVar[int] = 256
    columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("pose_bin", pa.string()),)  # the default labelers'
    params: LabelParams

    def __init__(self, params: Params, context: StageContext) -> None:
        super().__init__(params, context)
        self.labelers: list[Labeler] = [cfg.build() for cfg in self.params.labelers]

    def output_fields(self) -> tuple[pa.Field, ...]:
        return tuple(f for lab in self.labelers for f in lab.fields())

    def setup(self) -> None:
        for lab in self.labelers:
            lab.setup()

    def model_info(self) -> ModelInfo:
        infos = [i for i in (getattr(lab, "model_info", ModelInfo)() for lab in self.labelers) if i.name]
        return ModelInfo(name="+".join(i.name for i in infos), revision="+".join(i.revision for i in infos))

    def process(self, batch: Batch) -> Batch:
        out = rows_ok(batch[SAMPLE_ID])
        for lab in self.labelers:
            out.update(lab.labels(batch))
        return out


# ------------------------------------------------------------------------------------ balance

# Columns that identify samples rather than describe them.
NOT_ATTRIBUTES = frozenset({SAMPLE_ID, KEY, IDENTITY_ID, PARENT_ID, "split", "export_key", "export_shard",
                            "src_shard", "label", "source_key", "embedding_space", "embedding_metric"})


def attribute_columns(table: pa.Table, max_bins: int = 20) -> list[str]:
    """Low-cardinality string / bool columns: the attributes worth a balance table."""
    out = []
    for name in table.column_names:
        col = table.column(name)
        if name in NOT_ATTRIBUTES or name.rsplit(".", 1)[-1] in NOT_ATTRIBUTES:
            continue
        categorical = pa.types.is_string(col.type) or pa.types.is_boolean(col.type)
        if categorical and len(pc.unique(col)) <= max_bins:
            out.append(name)
    return out


def balance_counts(table: pa.Table, attributes: Sequence[str] | None = None,
                   split_column: str = "split") -> pa.Table:
    """Counts per (attribute, bin, split); struct columns (DuckDB's per-stage rows) are flattened
    first, so ``labels.pose_bin`` works. A missing split column counts everything as ``all``."""
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    attrs = list(attributes) if attributes is not None else attribute_columns(table)
    splits = (table.column(split_column).to_pylist() if split_column in table.column_names
              else ["all"] * table.num_rows)
    rows: dict[tuple[str, str, str], int] = {}
    for attr in attrs:
        if attr not in table.column_names:
            raise KeyError(f"balance: no column {attr!r} (columns: {', '.join(table.column_names)})")
        for value, split in zip(table.column(attr).to_pylist(), splits, strict=True):
            k = (attr, "(none)" if value is None else str(value), str(split))
            rows[k] = rows.get(k, 0) + 1
    keys = sorted(rows)
    return pa.table({
        "attribute": pa.array([k[0] for k in keys], pa.string()),
        "bin": pa.array([k[1] for k in keys], pa.string()),
        "split": pa.array([k[2] for k in keys], pa.string()),
        "count": pa.array([rows[k] for k in keys], pa.int64()),
    })


def balance_report(table: pa.Table, attributes: Sequence[str] | None = None,
                   split_column: str = "split") -> str:
    """Markdown for the dataset card: one row per attribute bin, one count column per split, plus the
    bin's share of all samples. Empty string when there is nothing to report."""
    counts = balance_counts(table, attributes, split_column)
    if counts.num_rows == 0:
        return ""
    splits = sorted(set(counts.column("split").to_pylist()), key=lambda s: (s != "train", s != "val", s))
    cells: dict[tuple[str, str], dict[str, int]] = {}
    for row in counts.to_pylist():
        cells.setdefault((row["attribute"], row["bin"]), {})[row["split"]] = row["count"]
    totals: dict[str, int] = {}
    for (attr, _), per in cells.items():
        totals[attr] = totals.get(attr, 0) + sum(per.values())
    lines = ["| attribute | bin | " + " | ".join(splits) + " | share |",
             "|---|---|" + "---|" * len(splits) + "---|"]
    for (attr, bin_), per in sorted(cells.items()):
        share = sum(per.values()) / totals[attr]
        per_split = " | ".join(str(per.get(s, 0)) for s in splits)
        lines.append(f"| {attr} | {bin_} | {per_split} | {share:.1%} |")
    return "\n".join(lines)
