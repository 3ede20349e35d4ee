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
from stages.base import SAMPLE_ID, Batch, ModelInfo, Params, Resources, sample_seed
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


class RenderStage(GeneratorSource[RenderParams]):
    """Renders the run's identities as procedural face images that know their ground truth (identity, pose, light)."""

    name: ClassVar[str] = "render"
    version: ClassVar[str] = "1"
    resources: ClassVar[Resources] = Resources(cpus=1.0)  # single-threaded numpy + OpenCV
    batch_size: ClassVar[int] = 32
    columns: ClassVar[tuple[pa.Field, ...]] = tuple(
        pa.field(GT_PREFIX + k, t) for k, t in GROUND_TRUTH_TYPES.items()
    )

    def setup(self) -> None:
        import cv2

        # One worker = one declared CPU: OpenCV's own thread pool would oversubscribe the node.
        cv2.setNumThreads(1)

    def model_info(self) -> ModelInfo:
        return ModelInfo(name="procedural-face-renderer", revision=RENDERER_REVISION)

    def render_batch(self, rows: list[dict[str, Any]]) -> Batch:
        """Render rows of (sample_id, key, identity_id, identity_vector, perturbed_vector,
        perturbation_sigma); a row that cannot be rendered becomes an error row, never an exception."""
        out = self.generated_rows(rows, [f.name for f in self.columns])
        for i, row in enumerate(rows):
            try:
                img, truth = self._render(row)
            except (ValueError, TypeError, KeyError) as exc:
                out.fail(i, "render_failed", f"{type(exc).__name__}: {exc}")
                continue
            out.set(i, image=encode_png(img), image_ext=self.params.image_format,
                    **{GT_PREFIX + k: truth[k] for k in GROUND_TRUTH_TYPES})
        return out.batch()

    def _render(self, row: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        vec = np.asarray(row["identity_vector"], np.float64)
        pert = row.get("perturbed_vector")
        pert_arr = None if pert is None else np.asarray(pert, np.float64)
        seed = sample_seed(self.context.seed, row[SAMPLE_ID], "render")
        return render_sample(vec, pert_arr, seed, self.params.size, float(row.get("perturbation_sigma", 0.0)),
                             self.params.max_yaw)
