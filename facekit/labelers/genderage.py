"""insightface genderage labeler: perceived gender and age from the pack's ``genderage.onnx``.

The model was trained on crops centred on a detector box, 1.5x its larger side. Given an aligned
ArcFace-template crop (no box), the whole crop stands in for the box, which frames the face about
as SCRFD's box does. Labels are the model's perception, for balancing strata, not identity facts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.backends.insightface import InsightFaceSpec, file_digest, load_model
from facekit.common import IMAGE, SAMPLE_ID, Batch, ModelInfo, Params
from facekit.imaging import decode_images

Box = tuple[float, float, float, float]
# Same bins as the CLIP labeler's age_group prompts, so the two can be compared.
AGE_BINS: tuple[tuple[int, str], ...] = ((13, "child"), (20, "teenager"), (36, "young_adult"),
                                         (60, "middle_aged"), (1000, "senior"))


def age_group(age: float) -> str:
    return next(name for upper, name in AGE_BINS if age < upper)


class GenderAgeParams(Params):
    """Where the pack and its genderage file are, and where the faces are in the batch."""

    model_dir: str
    genderage: str | None = None  # file name; None: genderage.onnx
    providers: tuple[str, ...] | None = None
    threads: int = Field(0, ge=0)
    image_column: str = IMAGE  # aligned crops after align
    box_column: str | None = None  # e.g. face_box, only when the images are detect's own inputs
    prefix: str = "genderage_"


def check_files(params: GenderAgeParams | Mapping[str, Any]) -> list[str]:
    """Problems finding the genderage file (empty: found). For ``doctor``."""
    from facekit.backends.insightface import check_files as pack_problems

    p = params if isinstance(params, GenderAgeParams) else GenderAgeParams.model_validate(dict(params))
    return pack_problems({"model_dir": p.model_dir, "genderage": p.genderage}, uses=("genderage",))


class GenderAgeLabeler:
    """A ``stages.labelers.labels.Labeler``: ``<prefix>gender`` (female/male), ``..._gender_prob``, ``..._age``
    and ``..._age_group``; None where an image does not decode."""

    name = "genderage"
    params_model: ClassVar[type[Params]] = GenderAgeParams

    def __init__(self, params: GenderAgeParams | Mapping[str, Any]) -> None:
        if not isinstance(params, GenderAgeParams):
            params = GenderAgeParams.model_validate(dict(params))
        self.params = params
        self.prefix = self.params.prefix

    @classmethod
    def doctor(cls, params: GenderAgeParams) -> list[str]:
        return check_files(params)

    def setup(self) -> None:
        p = self.params
        spec = InsightFaceSpec(model_dir=p.model_dir, genderage=p.genderage, providers=p.providers,
                               threads=p.threads, with_pose=False)
        self.model = load_model(spec, "genderage")

    def reads(self) -> tuple[str, ...]:
        p = self.params
        return tuple(c for c in (p.image_column if p.image_column != IMAGE else None, p.box_column) if c)

    def fields(self) -> tuple[pa.Field, ...]:
        p = self.prefix
        return (pa.field(f"{p}gender", pa.string()), pa.field(f"{p}gender_prob", pa.float32()),
                pa.field(f"{p}age", pa.float32()), pa.field(f"{p}age_group", pa.string()))

    def labels(self, batch: Batch) -> dict[str, list[Any]]:
        n = len(batch[SAMPLE_ID])
        images, _ = decode_images(batch.get(self.params.image_column) or [None] * n)
        col = self.params.box_column
        boxes = batch.get(col) if col else None
        good = [i for i in range(n) if images[i] is not None and (boxes is None or boxes[i] is not None)]
        rows = self.label([images[i] for i in good],  # type: ignore[misc]
                          [tuple(boxes[i]) for i in good] if boxes is not None else None)
        out: dict[str, list[Any]] = {f.name: [None] * n for f in self.fields()}
        for i, row in zip(good, rows, strict=True):
            for key, value in row.items():
                out[key][i] = value
        return out

    def _crop(self, bgr: np.ndarray, box: Box) -> np.ndarray:
        """insightface's own Attribute crop: centred on the box, 1.5x its larger side, 96x96."""
        from insightface.utils import face_align

        x0, y0, x1, y1 = (float(v) for v in box)
        side = self.model.input_size[0]
        scale = side / (max(x1 - x0, y1 - y0, 1.0) * 1.5)
        crop, _ = face_align.transform(bgr, ((x0 + x1) / 2, (y0 + y1) / 2), side, scale, 0)
        return crop

    def label(self, images: list[np.ndarray],
              boxes: Sequence[Box | None] | None = None) -> list[dict[str, Any]]:
        """One row per image; ``boxes`` (image pixels) when the images are not aligned crops."""
        import cv2

        if not images:
            return []
        m = self.model
        crops = []
        for i, rgb in enumerate(images):
            box = boxes[i] if boxes is not None else None
            box = box if box is not None else (0.0, 0.0, float(rgb.shape[1]), float(rgb.shape[0]))
            crops.append(self._crop(np.ascontiguousarray(rgb[..., ::-1]), box))  # insightface takes BGR
        blob = cv2.dnn.blobFromImages(crops, 1.0 / m.input_std, m.input_size, (m.input_mean,) * 3,
                                      swapRB=True)
        batch = m.input_shape[0]
        if isinstance(batch, int) and batch == 1:
            raw = np.concatenate([m.session.run(m.output_names, {m.input_name: blob[i : i + 1]})[0]
                                  for i in range(len(crops))])
        else:
            raw = m.session.run(m.output_names, {m.input_name: blob})[0]
        rows, p = [], self.prefix
        for pred in np.asarray(raw, dtype=np.float64):
            logits = pred[:2] - pred[:2].max()
            probs = np.exp(logits) / np.exp(logits).sum()
            age = float(np.round(pred[2] * 100))  # insightface: age = round(output * 100)
            gender = "male" if int(np.argmax(pred[:2])) == 1 else "female"  # insightface: 1 = male
            rows.append({f"{p}gender": gender, f"{p}gender_prob": float(probs.max()), f"{p}age": age,
                         f"{p}age_group": age_group(age)})
        return rows

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=f"insightface:{self.model.path.name}", revision=file_digest([self.model.path]))
