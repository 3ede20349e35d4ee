"""Refill: identities of a generator run that end under the target after the filters get more variants.

After every stage and the run's tables are committed, the kept images of each identity are counted with
the export's own selection predicate over ``tables/samples`` (every stage ok and kept, the export
thresholds and ``where``), so refill and export never disagree on what "kept" means. An identity with
at least one kept image and fewer than the target gets a round of new variants: the next variant
indices after those it has, through the same stages, with the ids and seeds the generator gives any
variant. Each identity short by ``d`` asks for ``ceil(d x f)``, ``f`` the inverse of the run's pass rate
so far (kept / generated), capped by ``refill.max_factor``: fewer rounds for the cost of a few extra
images, which the export's identity selection trims to the target. An identity with no kept image lost
all of them to an identity-level decision (separation drops the later of two colliding identities):
more variants of it would be dropped the same way, so it is not refilled and is counted as lost.

A round is new shards appended to the run's plan (``r<round>-<index>``, the round in each spec and in
the generator's ``round`` column), committed and resumed like any shard. Global stages see the whole
run: their output is a function of every shard, so before a round's shards enter the plan the stages
from the first global stage on are removed (with the run's tables and export) and recomputed over all
shards after the round's per-shard work. The plan is written last: a run killed at any point resumes
to the same rounds, byte for byte, because each round is a pure function of the committed manifests
before it. Changed refill settings drop the rounds they no longer make (and what depends on them).

``report/refill.json`` records the rounds and where the identities ended; ``status``, the report and
the dataset card read it.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from manifests.layout import (
    IDENTITIES_FILE,
    MANIFEST_SUFFIX,
    REFILL_SUMMARY,
    SAMPLES_TABLE,
    TABLES_DIR,
    TABLES_DONE,
    manifest_path,
    shard_path,
)
from manifests.storage import RunStorage
from pipeline.config import PipelineConfig, ResolvedStage, refill_target
from pipeline.engine.rundir import read_plan, wipe_stages, write_plan
from stages.base import StageKind, stable_hash
from stages.sources.generation import GeneratorSource

ROUND_PREFIX = "r"


def round_shard_name(round_: int, i: int) -> str:
    """Sorts after every base shard (digits sort before letters) and by round."""
    return f"{ROUND_PREFIX}{round_:02d}-{i:06d}"


def shard_round(spec: dict[str, Any]) -> int:
    return int(spec.get("round", 0))


@dataclass(frozen=True)
class Settings:
    target: int
    max_rounds: int
    max_factor: float

    @property
    def digest(self) -> str:
        """What decides each round's content; ``max_rounds`` only decides how many rounds there are."""
        return stable_hash([self.target, self.max_factor], 16)


def settings(cfg: PipelineConfig) -> Settings | None:
    """The run's refill settings; None where refill is off (no block, or no round allowed)."""
    if cfg.refill is None or cfg.refill.max_rounds == 0:
        return None
    target = refill_target(cfg)
    if target is None:
        return None
    return Settings(target, cfg.refill.max_rounds, cfg.refill.max_factor)


@dataclass(frozen=True)
class Standing:
    """Where the identities stand after the committed rounds."""

    identities: int
    at_target: int
    short: int
    lost: int
    generated: int
    kept: int
    deficits: dict[int, int]  # identity index -> images short, for identities with a kept image


