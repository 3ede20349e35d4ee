"""embed: identity embedding of each aligned crop, with the space and metric it must be compared in.

Thresholds only mean something within one embedding space (dlib distances vs ArcFace cosines), so
every row names its space and metric next to the vector. The vector column's width depends on the
backend; it is declared from the params (``dim``, default per backend) before any model loads, and
``setup`` checks the loaded model against it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from facekit.backends.base import BackendParams, FaceEmbedder
from facekit.imaging import ImageError, decode_rgb
from stages.base import IMAGE, Batch, ModelInfo, Resources
from stages.mappers.backend_stage import BackendStage

# Width of each backend's vectors when ``dim`` is not given (insightface: the released 512-d packs).
DEFAULT_DIMS: dict[str, int] = {"dlib": 128, "sface": 128, "insightface": 512}


class EmbedParams(BackendParams):
    dim: int | None = Field(None, ge=1, description="embedding width; None: the backend's default")
    image_column: str = Field(IMAGE, description="column with the ArcFace-framed crop (align's image, "
                                                 "or its larger crop_extra)")

    @model_validator(mode="after")
    def _known_dim(self) -> EmbedParams:
        if self.dim is None and self.backend not in DEFAULT_DIMS:
            raise ValueError(f"set dim: backend {self.backend!r} has no default embedding width")
        return self

    @property
    def width(self) -> int:
        return self.dim if self.dim is not None else DEFAULT_DIMS[self.backend]


def embedding_fields(dim: int) -> tuple[pa.Field, ...]:
    return (
        pa.field("embedding", pa.list_(pa.float32(), dim)),
        pa.field("embedding_space", pa.string()),  # e.g. dlib-resnet-128, arcface-w600k_r50-512
        pa.field("embedding_metric", pa.string()),  # euclidean (lower = same) or cosine (higher = same)
    )


class EmbedStage(BackendStage[EmbedParams]):
    """Embeds each aligned crop as an identity vector, recording the space and metric it compares in."""

    name: ClassVar[str] = "embed"
    role: ClassVar[Literal["detector", "embedder"]] = "embedder"
    version: ClassVar[str] = "2"
    resources: ClassVar[Resources] = Resources(cpus=0.5, memory_gb=1.0)
    batch_size: ClassVar[int] = 32
    # The default backend's columns; output_fields() is authoritative (it reads dim from the params).
    columns: ClassVar[tuple[pa.Field, ...]] = embedding_fields(DEFAULT_DIMS["dlib"])

    def output_fields(self) -> tuple[pa.Field, ...]:
        return embedding_fields(self.params.width)

    def input_columns(self) -> tuple[str, ...]:
        return () if self.params.image_column == IMAGE else (self.params.image_column,)

    def setup(self) -> None:
        self.embedder: FaceEmbedder = self.build_model()
        if self.embedder.dim != self.params.width:
            got, want = self.embedder.dim, self.params.width
            raise ValueError(f"embed: the {self.params.backend} model gives {got}-d vectors but the stage "
                             f"declares {want}; set params.dim: {got}")

    def model_info(self) -> ModelInfo:
        embedder = getattr(self, "embedder", None)
        return embedder.model_info() if embedder is not None else ModelInfo()

    def process(self, batch: Batch) -> Batch:
        rows = self.rows(batch)
        column = self.params.image_column
        images = batch.get(column) or [None] * len(rows)
        crops, good = [], []
        for i in range(len(rows)):
            if images[i] is None:
                rows.fail(i, "no_aligned_crop", f"no {column}")
                continue
            try:
                rgb = decode_rgb(images[i])
            except ImageError as exc:
                rows.fail(i, exc.rule, exc.detail)
                continue
            if rgb.shape[0] != rgb.shape[1]:
                rows.fail(i, "not_an_aligned_crop", f"{rgb.shape[1]}x{rgb.shape[0]}; run align first")
                continue
            crops.append(rgb)
            good.append(i)
        vectors = self.embedder.embed(crops) if crops else np.zeros((0, self.params.width), np.float32)
        vectors = np.asarray(vectors, dtype=np.float32)
        for i, vec in zip(good, vectors, strict=True):
            rows.set(i, embedding=vec, embedding_space=self.embedder.space, embedding_metric=self.embedder.metric)
        return rows.batch()
