"""A chain of per-shard stages run in one worker: the batch passes between them in memory.

Each stage of the chain still builds and commits its own manifest fragment (and tar), in order, so
resume is unchanged: a chain resumes a shard from the first of its stages that has not committed it.
What the chain saves is the round trip through storage between its stages: the next stage reads
the fragment just built and the images just written from memory, not from the run directory.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any

from pipeline.engine.execution import PreparedStage, ShardCache, ShardResult, StageSpec, load_shard_input


class StageSetupError(RuntimeError):
    """A stage's ``setup()`` (or construction) failed: no shard of it can run."""


class FusedChain:
    """The stages of one fused chain, each set up once; lives inside a Ray actor (or a test)."""

    def __init__(self, specs: list[StageSpec]) -> None:
        self.specs = specs
        self.error: str | None = None
        self.prepared: list[PreparedStage] = []
        try:
            self.prepared = [PreparedStage(s) for s in specs]
        except Exception:  # a setup error is reported on every call, so the driver can stop the run
            self.error = traceback.format_exc()[-4000:]

    def teardown(self) -> None:
        """Each stage releases what its setup took; one that fails to must not keep the others."""
        for ps in self.prepared:
            with contextlib.suppress(Exception):  # the actor is retired either way
                ps.stage.teardown()

    def _check(self) -> None:
        if self.error is not None:
            raise StageSetupError(f"stage(s) {', '.join(s.stage_id for s in self.specs)} failed to set up:\n"
                                  f"{self.error}")

    def run(self, shard: str, source_spec: dict[str, Any] | None, start: int = 0,
            quarantine: tuple[str, ...] = (), detail: str = "") -> list[ShardResult]:
        """Run and commit the chain's stages from ``start`` on; the quarantined samples get error rows at
        the first of them (and so are not alive for the rest)."""
        self._check()
        cache = ShardCache()
        results = []
        for j, ps in enumerate(self.prepared[start:], start):
            results.append(ps.run_shard(shard, source_spec if j == 0 else None, cache=cache,
                                        quarantine=quarantine if j == start else (),
                                        quarantine_detail=detail))
        return results

    def samples(self, shard: str, start: int) -> list[str]:
        """The sample ids stage ``start`` would process for a shard (what a bisection splits)."""
        self._check()
        spec = self.specs[start]
        batch, _ = load_shard_input(self.prepared[start].store, spec.upstream, shard, with_images=False,
                                    columns=set())
        return list(batch["sample_id"])

    def probe(self, shard: str, start: int, sample_ids: tuple[str, ...]) -> bool:
        """Run the chain from ``start`` on some samples, committing nothing: returns if the worker survives."""
        self._check()
        cache = ShardCache()
        for j, ps in enumerate(self.prepared[start:], start):
            ps.run_shard(shard, None, cache=cache, only=sample_ids if j == start else None, commit=False)
        return True
