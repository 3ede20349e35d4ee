"""The procedural renderer as a source stage: identities table in, face PNGs with ground truth out.

It is the quickstart's generator (no diffusion weights exist offline). The sample plan, sample ids
and the per-image perturbation come from ``GeneratorSource``; this class only turns rows into
pixels. Every ground-truth fact the renderer knows (pose, expression, light, accessories) becomes a
``gt_`` column, so detectors, pose and attribute stages can be scored against the truth.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.imaging import encode_png
from facekit.renderer.render import RENDERER_REVISION, render_sample
from stages.base import (
    IDENTITY_ID,
    IMAGE,
    IMAGE_EXT,
    KEEP,
    KEY,
    REASON,
    SAMPLE_ID,
    STATUS,
    STATUS_ERROR,
    STATUS_OK,
    Batch,
    ModelInfo,
    Params,
    Resources,
    sample_seed,
)
from stages.sources.generation import GeneratorSource

# Ground-truth keys of ``render_sample`` and their Arrow types; columns are these names with ``gt_``.
GROUND_TRUTH_TYPES: dict[str, pa.DataType] = {
    "yaw": pa.float32(),
    "pitch": pa.float32(),
    "roll": pa.float32(),
    "smile": pa.float32(),
    "mouth_open": pa.float32(),
    "eyes_closed": pa.float32(),
    "light_azimuth": pa.float32(),
    "light_elevation": pa.float32(),
    "light_intensity": pa.float32(),
    "glasses": pa.bool_(),
    "hair_lock": pa.float32(),
    "background": pa.string(),
    "blur": pa.float32(),
    "noise": pa.float32(),
    "hair_style": pa.string(),
    "beard": pa.bool_(),
    "moustache": pa.bool_(),
    "skin_tone": pa.float32(),
    "age": pa.float32(),
}
GT_PREFIX = "gt_"


class RenderParams(Params):
    """Everything here changes the pixels, so it is part of every sample id."""

    size: int = Field(256, ge=64, le=1024, description="output side in pixels (square)")
    max_yaw: float = Field(20.0, ge=0.0, le=40.0,
                           description="largest |yaw| in degrees, reached at the largest sigma")
    image_format: Literal["png"] = Field("png", description="lossless only: later stages measure pixels")


class RenderStage(GeneratorSource):
    name: ClassVar[str] = "render"
    version: ClassVar[str] = "1"
    params_model: ClassVar[type[Params]] = RenderParams
    resources: ClassVar[Resources] = Resources(cpus=1.0)  # single-threaded numpy + OpenCV
    batch_size: ClassVar[int] = 32
    columns: ClassVar[tuple[pa.Field, ...]] = tuple(
        pa.field(GT_PREFIX + k, t) for k, t in GROUND_TRUTH_TYPES.items()
    )
    params: RenderParams

    def setup(self) -> None:
        import cv2

        # One worker = one declared CPU: OpenCV's own thread pool would oversubscribe the node.
        cv2.setNumThreads(1)

    def model_info(self) -> ModelInfo:
        return ModelInfo(name="procedural-face-renderer", revision=RENDERER_REVISION)

    def render_batch(self, rows: list[dict[str, Any]]) -> Batch:
        """Render rows of (sample_id, key, identity_id, identity_vector, perturbed_vector,
        perturbation_sigma); a row that cannot be rendered becomes an error row, never an exception."""
        out: Batch = {c: [] for c in (SAMPLE_ID, KEY, IDENTITY_ID, IMAGE, IMAGE_EXT, STATUS, KEEP, REASON)}
        for f in self.columns:
            out[f.name] = []
        for row in rows:
            out[SAMPLE_ID].append(row[SAMPLE_ID])
            out[KEY].append(row.get(KEY, row[SAMPLE_ID]))
            out[IDENTITY_ID].append(row.get(IDENTITY_ID))
            try:
                img, truth = self._render(row)
            except (ValueError, TypeError, KeyError) as exc:
                reason = f"render failed: {type(exc).__name__}: {exc}"
                for col, value in ((IMAGE, None), (IMAGE_EXT, None), (STATUS, STATUS_ERROR), (KEEP, False),
                                   (REASON, reason)):
                    out[col].append(value)
                for f in self.columns:
                    out[f.name].append(None)
                continue
            out[IMAGE].append(encode_png(img))
            out[IMAGE_EXT].append(self.params.image_format)
            out[STATUS].append(STATUS_OK)
            out[KEEP].append(True)
            out[REASON].append(None)
            for k in GROUND_TRUTH_TYPES:
                out[GT_PREFIX + k].append(truth[k])
        return out

    def _render(self, row: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        vec = np.asarray(row["identity_vector"], np.float64)
        pert = row.get("perturbed_vector")
        pert_arr = None if pert is None else np.asarray(pert, np.float64)
        seed = sample_seed(self.context.seed, row[SAMPLE_ID], "render")
        return render_sample(vec, pert_arr, seed, self.params.size, float(row.get("perturbation_sigma", 0.0)),
                             self.params.max_yaw)
