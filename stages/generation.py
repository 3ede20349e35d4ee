"""Generator sources: turn the run's identities table into samples to synthesise.

Every generator (the procedural renderer, Arc2Face) shares the sample plan: identity x variant,
cut into shards by position, with a sample id that hashes what defines the sample and a per-image
perturbation of the identity vector drawn from the sample's own seed. A subclass only implements
``render_batch``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from stages.base import Batch, SourceStage, sample_seed, stable_hash
from stages.identities import perturb, perturbation_sigma

IDENTITIES_FILE = "identities/identities.parquet"

GENERATOR_FIELDS: tuple[pa.Field, ...] = (
    pa.field("variant", pa.int32()),
    pa.field("perturbation_sigma", pa.float32()),
    pa.field("perturbation_cosine", pa.float32()),
)


class GeneratorSource(SourceStage):
    needs_identities: ClassVar[bool] = True

    def output_fields(self) -> tuple[pa.Field, ...]:
        return GENERATOR_FIELDS + tuple(self.columns)

    def _identities(self) -> dict[str, Any]:
        if not self.context.identities:
            raise RuntimeError(f"stage {self.name!r} needs the run's identities block")
        return self.context.identities

    def plan(self, shard_size: int) -> list[dict[str, Any]]:
        ids = self._identities()
        total = int(ids["count"]) * int(ids["images_per_identity"])
        return [{"start": a, "stop": min(a + shard_size, total)} for a in range(0, total, shard_size)]

    def sample_id(self, identity_id: str, variant: int) -> str:
        params = self.params.model_dump(mode="json")
        return stable_hash([identity_id, variant, self.name, self.version, params], 24)

    def read(self, shard: dict[str, Any]) -> Iterator[Batch]:
        ids = self._identities()
        per = int(ids["images_per_identity"])
        start, stop = int(shard["start"]), int(shard["stop"])
        first, last = start // per, (stop - 1) // per
        table = self._load_identity_rows(first, last)
        by_index = {int(i): n for n, i in enumerate(table.column("index").to_pylist())}
        ident_ids = table.column("identity_id").to_pylist()
        vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
        sigmas = tuple(ids["perturbation"]["sigmas"])
        fractions = tuple(ids["perturbation"]["fractions"])
        rows: list[dict[str, Any]] = []
        for flat in range(start, stop):
            n = by_index[flat // per]
            variant = flat % per
            sid = self.sample_id(ident_ids[n], variant)
            sigma = perturbation_sigma(self.context.seed, sid, sigmas, fractions)
            vec = vectors[n]
            pert = perturb(vec, sigma, sample_seed(self.context.seed, sid, "perturb"))
            rows.append({
                "sample_id": sid, "key": sid, "identity_id": ident_ids[n], "variant": variant,
                "identity_vector": vec, "perturbed_vector": pert, "perturbation_sigma": sigma,
                "perturbation_cosine": float(vec @ pert),
            })
        for i in range(0, len(rows), self.batch_size_for_read()):
            chunk = rows[i : i + self.batch_size_for_read()]
            out = self.render_batch(chunk)
            for col in ("variant", "perturbation_sigma", "perturbation_cosine"):
                out[col] = [r[col] for r in chunk]
            yield out

    def batch_size_for_read(self) -> int:
        return int(getattr(self.params, "batch_size", 0) or self.batch_size)

    def _load_identity_rows(self, first: int, last: int) -> pa.Table:
        from manifests.storage import RunStorage

        store = RunStorage(self.context.run_dir, self.context.storage_options)
        path = posixpath.join(store.root, IDENTITIES_FILE)
        dataset = pads.dataset(path, filesystem=store.fs, format="parquet")
        expr = (pads.field("index") >= first) & (pads.field("index") <= last)
        return dataset.to_table(filter=expr, columns=["identity_id", "index", "vector"])

    def render_batch(self, rows: list[dict[str, Any]]) -> Batch:
        raise NotImplementedError
