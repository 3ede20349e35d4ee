"""The export config: what is selected, how it is split and sharded, and what the dataset card says.

``where`` is ONE boolean predicate over the columns of ``tables/samples`` (``stage__column``; see
``manifests.tables``). It is parsed by DuckDB's own parser and refused unless it is exactly one
row-level predicate: no second statement, no set operation, no subquery, no LIMIT. The plan splices
the form DuckDB re-emits from its parse tree, in parentheses, after the export's own conditions; it runs
on an in-memory connection whose external access is disabled, over the Arrow data of one partition.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from facekit.common import Strict
from manifests.sql import predicate_sql

WHERE_TABLE = "samples"


class Threshold(Strict):

    min: float | None = Field(None, description="keep values at or above this")
    max: float | None = Field(None, description="keep values at or below this")
    max_abs: float | None = Field(None, description="keep values whose absolute value is at or below this")


STAGE_COLUMN = r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$"


class Prefer(Strict):
    """Which images of an identity win when it has more than it may keep. ``score`` ranks them (best
    first); ``diversity`` spreads the choice: over the bins of a label column (round robin over the
    bins, each bin in ``score`` order) or over an embedding (farthest point: each next image is the one
    farthest from those already chosen). Ties and the default fall back to a hash of the sample id."""

    score: str | None = Field(None, pattern=STAGE_COLUMN, description="'stage.column' of a number")
    order: Literal["higher", "lower"] = Field("higher", description="which end of the score is better")
    diversity: str | None = Field(None, pattern=STAGE_COLUMN,
                                  description="'stage.column' of a label (bins) or of an embedding (vectors)")


class IdentityRank(Strict):
    """Which identities win under ``max_identities``: the most candidate images, the best mean of a
    score column, or a hash of the identity id; ties by identity id."""

    by: Literal["images", "score", "hash"] = Field(
        "images", description="rank identities by candidate images, by the mean of a score, or by a hash")
    score: str | None = Field(None, pattern=STAGE_COLUMN, description="'stage.column' averaged per identity")
    order: Literal["higher", "lower"] = Field("higher", description="which end of the mean score wins")

    @model_validator(mode="after")
    def _score_named(self) -> IdentityRank:
        if (self.by == "score") != (self.score is not None):
            raise ValueError("rank.score names the column exactly when rank.by is 'score'")
        return self


class Balance(Strict):
    """Target shares over the bins of a label column. ``level: image``: within each identity, its
    images follow the shares (so the dataset does too); ``level: identity``: the identities, each
    binned by the most frequent value of its images, follow the shares. Without ``fill`` the quota
    shrinks until every bin can meet its share exactly; with ``fill`` a short bin's place goes to
    the other bins. Either way what a bin lacks is reported."""

    column: str = Field(pattern=STAGE_COLUMN, description="'stage.column' of a label, e.g. labels.pose_bin")
    shares: dict[str, float] = Field(min_length=1, description="bin -> share; the shares sum to 1")
    level: Literal["image", "identity"] = Field(
        "image", description="image: each identity's images follow the shares; identity: the identities do")
    fill: bool = Field(False, description="give a short bin's place to the other bins")

    @field_validator("shares")
    @classmethod
    def _sum_to_one(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v <= 0 for v in value.values()):
            raise ValueError("every share must be above 0 (leave a bin out to give it none)")
        if abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"shares must sum to 1, not {sum(value.values()):g}")
        return value


class Identities(Strict):
    """Identity-level selection, after the row-level decisions: see pipeline.export.identities."""

    min_images: int | None = Field(None, ge=1, description="identities with fewer selected images are left "
                                   "out (rule identity_too_small); export.min_images_per_identity is its alias")
    max_images: int | None = Field(None, ge=1, description="images kept per identity at most (rule over_quota)")
    target_images: int | None = Field(None, ge=1, description="images wanted per identity: identities short of "
                                      "it are counted in the card and report (refill generates more)")
    max_identities: int | None = Field(None, ge=1, description="identities kept at most (rule over_max_identities)")
    rank: IdentityRank = Field(IdentityRank(), description="which identities win under max_identities")
    prefer: Prefer = Field(Prefer(), description="which images win within an identity")
    balance: Balance | None = Field(None, description="target shares over a label column (rule balance)")

    @model_validator(mode="after")
    def _ordered(self) -> Identities:
        lo, target, hi = self.min_images, self.target_images, self.max_images
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_images ({lo}) is above max_images ({hi})")
        if target is not None and hi is not None and target > hi:
            raise ValueError(f"target_images ({target}) is above max_images ({hi})")
        return self


class Splits(Strict):
    """How identities are split, and the leak checks before the split is written."""

    stratify: str | None = Field(None, pattern=STAGE_COLUMN, description="'stage.column' of a label: each "
                                 "bin (of an identity's most frequent value) holds out val_fraction of its identities")
    lookalikes: Literal["together", "flag"] = Field(
        "together", description="identities whose centroids verify as one person: kept on one side, or only "
        "listed in the card")
    embedding: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the stage whose "
                                  "embedding is compared (default: the one stage with an embedding column)")
    threshold: float | None = Field(None, description="look-alike threshold in the space's metric; null: fitted "
                                    "from the run's own identities at lookalike_rate")
    lookalike_rate: float | None = Field(
        0.01, gt=0.0, lt=1.0, description="share of identities that may get a false look-alike partner: the "
        "centroid pairs of the run's distinct identities set the threshold (never looser than the space's "
        "verification point); null: the verification point itself")
    image_check: int = Field(2000, ge=0, description="validation images (a hash sample) whose nearest training "
                             "image is measured for the card")


class ExportConfig(Strict):

    enabled: bool = Field(True, description="write the export after the stages")
    shard_size: int = Field(1000, ge=1, description="target samples per training shard")
    min_shards_per_split: int = Field(
        8, ge=1, description="at least this many shards per split (one per data-loader worker) when the split "
        "has that many samples; the card warns when it has fewer")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of identities held out")
    min_images_per_identity: int = Field(2, ge=1, description="alias of identities.min_images")
    identities: Identities = Field(Identities(), description="quotas, balance and which images and identities win")
    splits: Splits = Field(Splits(), description="stratification and leak checks of the identity split")
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

    @model_validator(mode="before")
    @classmethod
    def _alias_follows(cls, data: Any) -> Any:
        """A config that names only identities.min_images carries the same value in its alias, so the
        frozen run.yaml (which writes every key) loads again as the same setting."""
        if isinstance(data, dict) and "min_images_per_identity" not in data:
            ids = data.get("identities")
            given = ids.get("min_images") if isinstance(ids, dict) else getattr(ids, "min_images", None)
            if given is not None:
                data = {**data, "min_images_per_identity": given}
        return data

    @model_validator(mode="after")
    def _one_minimum(self) -> ExportConfig:
        given = self.identities.min_images
        if given is not None and "min_images_per_identity" in self.model_fields_set and (
                given != self.min_images_per_identity):
            raise ValueError(f"identities.min_images ({given}) and its alias min_images_per_identity "
                             f"({self.min_images_per_identity}) differ: set one")
        if self.identities.max_images is not None and self.min_images > self.identities.max_images:
            raise ValueError(f"the minimum images per identity ({self.min_images}) is above identities.max_images "
                             f"({self.identities.max_images})")
        return self

    @property
    def min_images(self) -> int:
        """The minimum images per identity: identities.min_images, else its alias."""
        return self.identities.min_images or self.min_images_per_identity

    def column_refs(self) -> list[tuple[str, str]]:
        """(key path, 'stage.column') of every column the export reads besides ``where``."""
        refs = [(f"export.thresholds.{t}", t) for t in self.thresholds]
        refs += [(f"export.metadata_columns[{i}]", t) for i, t in enumerate(self.metadata_columns)]
        refs += [(f"export.extra_members.{k}", t) for k, t in self.extra_members.items()]
        ids = self.identities
        for where, target in (("export.identities.prefer.score", ids.prefer.score),
                              ("export.identities.prefer.diversity", ids.prefer.diversity),
                              ("export.identities.rank.score", ids.rank.score),
                              ("export.identities.balance.column", ids.balance.column if ids.balance else None),
                              ("export.splits.stratify", self.splits.stratify)):
            if target:
                refs.append((where, target))
        return refs

    @field_validator("where")
    @classmethod
    def _one_predicate(cls, value: str | None) -> str | None:
        if value is not None:
            predicate_sql(value)  # refuses anything but one predicate; the plan splices its re-emitted form
        return value
