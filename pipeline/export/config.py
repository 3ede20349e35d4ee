"""The export config: what is selected, how it is split and sharded, and what the dataset card says.

``where`` is ONE boolean predicate over the columns of ``tables/samples`` (``stage__column``; see
``manifests.tables``). It is parsed by DuckDB's own parser and refused unless it is exactly one
row-level predicate: no second statement, no set operation, no subquery, no LIMIT. The plan splices
the form DuckDB re-emits from its parse tree, in parentheses, after the export's own conditions; it runs
on an in-memory connection whose external access is disabled, over the Arrow data of one partition.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from facekit.common import Strict
from manifests.sql import predicate_sql

WHERE_TABLE = "samples"


class Threshold(Strict):

    min: float | None = Field(None, description="keep values at or above this")
    max: float | None = Field(None, description="keep values at or below this")
    max_abs: float | None = Field(None, description="keep values whose absolute value is at or below this")


class ExportConfig(Strict):

    enabled: bool = Field(True, description="write the export after the stages")
    shard_size: int = Field(1000, ge=1, description="target samples per training shard")
    min_shards_per_split: int = Field(
        8, ge=1, description="at least this many shards per split (one per data-loader worker) when the split "
        "has that many samples; the card warns when it has fewer")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of identities held out")
    min_images_per_identity: int = Field(2, ge=1, description="identities with fewer kept images are left out")
    thresholds: dict[str, Threshold] = Field(
        default_factory=dict, description="'stage.column': {min, max, max_abs}; replaces that stage's own decision"
    )
    where: str | None = Field(None, description="one SQL predicate over tables/samples columns (stage__column)")
    ignore_decisions: tuple[str, ...] = Field((), description="stages whose own keep decision is ignored")
    image_format: Literal["png", "jpg"] | None = Field(None, description="None keeps the bytes as they are")
    metadata_columns: tuple[str, ...] = Field(
        (), description="'stage.column' values copied into each sample's .json (e.g. labels.pose_bin)"
    )
    extra_members: dict[str, str] = Field(
        default_factory=dict,
        description="tar extension -> 'stage.column' of bytes written beside the image, e.g. "
        "{'degraded.png': 'degrade.degraded'} for (degraded, clean) enhancement pairs",
    )
    license: str = Field("other", pattern=r"^[a-z0-9][a-z0-9.+\-]*$",
                         description="the dataset card's license: a Hugging Face Hub license id (cc-by-4.0, mit, "
                         "other, ...)")
    description: str = Field("", max_length=4000, description="one paragraph for the dataset card")
    pretty_name: str | None = Field(None, max_length=200, description="the dataset card's title")
    task_memory_gb: float = Field(1.0, gt=0.0, le=512.0, description="memory declared by each export task")
    rows_per_task: int = Field(50_000, ge=1, description="samples a plan or writer task handles at most")

    @field_validator("where")
    @classmethod
    def _one_predicate(cls, value: str | None) -> str | None:
        if value is not None:
            predicate_sql(value)  # refuses anything but one predicate; the plan splices its re-emitted form
        return value
