"""The row vocabulary every floor shares: the common column names, the batch shape, and ``Rows``, the
one way a stage (per-shard or global) builds its output rows.

It sits below everything (no import of facekit, stages or pipeline) so that the manifests' schemas, the
toolbox, the stages and the engine spell a column one way and build a decision one way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# A batch is a column dict: ``{column: list}``, every list the same length (one entry per sample).
Batch = dict[str, list[Any]]

# Columns every batch carries between stages.
SAMPLE_ID = "sample_id"
KEY = "key"
IDENTITY_ID = "identity_id"
PARENT_ID = "parent_id"
IMAGE = "image"  # the encoded image bytes (never stored in a manifest: the shard tar holds them)
IMAGE_EXT = "image_ext"
# Where the image's bytes already lie outside the run (a member of a source tar: {tar, offset, size,
# crc32}, tar an absolute URL): the engine records that range instead of writing the bytes again.
IMAGE_SOURCE = "image_source"
# Decision columns every stage emits for every row.
STATUS = "status"
KEEP = "keep"
REASON = "reason"  # a stable rule name people group by: "sharpness_below_min", "no_face", "unreadable_image"
DETAIL = "detail"  # the human detail of that rule for this row: "10.2 < 20.0"
DECISION_COLUMNS: tuple[str, ...] = (STATUS, KEEP, REASON, DETAIL)
# Where a pixel-writing stage's image of a sample lies in its shard tar.
TAR_OFFSET = "tar_offset"
TAR_SIZE = "tar_size"
TAR_CRC32 = "tar_crc32"
OUTPUT_SHARD = "output_shard"

STATUS_OK = "ok"
STATUS_ERROR = "error"

DETAIL_LIMIT = 1000  # characters of a detail kept in a manifest row


@dataclass(frozen=True)
class Reason:
    """Why a row failed or was dropped: a stable rule name (snake_case; cards, reports and SQL group
    by it) and a detail with this row's numbers or message."""

    rule: str
    detail: str | None = None

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}" if self.detail else self.rule


def _detail(detail: object) -> str | None:
    return None if detail is None else str(detail)[:DETAIL_LIMIT]


class Rows:
    """The one way a stage builds its output rows.

    Pre-filled from the batch's sample ids with the default decision (status ok, kept, no reason) and
    every declared column empty; a stage sets values per row or per column and marks single rows as
    failed (``fail``: status error, something is wrong with this sample) or dropped (``drop``: a
    filter's or a global stage's decision). ``batch()`` is what ``process`` returns.
    """

    def __init__(self, sample_ids: Sequence[str], columns: Iterable[str] = ()) -> None:
        self.n = len(sample_ids)
        self.data: Batch = {
            SAMPLE_ID: list(sample_ids),
            STATUS: [STATUS_OK] * self.n,
            KEEP: [True] * self.n,
            REASON: [None] * self.n,
            DETAIL: [None] * self.n,
        }
        for c in columns:
            self.data.setdefault(c, [None] * self.n)

    def __len__(self) -> int:
        return self.n

    def append(self, sample_id: str, **values: Any) -> int:
        """Add a row (a stage that derives samples, one per face, builds its rows this way from an
        empty builder); returns its index, ready for ``set``/``fail``/``drop``."""
        for col in self.data:
            self.data[col].append(None)
        i = self.n
        self.n += 1
        self.data[SAMPLE_ID][i] = sample_id
        self.data[STATUS][i] = STATUS_OK
        self.data[KEEP][i] = True
        self.set(i, **values)
        return i

    def set(self, i: int, **values: Any) -> None:
        for col, value in values.items():
            column = self.data.get(col)
            if column is None:  # never build a default list per call: that is O(n) per row
                column = self.data[col] = [None] * self.n
            column[i] = value

    def column(self, name: str, values: Sequence[Any]) -> None:
        if len(values) != self.n:
            raise ValueError(f"column {name!r} has {len(values)} values for {self.n} rows")
        self.data[name] = list(values)

    def fail(self, i: int, rule: str, detail: object = None) -> None:
        self.data[STATUS][i] = STATUS_ERROR
        self.data[KEEP][i] = False
        self.data[REASON][i] = rule
        self.data[DETAIL][i] = _detail(detail)

    def drop(self, i: int, rule: str, detail: object = None) -> None:
        self.data[KEEP][i] = False
        self.data[REASON][i] = rule
        self.data[DETAIL][i] = _detail(detail)

    def failed(self, i: int) -> bool:
        return self.data[STATUS][i] != STATUS_OK

    def batch(self) -> Batch:
        return self.data


def rows_ok(sample_ids: Sequence[str]) -> Batch:
    """Decision columns for rows that all pass."""
    n = len(sample_ids)
    return {
        SAMPLE_ID: list(sample_ids),
        STATUS: [STATUS_OK] * n,
        KEEP: [True] * n,
        REASON: [None] * n,
    }
