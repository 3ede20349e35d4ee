"""Pose bins from the head-pose scores already in the batch: a labeler with no model."""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from facekit.common import SAMPLE_ID, Batch, ModelInfo, Params


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

    def reads(self) -> tuple[str, ...]:
        return (self.params.yaw_column, self.params.pitch_column)

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