class Refill:
    def __init__(self, cfg: PipelineConfig, stages: list[ResolvedStage], store: RunStorage) -> None:
        self.cfg = cfg
        self.store = store
        self.settings = settings(cfg)
        self.order = [s.stage_id for s in stages]
        first_global = next((i for i, s in enumerate(stages) if s.cls.kind == StageKind.GLOBAL), len(stages))
        self.whole_run = self.order[first_global:]  # stages whose output depends on every shard
        self.per = int(cfg.identities.images_per_identity) if cfg.identities else 0

    # ------------------------------------------------------------ settings changed since the rounds ran

    def reconcile(self, plan: dict[str, Any]) -> dict[str, Any]:
        """The plan with only the rounds these settings make: rounds made with other settings (or past
        ``max_rounds``, or with refill off) are removed from every stage before the plan drops them."""
        shards = plan["shards"]
        rounds = [sh for sh in shards if shard_round(sh["spec"]) > 0]
        if not rounds:
            return plan
        s = self.settings
        keep_upto = 0 if s is None or plan.get("refill") != s.digest else s.max_rounds
        drop = [sh["name"] for sh in rounds if shard_round(sh["spec"]) > keep_upto]
        if not drop:
            return plan
        self._invalidate_whole_run(every_table=True)
        for name in drop:
            for sid in self.order:
                self.store.remove(*manifest_path(sid, name))
                self.store.remove(*shard_path(sid, name))
        out = {**plan, "shards": [sh for sh in shards if sh["name"] not in set(drop)]}
        write_plan(self.store, out)
        return out

    # ------------------------------------------------------------ one round

    def next_round(self) -> bool:
        """After the run's tables are committed: plan the next round and return True, or record where the
        identities ended and return False (the target reached, no identity with a chance left short, or
        ``max_rounds`` run)."""
        s = self.settings
        plan = read_plan(self.store)
        if s is None or plan is None:
            return False
        shards = plan["shards"]
        done_rounds = max((shard_round(sh["spec"]) for sh in shards), default=0)
        standing = self.standing(shards, s.target)
        if done_rounds >= s.max_rounds or not standing.deficits:
            self._write_summary(shards, s, standing)
            return False
        factor = s.max_factor if standing.kept == 0 else min(s.max_factor, standing.generated / standing.kept)
        factor = max(1.0, factor)
        nxt = self._next_variants(shards)
        items = [(index, nxt.get(index, self.per), math.ceil(d * factor))
                 for index, d in sorted(standing.deficits.items())]
        round_ = done_rounds + 1
        specs = GeneratorSource.refill_plan(items, self.cfg.run.shard_size, round_)
        self._invalidate_whole_run(every_table=bool(self.whole_run))
        new = [{"name": round_shard_name(round_, i), "spec": sp} for i, sp in enumerate(specs)]
        write_plan(self.store, {**plan, "refill": s.digest, "shards": [*shards, *new]})
        return True

    def standing(self, shards: list[dict[str, Any]], target: int) -> Standing:
        kept = self.kept_per_identity([sh["name"] for sh in shards])
        index = self._identity_index()
        generated = sum(self._shard_size(sh["spec"]) for sh in shards)
        counts = [kept.get(i, 0) for i in index]
        deficits = {n: target - k for i, n in index.items() if 0 < (k := kept.get(i, 0)) < target}
        return Standing(identities=len(index), at_target=sum(k >= target for k in counts),
                        short=len(deficits), lost=sum(k == 0 for k in counts), generated=generated,
                        kept=sum(counts), deficits=deficits)

    def kept_per_identity(self, shards: list[str]) -> dict[str, int]:
        """Per identity id, the samples of ``shards`` the export's selection predicate keeps in
        ``tables/samples``."""
        from pipeline.export.config import WHERE_TABLE
        from pipeline.export.plan import sandbox, selection_predicate

        files = [self.store.path(*SAMPLES_TABLE, f"{sh}{MANIFEST_SUFFIX}") for sh in shards]
        if not files:
            return {}
        ds = pads.dataset(files, filesystem=self.store.fs, format="parquet")
        con = sandbox()
        try:
            con.register(WHERE_TABLE, ds)
            rows = con.sql(f"SELECT identity_id, count(*) FROM {WHERE_TABLE} WHERE "
                           f"{selection_predicate(self.cfg.export, self.order)} AND identity_id IS NOT NULL "
                           "GROUP BY identity_id").fetchall()
        finally:
            con.close()
        return {str(i): int(n) for i, n in rows}

    # ------------------------------------------------------------ helpers

    def _identity_index(self) -> dict[str, int]:
        with self.store.fs.open(posixpath.join(self.store.root, *IDENTITIES_FILE), "rb") as f:
            table = pq.read_table(f, columns=["identity_id", "index"])
        return dict(zip(table.column("identity_id").to_pylist(), table.column("index").to_pylist(), strict=True))

    def _shard_size(self, spec: dict[str, Any]) -> int:
        if "items" in spec:
            return sum(int(n) for _, _, n in spec["items"])
        return int(spec["stop"]) - int(spec["start"])

    def _next_variants(self, shards: list[dict[str, Any]]) -> dict[int, int]:
        """Per identity index that a round refilled, the first variant no shard has made yet."""
        out: dict[int, int] = {}
        for sh in shards:
            for index, first, n in sh["spec"].get("items", ()):
                out[int(index)] = max(out.get(int(index), self.per), int(first) + int(n))
        return out

    def _invalidate_whole_run(self, every_table: bool) -> None:
        """Remove what a change of the shard set makes stale: the stages from the first global stage on
        (their output reads every shard), the export, and the run's tables commit; with ``every_table``
        the table files too (a recomputed stage's rows, or shards leaving the plan, make them stale; a
        file of shards whose stages all stay is still valid)."""
        wipe_stages(self.store, self.whole_run)  # removes the export too
        self.store.remove(*TABLES_DONE)
        if every_table:
            self.store.remove(TABLES_DIR, recursive=True)

    def _write_summary(self, shards: list[dict[str, Any]], s: Settings, standing: Standing) -> None:
        rounds: dict[int, dict[str, Any]] = {}
        for sh in shards:
            r = shard_round(sh["spec"])
            if r == 0:
                continue
            entry = rounds.setdefault(r, {"round": r, "shards": 0, "samples": 0, "identities": set()})
            entry["shards"] += 1
            entry["samples"] += self._shard_size(sh["spec"])
            entry["identities"].update(int(i) for i, _, _ in sh["spec"]["items"])
        with_chance = standing.identities - standing.lost
        doc = {
            "target_images": s.target, "max_rounds": s.max_rounds, "max_factor": s.max_factor,
            "rounds_run": len(rounds),
            "rounds": [{**e, "identities": len(e["identities"])} for _, e in sorted(rounds.items())],
            "identities": standing.identities, "at_target": standing.at_target, "short": standing.short,
            "lost": standing.lost, "share_at_target": standing.at_target / with_chance if with_chance else None,
            "generated": standing.generated, "kept": standing.kept,
        }
        self.store.write_atomic(json.dumps(doc, indent=1, sort_keys=True).encode(), *REFILL_SUMMARY)


def read_summary(store: RunStorage) -> dict[str, Any] | None:
    """The run's refill record (``report/refill.json``); None for a run without refill."""
    return store.read_json(*REFILL_SUMMARY)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The refill record as short lines of text, for status and the dataset card."""
    share = doc.get("share_at_target")
    shown = "-" if share is None else f"{100 * share:.1f}%"
    lines = [f"refill: {doc['at_target']} of {doc['identities'] - doc['lost']} identities with a kept image "
             f"reached {doc['target_images']} kept images ({shown}) after {doc['rounds_run']} of at most "
             f"{doc['max_rounds']} round(s); {doc['short']} short, {doc['lost']} lost every image"]
    for r in doc.get("rounds", []):
        lines.append(f"  round {r['round']}: {r['samples']} samples for {r['identities']} identities "
                     f"({r['shards']} shard(s))")
    return lines
