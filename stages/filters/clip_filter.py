"""Stage "clip_filter": zero-shot prompt-pair scores (CLIP-IQA style) and CLIP image embeddings.

Each pair compares a positive and a negative prompt ("a sharp photo of a face" vs "a blurry photo of
a face"); the score is the softmax probability of the positive one, which CLIP-IQA showed tracks
perceived quality better than a single prompt's raw similarity. Every pair's probability is stored
as its own column (``clip_<name>``) so an export can re-threshold it; the embedding column feeds
dedup. A sample whose bytes do not decode gets an error row; the rest of the batch goes on.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from facekit.backends.clip import ClipModel, ClipSpec, check_files
from facekit.imaging import ImageError, decode_rgb
from stages.base import IMAGE, Batch, Checks, FilterStage, ModelInfo, Params, Reason, Resources, Rows

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class PromptPair(Params):
    name: str = Field(pattern=NAME_PATTERN, description="the pair's name: its score column is clip_<name>")
    positive: str = Field(description="the prompt a good image matches")
    negative: str = Field(description="the prompt a bad image matches")
    min_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="drop when the positive prompt's softmax probability is below this")


DEFAULT_PAIRS: tuple[PromptPair, ...] = (
    PromptPair(name="sharp", positive="a sharp photo of a face", negative="a blurry photo of a face"),
    PromptPair(name="photo", positive="a photograph of a person", negative="a drawing of a person"),
)


class ClipFilterParams(Params):
    clip: ClipSpec = Field(ClipSpec(), description="the CLIP model and where its weights are")
    pairs: tuple[PromptPair, ...] = Field(DEFAULT_PAIRS, description="prompt pairs scored per image")
    store_embedding: bool = Field(True, description="store the CLIP image embedding (clip_embedding) beside the scores")

    @model_validator(mode="after")
    def _unique_names(self) -> ClipFilterParams:
        names = [p.name for p in self.pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt pair names must be unique, got {names}")
        return self


class ClipFilterStage(FilterStage[ClipFilterParams]):
    """Scores each image on CLIP prompt pairs (positive vs negative) and drops it below a pair's minimum."""

    name: ClassVar[str] = "clip_filter"
    version: ClassVar[str] = "2"
    resources: ClassVar[Resources] = Resources(cpus=1.0, memory_gb=2.0)
    batch_size: ClassVar[int] = 64

    @classmethod
    def doctor(cls, params: Params) -> list[str]:
        """What would stop ``setup`` (missing weights and where they were looked for); loads nothing."""
        assert isinstance(params, ClipFilterParams)
        return check_files(params.clip)

    def output_fields(self) -> tuple[pa.Field, ...]:
        fields = [pa.field(f"clip_{p.name}", pa.float32()) for p in self.params.pairs]
        if self.params.store_embedding:
            fields += [pa.field("clip_embedding", pa.list_(pa.float32())),
                       pa.field("clip_space", pa.string())]
        return tuple(fields)

    def setup(self) -> None:
        self.model = ClipModel(self.params.clip)
        prompts = [t for p in self.params.pairs for t in (p.positive, p.negative)]
        self.text = self.model.embed_texts(prompts) if prompts else np.zeros((0, self.model.dim), np.float32)

    def model_info(self) -> ModelInfo:
        return self.model.model_info()

    def score(self, batch: Batch, rows: Rows) -> None:
        images: list[np.ndarray | None] = []
        for i, data in enumerate(batch[IMAGE]):
            try:
                images.append(decode_rgb(data))
            except ImageError as exc:
                rows.fail(i, exc.rule, exc.detail)
                images.append(None)
        good = [i for i in range(len(rows)) if images[i] is not None]
        emb = self.model.embed_images([img for img in images if img is not None])
        for k, pair in enumerate(self.params.pairs):
            probs = self.model.probabilities(emb, self.text[2 * k : 2 * k + 2])[:, 0]
            for j, i in enumerate(good):
                rows.set(i, **{f"clip_{pair.name}": float(probs[j])})
        if self.params.store_embedding:
            for j, i in enumerate(good):
                rows.set(i, clip_embedding=emb[j], clip_space=self.model.space)

    def decide(self, scores: dict[str, Any]) -> Reason | None:
        checks = Checks()
        for p in self.params.pairs:
            checks.min(f"clip_{p.name}", scores[f"clip_{p.name}"], p.min_prob)
        return checks.reason()

    def thresholds(self) -> dict[str, dict[str, float]]:
        return {f"clip_{p.name}": {"min": p.min_prob} for p in self.params.pairs}


__all__ = ["DEFAULT_PAIRS", "ClipFilterParams", "ClipFilterStage", "PromptPair"]
