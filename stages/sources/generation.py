"""Generator sources: turn the run's identities table into samples to synthesise.

Every generator (the procedural renderer, Arc2Face) shares the sample plan: identity x variant,
cut into shards by position, with a sample id that hashes what defines the sample and a per-image
perturbation of the identity vector drawn from the sample's own seed. A subclass only implements
``render_batch``.

A refill round (pipeline/refill.py) asks for more variants of some identities: its shards list
(identity index, first variant, count) items, and a variant past ``images_per_identity`` gets its id
and seeds by the same rule as any other, so the round's samples are what a larger plan would make.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from facekit.identities.gaussian import (
    add_siblings,
    identity_id,
    perturb,
    perturbation_sigma,
    sample_gaussian_identities,
)
from manifests.layout import IDENTITIES_FILE
from manifests.schema import identity_schema
from manifests.storage import RunStorage
from stages.base import (
    IDENTITY_ID,
    IMAGE,
    IMAGE_EXT,
    KEY,
    SAMPLE_ID,
    Batch,
    P,
    Rows,
    SourceStage,
    sample_seed,
    stable_hash,
)

GENERATOR_FIELDS: tuple[pa.Field, ...] = (
    pa.field("variant", pa.int32()),
    pa.field("round", pa.int32()),  # 0: the plan's images_per_identity; r: refill round r
    pa.field("perturbation_sigma", pa.float32()),
    pa.field("perturbation_cosine", pa.float32()),
)


def vector_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """An Arrow list column of equal-length vectors as an (n, d) float32 matrix, without Python floats."""
    arr = column.combine_chunks()
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(arr), -1)


class GeneratorSource(SourceStage[P]):
    needs_identities: ClassVar[bool] = True

    def output_fields(self) -> tuple[pa.Field, ...]:
        return GENERATOR_FIELDS + tuple(self.columns)

    def _identities(self) -> dict[str, Any]:
        if not self.context.identities:
            raise RuntimeError(f"stage {self.name!r} needs the run's identities block")
        return self.context.identities

    def prepare(self, store: RunStorage) -> None:
        """Sample the run's identities once (Gaussian with the cosine rule, or PCA-space from a
        reference file) and write them as their own table; a resumed run reuses the table."""
        if store.exists(*IDENTITIES_FILE):
            return
        ids = self._identities()
        seed = self.context.seed
        reference_sha = None
        if ids["sampler"] == "pca":
            from facekit.identities.pca import sample_pca_identities

            sampled, reference_sha = sample_pca_identities(
                ids["reference"], ids["count"], ids["max_cosine"], seed, ids["max_candidates"], ids["dim"],
                storage_options=store.storage_options,
            )
        else:
            sampled = sample_gaussian_identities(ids["count"], ids["dim"], ids["max_cosine"], seed,
                                                 ids["max_candidates"])
        if ids.get("siblings"):
            sampled = add_siblings(sampled, ids["siblings"]["fraction"], ids["siblings"]["cosine"], seed)
        sampler_params = {k: v for k, v in ids.items() if k not in ("images_per_identity", "perturbation")}
        sampler_fp = stable_hash([sampler_params, seed])
        dim = sampled.vectors.shape[1]
        n = len(sampled.vectors)
        table = pa.Table.from_pydict(
            {
                "identity_id": [identity_id(sampler_fp, i) for i in range(n)],
                "index": list(range(n)),
                "sampler": [ids["sampler"]] * n,
                "sampler_params": [json.dumps(sampler_params, sort_keys=True)] * n,
                "seed": [seed] * n,
                "max_cosine_to_kept": sampled.max_cosine_to_kept.tolist(),
                "candidates_tried": [sampled.candidates_tried] * n,
                "reference_sha256": [reference_sha] * n,
                "vector": list(sampled.vectors),
            },
            schema=identity_schema(dim),
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=1024)
        store.write_atomic(buf.getvalue(), *IDENTITIES_FILE)

    def plan(self, shard_size: int) -> list[dict[str, Any]]:
        ids = self._identities()
        total = int(ids["count"]) * int(ids["images_per_identity"])
        return [{"start": a, "stop": min(a + shard_size, total)} for a in range(0, total, shard_size)]

    @staticmethod
    def refill_plan(items: list[tuple[int, int, int]], shard_size: int, round_: int) -> list[dict[str, Any]]:
        """Shard specs of one refill round: ``items`` are (identity index, first variant, count), cut
        into shards of ``shard_size`` samples in the order given."""
        specs: list[dict[str, Any]] = []
        current: list[list[int]] = []
        room = shard_size
        for index, first, count in items:
            while count > 0:
                take = min(count, room)
                current.append([index, first, take])
                first, count, room = first + take, count - take, room - take
                if room == 0:
                    specs.append({"round": round_, "items": current})
                    current, room = [], shard_size
        if current:
            specs.append({"round": round_, "items": current})
        return specs

    def sample_id(self, identity_id: str, variant: int) -> str:
        params = self.params.model_dump(mode="json")
        return stable_hash([identity_id, variant, self.name, self.version, params], 24)

    def _members(self, shard: dict[str, Any]) -> list[tuple[int, int]]:
        """(identity index, variant) of every sample of a shard, in order."""
        if "items" in shard:
            return [(int(i), v) for i, first, n in shard["items"] for v in range(int(first), int(first) + int(n))]
        per = int(self._identities()["images_per_identity"])
        return [(flat // per, flat % per) for flat in range(int(shard["start"]), int(shard["stop"]))]

    def read(self, shard: dict[str, Any]) -> Iterator[Batch]:
        ids = self._identities()
        members = self._members(shard)
        round_ = int(shard.get("round", 0))
        table = self._load_identity_rows(sorted({i for i, _ in members}))
        by_index = {int(i): n for n, i in enumerate(table.column("index").to_pylist())}
        ident_ids = table.column("identity_id").to_pylist()
        vectors = vector_matrix(table.column("vector"))
        sigmas = tuple(ids["perturbation"]["sigmas"])
        fractions = tuple(ids["perturbation"]["fractions"])
        rows: list[dict[str, Any]] = []
        for index, variant in members:
            n = by_index[index]
            sid = self.sample_id(ident_ids[n], variant)
            sigma = perturbation_sigma(self.context.seed, sid, sigmas, fractions)
            vec = vectors[n]
            pert = perturb(vec, sigma, sample_seed(self.context.seed, sid, "perturb"))
            rows.append({
                "sample_id": sid, "key": sid, "identity_id": ident_ids[n], "variant": variant, "round": round_,
                "identity_vector": vec, "perturbed_vector": pert, "perturbation_sigma": sigma,
                "perturbation_cosine": float(vec @ pert),
            })
        for i in range(0, len(rows), self.batch_size_for_read()):
            chunk = rows[i : i + self.batch_size_for_read()]
            out = self.render_batch(chunk)
            for col in ("variant", "round", "perturbation_sigma", "perturbation_cosine"):
                out[col] = [r[col] for r in chunk]
            yield out

    def batch_size_for_read(self) -> int:
        return int(getattr(self.params, "batch_size", 0) or self.batch_size)

    def _load_identity_rows(self, indices: list[int]) -> pa.Table:
        store = RunStorage(self.context.run_dir, self.context.storage_options)
        path = posixpath.join(store.root, *IDENTITIES_FILE)
        dataset = pads.dataset(path, filesystem=store.fs, format="parquet")
        # The row-group statistics still prune on the range; the set keeps a refill shard's few rows.
        expr = ((pads.field("index") >= min(indices)) & (pads.field("index") <= max(indices))
                & pads.field("index").isin(indices))
        return dataset.to_table(filter=expr, columns=["identity_id", "index", "vector"])

    @staticmethod
    def generated_rows(rows: list[dict[str, Any]], columns: Iterable[str] = ()) -> Rows:
        """The output rows of a batch of planned samples: each keeps its planned key (its id where the
        plan has none) and its identity; the image members and ``columns`` start empty."""
        out = Rows([r[SAMPLE_ID] for r in rows], [KEY, IDENTITY_ID, IMAGE, IMAGE_EXT, *columns])
        out.column(KEY, [r.get(KEY, r[SAMPLE_ID]) for r in rows])
        out.column(IDENTITY_ID, [r.get(IDENTITY_ID) for r in rows])
        return out

    def render_batch(self, rows: list[dict[str, Any]]) -> Batch:
        raise NotImplementedError
