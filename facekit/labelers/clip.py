"""Zero-shot attribute labels with CLIP: expression, glasses, hair, age group, with probabilities.

Each attribute is a set of labels, each with a prompt; an image's label is the argmax of CLIP's
softmax over that attribute's prompts. The whole distribution is stored (a map column), not only
the winner, so a balance report or an export can re-bin or demand a minimum confidence later
without running CLIP again. Zero-shot labels are noisy on faces (CLIP was never trained for them):
treat them as coarse strata for balancing, not as ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from facekit.backends.clip import ClipModel, ClipSpec, check_files
from facekit.common import IMAGE, SAMPLE_ID, Batch, ModelInfo, Params
from facekit.imaging import decode_images


class LabelAttribute(Params):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    prompts: dict[str, str]  # label -> prompt, in display order

    @field_validator("prompts")
    @classmethod
    def _two_or_more(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) < 2:
            raise ValueError("an attribute needs at least two labels")
        return v


def _attr(name: str, prompts: dict[str, str]) -> LabelAttribute:
    return LabelAttribute(name=name, prompts=prompts)


DEFAULT_ATTRIBUTES: tuple[LabelAttribute, ...] = (
    _attr("expression", {
        "neutral": "a photo of a face with a neutral expression",
        "smiling": "a photo of a smiling face",
        "laughing": "a photo of a laughing face",
        "surprised": "a photo of a surprised face",
        "angry": "a photo of an angry face",
        "sad": "a photo of a sad face",
    }),
    _attr("glasses", {
        "none": "a photo of a face without glasses",
        "eyeglasses": "a photo of a face wearing eyeglasses",
        "sunglasses": "a photo of a face wearing sunglasses",
    }),
    _attr("hair", {
        "black": "a photo of a person with black hair",
        "brown": "a photo of a person with brown hair",
        "blond": "a photo of a person with blond hair",
        "red": "a photo of a person with red hair",
        "gray": "a photo of a person with gray or white hair",
        "bald": "a photo of a bald person",
    }),
    _attr("age_group", {
        "child": "a photo of a child",
        "teenager": "a photo of a teenager",
        "young_adult": "a photo of a young adult",
        "middle_aged": "a photo of a middle-aged person",
        "senior": "a photo of an elderly person",
    }),
)


class ClipLabelerParams(Params):
    clip: ClipSpec = ClipSpec()
    attributes: tuple[LabelAttribute, ...] = DEFAULT_ATTRIBUTES
    image_column: str = IMAGE  # the aligned crop after align; the whole image before it
    prefix: str = "clip_"  # column prefix, so two labelers' "age_group" never collide


class ClipLabeler:
    """A ``stages.labelers.labels.Labeler``: decodes the batch's images and labels each; None where an image
    does not decode (the labels stage keeps the row)."""

    name = "clip"
    params_model: ClassVar[type[Params]] = ClipLabelerParams

    def __init__(self, params: ClipLabelerParams | Mapping[str, Any]) -> None:
        self.params = (params if isinstance(params, ClipLabelerParams)
                       else ClipLabelerParams.model_validate(dict(params)))

    @classmethod
    def doctor(cls, params: ClipLabelerParams) -> list[str]:
        return check_files(params.clip)

    def setup(self) -> None:
        self.model = ClipModel(self.params.clip)
        self.text = {a.name: self.model.embed_texts(list(a.prompts.values())) for a in self.params.attributes}

    def reads(self) -> tuple[str, ...]:
        return (self.params.image_column,) if self.params.image_column != IMAGE else ()

    def fields(self) -> tuple[pa.Field, ...]:
        """``<prefix><attr>`` label, ``..._prob`` its probability, ``..._probs`` every label's."""
        out: list[pa.Field] = []
        for a in self.params.attributes:
            col = self.params.prefix + a.name
            out += [pa.field(col, pa.string()), pa.field(f"{col}_prob", pa.float32()),
                    pa.field(f"{col}_probs", pa.map_(pa.string(), pa.float32()))]
        return tuple(out)

    def labels(self, batch: Batch) -> dict[str, list[Any]]:
        n = len(batch[SAMPLE_ID])
        images, _ = decode_images(batch.get(self.params.image_column) or [None] * n)
        good = [i for i in range(n) if images[i] is not None]
        rows = self.label([images[i] for i in good])  # type: ignore[misc]
        out: dict[str, list[Any]] = {f.name: [None] * n for f in self.fields()}
        for i, row in zip(good, rows, strict=True):
            for col, value in row.items():
                out[col][i] = value
        return out

    def label(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """One dict of label columns per RGB image."""
        if not images:
            return []
        emb = self.model.embed_images(images)
        rows: list[dict[str, Any]] = [{} for _ in images]
        for a in self.params.attributes:
            probs = self.model.probabilities(emb, self.text[a.name])
            names = list(a.prompts)
            col = self.params.prefix + a.name
            for row, p in zip(rows, probs, strict=True):
                best = int(np.argmax(p))
                row[col] = names[best]
                row[f"{col}_prob"] = float(p[best])
                row[f"{col}_probs"] = {n: float(v) for n, v in zip(names, p, strict=True)}
        return rows

    def model_info(self) -> ModelInfo:
        return self.model.model_info()
