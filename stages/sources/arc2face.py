"""The "arc2face" generator stage: the run's identities rendered as photos by Arc2Face.

The shared generator plan (stages.sources.generation) gives each sample its identity vector and its
per-image perturbed vector; this stage conditions Arc2Face on one of them, draws the starting noise
from the sample's own seed and returns PNG bytes. The identity vector lives in the generator's own
space (ArcFace as Arc2Face was trained on it); the curation embedder that later checks identity
consistency is a separate model, so its cosines are not the sampler's cosines.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from facekit.backends.arc2face import Arc2Face, Arc2FaceSpec, GenerationSettings
from facekit.imaging import ImageError, decode_rgb, encode_png
from stages.base import SAMPLE_ID, Batch, ModelInfo, Params, Resources, StageContext, sample_seed, stable_hash
from stages.sources.generation import GeneratorSource

POSE_COLUMN = "pose_image"
# Params that change how samples are computed but not which samples exist or their pixels (on CPU fp32
# a test proves batch composition does not change pixels), so they stay out of the sample id.
EXECUTION_ONLY = frozenset({"batch_size", "allow_download"})


class Arc2FaceParams(Arc2FaceSpec):
    steps: int = Field(25, ge=1, le=1000, description="DPM-Solver++ steps (Arc2Face's default: 25)")
    guidance: float = Field(3.0, ge=0.0, description="classifier-free guidance; <= 1 turns it off")
    size: int = Field(512, ge=8, multiple_of=8, description="square output side; Arc2Face is trained at 512")
    batch_size: int = Field(8, ge=1, description="samples per pipeline call (x2 inside with guidance)")
    condition_on: Literal["perturbed", "identity"] = Field(
        "perturbed",
        description="'perturbed': the per-image vector from identities.perturbation (intra-class spread); "
        "'identity': the identity vector itself, so images differ only by their noise seed",
    )


class Arc2FaceStage(GeneratorSource[Arc2FaceParams]):
    """Renders the run's identities as photo-like faces with Arc2Face (Stable Diffusion 1.5, one GPU per worker)."""

    name: ClassVar[str] = "arc2face"
    version: ClassVar[str] = "1"
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=1.0)
    batch_size: ClassVar[int] = 8
    columns: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("seed", pa.uint64()),
        pa.field("steps", pa.int32()),
        pa.field("guidance", pa.float32()),
        pa.field("size", pa.int32()),
        pa.field("conditioned_on", pa.string()),
    )

    def __init__(self, params: Arc2FaceParams, context: StageContext) -> None:
        super().__init__(params, context)
        self.model: Arc2Face | None = None

    def sample_id(self, identity_id: str, variant: int) -> str:
        params = self.params.model_dump(mode="json", exclude=set(EXECUTION_ONLY))
        return stable_hash([identity_id, variant, self.name, self.version, params], 24)

    @classmethod
    def doctor(cls, params: Params) -> list[str]:
        from pathlib import Path

        from facekit.backends.arc2face import ModelFilesError, check_folder, resolve_base_model

        p = params if isinstance(params, Arc2FaceParams) else Arc2FaceParams.model_validate(params)
        problems = []
        checks = [(p.arc2face_dir, "arc2face"), (p.encoder_dir, "encoder")]
        if p.controlnet_dir:
            checks.append((p.controlnet_dir, "controlnet"))
        for folder, role in checks:
            try:
                check_folder(Path(folder).expanduser(), role)
            except ModelFilesError as exc:
                problems.append(str(exc))
        try:
            resolve_base_model(p.base_model, allow_download=False)
        except ModelFilesError as exc:
            problems.append(str(exc))
        return problems

    def setup(self) -> None:
        if self.model is None:
            self.model = Arc2Face.load(self.params)

    def model_info(self) -> ModelInfo:
        return self.model.info if self.model is not None else ModelInfo(name="arc2face")

    def _pose(self, row: dict[str, Any]) -> np.ndarray:
        data = row.get(POSE_COLUMN)
        if data is None:
            raise ImageError(
                f"the pose ControlNet is loaded but the sample has no {POSE_COLUMN!r} (a pose conditioning "
                "image: Arc2Face's demo uses a FLAME normal-map render from EMOCA); unset controlnet_dir "
                "to generate without pose control"
            )
        return decode_rgb(data)

    def render_batch(self, rows: list[dict[str, Any]]) -> Batch:
        self.setup()
        assert self.model is not None
        p = self.params
        n = len(rows)
        seeds = [sample_seed(self.context.seed, r[SAMPLE_ID], "arc2face") for r in rows]
        vector_key = "perturbed_vector" if p.condition_on == "perturbed" else "identity_vector"
        out = self.generated_rows(rows)
        out.column("seed", seeds)
        for col, value in (("steps", p.steps), ("guidance", p.guidance), ("size", p.size),
                           ("conditioned_on", p.condition_on)):
            out.column(col, [value] * n)
        # Check every row first, so one bad row becomes an error row instead of failing its batch.
        good: list[int] = []
        vectors: list[np.ndarray] = []
        poses: list[np.ndarray] = []
        for i, row in enumerate(rows):
            try:
                vec = np.asarray(row[vector_key], dtype=np.float32)
                if vec.ndim != 1 or vec.shape[0] > self.model.width:
                    raise ValueError(
                        f"identity vector has shape {vec.shape}; expected (d,) with d <= {self.model.width}"
                    )
                if not np.isfinite(vec).all() or not np.any(vec):
                    raise ValueError("identity vector is not finite or is zero")
                if self.model.has_controlnet:
                    poses.append(self._pose(row))
            except ImageError as exc:
                out.fail(i, "no_pose_image", exc)
                continue
            except (ValueError, KeyError, TypeError) as exc:
                out.fail(i, "bad_identity_vector", exc)
                continue
            good.append(i)
            vectors.append(vec)
        if good:
            settings = GenerationSettings(steps=p.steps, guidance=p.guidance, height=p.size, width=p.size)
            images = self.model.generate(
                np.stack(vectors),
                [seeds[i] for i in good],
                settings,
                pose_images=poses if self.model.has_controlnet else None,
            )
            for i, rgb in zip(good, images, strict=True):
                out.set(i, image=encode_png(rgb), image_ext="png")
        return out.batch()
