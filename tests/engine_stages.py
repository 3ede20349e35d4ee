"""Small real stages for exercising the engine in tests (plugged in as ``tests.engine_stages:Class``).

They use the same base classes and runner as the built-in stages; they only avoid model loading so
engine tests stay fast.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from stages.base import IMAGE, SAMPLE_ID, Batch, FilterStage, Params, Resources, Stage, StageKind, sample_seed
from stages.generation import GeneratorSource
from stages.imaging import decode_rgb, encode_png


class PatternParams(Params):
    size: int = 32


class PatternSource(GeneratorSource):
    """Images whose colour comes from the identity vector and whose noise comes from the sample seed."""

    name: ClassVar[str] = "pattern"
    params_model: ClassVar[type[Params]] = PatternParams
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("gt_mean", pa.float32()),)

    def render_batch(self, rows: list[dict[str, Any]]) -> Batch:
        size = self.params.size  # type: ignore[attr-defined]
        out: Batch = {"sample_id": [], "key": [], "identity_id": [], IMAGE: [], "image_ext": [], "gt_mean": []}
        for r in rows:
            rng = np.random.default_rng(sample_seed(self.context.seed, r["sample_id"], "pattern"))
            base = (np.abs(r["perturbed_vector"][:3]) * 255 * 4).clip(0, 255)
            img = (base[None, None, :] + rng.normal(0, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
            out["sample_id"].append(r["sample_id"])
            out["key"].append(r["key"])
            out["identity_id"].append(r["identity_id"])
            out[IMAGE].append(encode_png(img))
            out["image_ext"].append("png")
            out["gt_mean"].append(float(img.mean()))
        return out


class MeanParams(Params):
    min_mean: float = 0.0
    fail_on: tuple[str, ...] = ()


class MeanFilter(FilterStage):
    """Scores mean brightness; raises on the sample ids listed in ``fail_on`` (to prove isolation)."""

    name: ClassVar[str] = "mean_filter"
    params_model: ClassVar[type[Params]] = MeanParams
    resources: ClassVar[Resources] = Resources(cpus=0.5)
    columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("mean", pa.float32()),)

    def score(self, batch: Batch) -> Batch:
        for sid in batch[SAMPLE_ID]:
            if sid in self.params.fail_on:  # type: ignore[attr-defined]
                raise ValueError(f"planted failure on {sid}")
        return {"mean": [float(decode_rgb(b).mean()) for b in batch[IMAGE]]}

    def decide(self, scores: dict[str, Any]) -> tuple[bool, str | None]:
        ok = scores["mean"] >= self.params.min_mean  # type: ignore[attr-defined]
        return ok, None if ok else f"mean {scores['mean']:.1f} < {self.params.min_mean}"  # type: ignore[attr-defined]


class BusyParams(Params):
    ms_per_sample: float = 5.0


class BusyMapper(Stage):
    """Burns a fixed CPU time per sample (for runner-overhead benchmarks)."""

    name: ClassVar[str] = "busy"
    kind: ClassVar[StageKind] = StageKind.MAPPER
    params_model: ClassVar[type[Params]] = BusyParams
    resources: ClassVar[Resources] = Resources(cpus=1.0)
    columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("checksum", pa.float64()),)

    def process(self, batch: Batch) -> Batch:
        import time

        sums = []
        for data in batch[IMAGE]:
            end = time.thread_time() + self.params.ms_per_sample / 1000  # type: ignore[attr-defined]
            arr = decode_rgb(data).astype(np.float64)
            while time.thread_time() < end:
                np.sqrt(arr).sum()
            sums.append(float(arr.sum()))
        return {SAMPLE_ID: list(batch[SAMPLE_ID]), "checksum": sums}
