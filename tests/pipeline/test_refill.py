"""Refill rounds on a real run: identities under the target after every stage's decision get their next
variants as new shards, a global stage sees them, and a run continued or cut back across rounds holds the
bytes of a run made at once with those settings."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from manifests.lineage import trace
from manifests.storage import RunStorage
from pipeline.config import load_config
from pipeline.engine.rundir import read_plan
from pipeline.engine.runner import Runner, RunResult
from pipeline.status import run_status
from tests.fixtures import engine_stage, pattern_config
from tests.pipeline.engine.test_resume import _files, _rows

pytestmark = pytest.mark.usefixtures("ray_session")

TARGET = 4
RAW: dict[str, Any] = pattern_config(
    "refill-test", seed=11, shard_size=8, identities=(8, 4, 32, 0.6),
    # MeanFilter drops the darker images: some identities lose a few, one loses every image.
    stages=[engine_stage("MeanFilter", "meanf", params={"min_mean": 120}), engine_stage("IdentitySize", "size")],
    export={"shard_size": 6, "val_fraction": 0.25, "min_images_per_identity": 1},
    refill={"target_images": TARGET, "max_rounds": 2})
STAGES = ("pattern", "meanf", "size")


def _run(out: Path, max_rounds: int = 2) -> RunResult:
    raw = copy.deepcopy(RAW)
    raw["refill"]["max_rounds"] = max_rounds
    cfg, stages = load_config(raw=raw)
    res = Runner(cfg, stages, str(out), show_progress=False).run()
    assert res.complete, res.failures
    return res


def _samples(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "tables" / "samples").to_pylist()


def _kept(row: dict[str, Any]) -> bool:
    return all(row[f"{s}__status"] == "ok" and row[f"{s}__keep"] for s in STAGES)


@pytest.fixture(scope="module")
def refilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("refill") / "run"
    _run(out)
    return out


def test_short_identities_get_their_next_variants_until_the_target_or_max_rounds(refilled: Path) -> None:
    plan = read_plan(RunStorage(str(refilled)))
    assert plan is not None
    rounds = Counter(sh["spec"].get("round", 0) for sh in plan["shards"])
    assert set(rounds) == {0, 1, 2}, rounds
    assert all(sh["name"].startswith(f"r0{sh['spec']['round']}-") for sh in plan["shards"] if sh["spec"].get("round"))

    rows = _samples(refilled)
    by_identity: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_identity[r["identity_id"]].append(r)
    cfg, stages = load_config(raw=RAW)
    source = Runner(cfg, stages, str(refilled), show_progress=False).instances["pattern"]
    for ident, mine in by_identity.items():
        variants = sorted(r["pattern__variant"] for r in mine)
        assert variants == list(range(len(variants))), f"{ident}: variants not the next indices: {variants}"
        for r in mine:  # the generator's own id for (identity, variant), in every round
            assert r["sample_id"] == source.sample_id(ident, r["pattern__variant"])  # type: ignore[attr-defined]
            assert (r["pattern__round"] == 0) == (r["pattern__variant"] < 4)
        base_kept = sum(_kept(r) for r in mine if r["pattern__round"] == 0)
        kept = sum(_kept(r) for r in mine)
        refilled_rounds = {r["pattern__round"] for r in mine} - {0}
        if base_kept >= TARGET or base_kept == 0:  # at target already, or lost every image: no refill
            assert not refilled_rounds, ident
        else:
            assert 1 in refilled_rounds, ident
            assert kept >= TARGET or refilled_rounds == {1, 2}, f"{ident} stopped short before max_rounds"
            if 2 in refilled_rounds:  # round 2 only for those still short after round 1
                assert sum(_kept(r) for r in mine if r["pattern__round"] <= 1) < TARGET, ident
        # The global stage counted the identity over the whole run, in its old shards too.
        assert {r["size__identity_size"] for r in mine} == {len(mine)}, ident

    committed = sorted(p.stem for p in (refilled / "manifests" / "size").glob("*.parquet"))
    assert committed == sorted(sh["name"] for sh in plan["shards"])

    kept = Counter(r["identity_id"] for r in rows if _kept(r))
    summary = json.loads((refilled / "report" / "refill.json").read_text())
    assert summary["at_target"] == sum(n >= TARGET for n in kept.values()) > 0
    assert summary["lost"] == len(by_identity) - len(kept) > 0
    assert summary["short"] == sum(0 < n < TARGET for n in kept.values())
    assert [r["samples"] for r in summary["rounds"]] == [
        sum(1 for r in rows if r["pattern__round"] == k) for k in (1, 2)]
    assert run_status(RunStorage(str(refilled)))["refill"] == summary
    assert "## Refill" in (refilled / "export" / "README.md").read_text()
    assert 'id="refill"' in (refilled / "report" / "index.html").read_text()
    exported = pq.read_table(refilled / "export" / "manifest.parquet")
    assert exported.num_rows == sum(kept.values())
    late = next(r for r in rows if r["pattern__round"] == 2 and _kept(r))
    trail = trace(RunStorage(str(refilled)), list(STAGES), late["sample_id"])
    assert [r["round"] for r in trail if r["stage"] in ("pattern", "export")] == [2, 2]


def test_a_run_continued_or_cut_back_across_rounds_is_byte_identical_to_a_fresh_one(
        refilled: Path, tmp_path: Path) -> None:
    out, one_round = tmp_path / "run", tmp_path / "one-round"
    _run(out, max_rounds=1)
    shutil.copytree(out, one_round)
    _run(out, max_rounds=2)  # continues: round 2 on top of round 1
    _same(refilled, out)
    _run(out, max_rounds=1)  # cut back: round 2 leaves every stage, the global stage is recomputed
    _same(one_round, out)


def _same(a: Path, b: Path) -> None:
    for pattern in ("shards/*/*.tar", "export/*/*/*.tar", "plan.*", "report/refill.json"):
        fa, fb = _files(a, pattern), _files(b, pattern)
        assert fa.keys() == fb.keys() and fa, pattern
        assert fa == fb, pattern
    for stage in STAGES:
        assert _rows(a, stage) == _rows(b, stage), stage
    assert pq.read_table(a / "export" / "manifest.parquet").equals(pq.read_table(b / "export" / "manifest.parquet"))
