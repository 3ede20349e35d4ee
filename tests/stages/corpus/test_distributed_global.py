"""The global stages as distributed work (pipeline.engine.global_exec) on a synthetic run directory.

The reference is what the single-process stages decided on the same corpus before they were
distributed (tests/fixtures/corpus_reference.json.gz, written by make_corpus_reference.py from commit
2207ba8). Reasons became rule names since; everything else must match.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from facekit.identities.cluster_metrics import cluster_scores
from manifests.commit import encode_manifest
from manifests.layout import manifest_path
from manifests.schema import VOLATILE
from manifests.storage import TMP_PREFIX, RunStorage
from pipeline.engine.execution import UpstreamInfo, load_shard_input
from pipeline.engine.global_exec import GlobalStageError, RayCorpus, read_shard_columns, run_global_distributed
from stages.corpus.consistency import ConsistencyParams, ConsistencyStage
from stages.corpus.dedup import DedupParams, DedupStage
from stages.corpus.grouping import GroupingParams, GroupingStage
from stages.corpus.separation import SeparationParams, SeparationStage
from tests.fixtures import REPO
from tests.fixtures.corpus_stages import AlwaysFailingDedup, WorkerKillingDedup
from tests.fixtures.make_corpus_reference import CASES, CORPUS, REFERENCE
from tests.fixtures.synthetic_corpus import (
    UPSTREAM,
    SyntheticCorpus,
    decide_table,
    global_spec,
    upstream_manifest,
    write_run,
)

OLD_RULES = {  # reason text of the single-process stages -> the rule name that replaced it
    "far from identity centroid": "inconsistent_identity",
    "identity collision with": "identity_collision",
    "duplicate (": "duplicate_of",
    "duplicate_of": "duplicate_of",  # dedup entries recorded from the stage that names its rule
}


def _rows(run: str, stage: str) -> list[dict[str, Any]]:
    return [r for f in sorted(glob.glob(f"{run}/manifests/{stage}/*.parquet")) for r in pq.read_table(f).to_pylist()]


def _rule(old: str | None) -> str | None:
    if old is None:
        return None
    return next(rule for prefix, rule in OLD_RULES.items() if old.startswith(prefix))


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    return a == b


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    run = str(tmp_path_factory.mktemp("corpus-run"))
    return run, write_run(CORPUS, run)


def test_projected_read_matches_the_row_by_row_input_assembly(corpus_run: tuple[str, list[str]]) -> None:
    run, shards = corpus_run
    store = RunStorage(run)
    up = (UpstreamInfo(UPSTREAM, False, False),)
    cols = ["embedding", "phash", "truth_kind"]
    table = read_shard_columns(store, up, shards[3], cols)
    batch, _ = load_shard_input(store, up, shards[3], with_images=False, columns=set(cols))
    assert table.column_names == ["sample_id", "key", "identity_id", "parent_id", *cols]
    for c in table.column_names:
        assert table.column(c).to_pylist() == [list(v) if isinstance(v, tuple) else v for v in batch[c]], c


@pytest.mark.parametrize("case", list(CASES))
def test_distributed_stage_decides_what_the_single_process_stage_decided(
    ray_session: Any, corpus_run: tuple[str, list[str]], case: str
) -> None:
    run, shards = corpus_run
    cls, params, kw = CASES[case]
    reference = json.loads(gzip.decompress(REFERENCE.read_bytes()))[case]
    results = run_global_distributed(global_spec(cls, params(**kw), run, stage_id=case), shards, shards)

    assert len(results) == len(shards)
    rows = _rows(run, case)
    ref = reference["rows"]
    assert [r["sample_id"] for r in rows] == ref["sample_id"]
    assert [r["keep"] for r in rows] == ref["keep"]
    assert [r["reason"] for r in rows] == [_rule(x) for x in ref["reason"]]
    for col in ref:
        if col in ("sample_id", "keep", "reason", "status", "detail"):
            continue
        mismatched = [i for i, r in enumerate(rows) if not _close(r[col], ref[col][i])]
        assert not mismatched, (col, mismatched[:5])
    summary = json.loads(Path(run, "report", f"{case}.summary.json").read_text())
    for key in ("dropped", "groups", "identities", "threshold", "judged", "colliding_pairs"):
        if key in reference["summary"]:
            assert _close(summary[key], reference["summary"][key]), key


def _decisions(run: str, stage: str) -> list[tuple[Any, ...]]:
    cols = ("sample_id", "keep", "reason", "detail", "identity_id", "dup_group_id", "kept_sample_id", "group_size")
    return [tuple(r.get(c) for c in cols) for r in _rows(run, stage)]


@pytest.mark.parametrize(("cls", "params"), [
    (ConsistencyStage, ConsistencyParams(fit_far=0.01)),
    (SeparationStage, SeparationParams(fit_quantile=0.99)),
    (DedupStage, DedupParams(cells=6)),
    (GroupingStage, GroupingParams(method="scalable", threshold=0.4, cells=6)),
    (GroupingStage, GroupingParams(threshold=0.4)),
])
def test_decisions_do_not_depend_on_the_number_of_partitions(
    ray_session: Any, tmp_path: Path, corpus_run: tuple[str, list[str]], cls: type, params: Any
) -> None:
    """Identity tables and k-means cells (6 of them, so the cell search is really partitioned) shuffled
    into 1, 4 and 16 partitions give the same decisions -- and the planted duplicates are all found."""
    _, shards = corpus_run
    got = []
    for parts in (1, 4, 16):
        run = str(tmp_path / f"p{parts}")
        shutil.copytree(corpus_run[0], run)
        p = params.model_copy(update={"partitions": parts})
        run_global_distributed(global_spec(cls, p, run), shards, shards)
        got.append(_decisions(run, cls.name))
    assert got[0] == got[1] == got[2]
    if cls is DedupStage:
        reference = json.loads(gzip.decompress(REFERENCE.read_bytes()))["dedup-default"]["rows"]
        assert [d[1] for d in got[0]] == reference["keep"]


@pytest.mark.parametrize(("cls", "params"), [
    (ConsistencyStage, ConsistencyParams(fit_far=0.01)),
    (ConsistencyStage, ConsistencyParams(mode="label_noise", passes=3)),
    (ConsistencyStage, ConsistencyParams(centroid="median", passes=3, fit_far=0.05)),
    (SeparationStage, SeparationParams(fit_quantile=0.99)),
    (SeparationStage, SeparationParams(policy="merge", fit_quantile=0.99)),
], ids=["consistency-fit", "consistency-label-noise", "consistency-median", "separation-fit", "separation-merge"])
@pytest.mark.parametrize("parts", [1, 5])
def test_identities_spread_over_every_shard_get_the_decisions_of_one_shard_holding_them_all(
    ray_session: Any, tmp_path: Path, cls: type, params: Any, parts: int
) -> None:
    """The reference corpus keeps each identity in one shard; here its rows are dealt out so every identity
    has images in many shards. Sums added per identity partition in shard order, the half split by run
    order across shards and the decisions sent back to every shard holding an identity must equal the
    stage on the same rows in the same order written as one shard, at any number of identity partitions."""
    table = CORPUS.table()
    order = [i for start in range(7) for i in range(start, table.num_rows, 7)]  # row r goes to stride r % 7
    table = table.take(pa.array(order))
    run = str(tmp_path / "run")
    store = RunStorage(run)
    shards = []
    for s, lo in enumerate(range(0, table.num_rows, 100)):
        name = f"{s:06d}"
        store.write_atomic(encode_manifest(upstream_manifest(table.slice(lo, 100), name)),
                           *manifest_path(UPSTREAM, name))
        shards.append(name)
    spec = global_spec(cls, params.model_copy(update={"partitions": parts}), run)
    run_global_distributed(spec, shards, shards)
    got = _rows(run, cls.name)
    up = (UpstreamInfo(UPSTREAM, False, False),)
    whole = pa.concat_tables([read_shard_columns(store, up, sh, cls.needs) for sh in shards])
    want, _ = decide_table(cls, params, table, str(tmp_path / "one-shard"), shard_rows=table.num_rows)

    given = whole.column("identity_id").to_pylist()
    shards_of: dict[str, set[str]] = {}
    for r, lab in zip(got, given, strict=True):
        shards_of.setdefault(lab, set()).add(r["shard"])
    assert min(len(v) for v in shards_of.values()) >= 5
    relabelled = want["identity_id"]
    assert len(want["shard"]) == len(got) and set(want["shard"]) == {"000000"}
    assert not all(want["keep"]) or relabelled != given  # the stage decided something
    assert [r["sample_id"] for r in got] == want["sample_id"]
    assert [r["keep"] for r in got] == want["keep"]
    assert [r["reason"] for r in got] == want["reason"]
    assert [r["identity_id"] for r in got] == relabelled
    for col in [f.name for f in cls.columns]:
        mismatched = [i for i, r in enumerate(got) if not _close(r[col], want[col][i])]
        assert not mismatched, (col, mismatched[:5])


class MeteredCorpus(RayCorpus):
    """The Ray corpus, recording the largest argument the driver sends a task and the largest answer it
    gets back (pickled bytes)."""

    largest: int = 0

    def _run(self, what: str, fn: Any, calls: list[tuple[Any, ...]], kept: bool = False) -> list[Any]:
        sent = [len(pickle.dumps(a)) for c in calls for a in c if not callable(a) and not isinstance(a, ray.ObjectRef)]
        out = super()._run(what, fn, calls, kept)
        back = [len(pickle.dumps(o[0] if kept else o)) for o in out]
        self.largest = max([self.largest, *sent, *back])
        return out

    def put(self, value: Any) -> Any:
        self.largest = max(self.largest, len(pickle.dumps(value)))
        return super().put(value)


@pytest.mark.parametrize("cls", [ConsistencyStage, SeparationStage])
def test_no_table_of_identities_passes_through_the_driver(ray_session: Any, tmp_path: Path, cls: type) -> None:
    """2,000 identities x 32 dimensions: their float64 sums are 512 KB. Every argument the driver sends and
    every answer it gets stays far below that (counts, thresholds, the bounded threshold sample); the
    tables of identities move between tasks through storage and the object store."""
    corpus = SyntheticCorpus(samples=20_000, dim=32, per_identity=10, shard_size=500, seed=3)
    run = str(tmp_path / "run")
    shards = write_run(corpus, run)
    params = ConsistencyParams(fit_far=0.01, fit_max_impostors=1000) if cls is ConsistencyStage \
        else SeparationParams(fit_quantile=0.99)
    spec = global_spec(cls, params, run)
    stage = spec.build()  # type: ignore[attr-defined]
    stage.setup()
    metered = MeteredCorpus(spec, stage, shards, shards)  # type: ignore[arg-type]
    stage.run_corpus(metered)

    assert len(metered.results) == len(shards)
    assert stage.summary()["identities"] == corpus.identities == 2000
    table_bytes = corpus.identities * 32 * 8
    assert 0 < metered.largest < table_bytes // 8, metered.largest


@pytest.mark.parametrize(("method", "threshold", "parts"), [
    ("scalable", 0.4, 1), ("scalable", 0.4, 5), ("exact", 0.4, 5)])
def test_clustering_scores_from_partitioned_label_counts_equal_the_scores_of_the_committed_groups(
    ray_session: Any, corpus_run: tuple[str, list[str]], method: str, threshold: float, parts: int
) -> None:
    """Purity, pairwise and BCubed scores against ground-truth labels come from (group, label) counts
    shuffled by group and by label; they equal the one-process scores of the committed groups, at any
    partitioning."""
    run, shards = corpus_run
    params = GroupingParams(method=method, threshold=threshold, gt_column="truth_identity", partitions=parts)
    stage_id = f"grouping-scores-{method}-{parts}"
    spec = global_spec(GroupingStage, params, run, stage_id=stage_id)
    run_global_distributed(spec, shards, shards)
    got = json.loads(Path(run, "report", f"{stage_id}.summary.json").read_text())

    up = (UpstreamInfo(UPSTREAM, False, False),)
    truth = pa.concat_tables([read_shard_columns(RunStorage(run), up, s, ["truth_identity"]) for s in shards])
    want = cluster_scores([r["identity_id"] for r in _rows(run, stage_id)], truth.column("truth_identity").to_pylist())
    assert want["gt_identities"] == CORPUS.identities and 0.5 < want["purity"] < 1.0
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["method"] == method
    assert not glob.glob(f"{run}/work/{stage_id}/*")


def test_a_worker_killed_mid_stage_is_retried_and_the_stage_completes(
    ray_session: Any, tmp_path: Path, corpus_run: tuple[str, list[str]]
) -> None:
    run = str(tmp_path / "run")
    shutil.copytree(corpus_run[0], run)
    _, shards = corpus_run
    run_global_distributed(global_spec(WorkerKillingDedup, DedupParams(), run), shards, shards)

    assert Path(run, "killed-once").exists()  # the worker really died once
    reference = json.loads(gzip.decompress(REFERENCE.read_bytes()))["dedup-default"]["rows"]
    assert [r["keep"] for r in _rows(run, "dedup")] == reference["keep"]


def test_a_stage_that_keeps_failing_gives_up_with_its_reason(
    ray_session: Any, tmp_path: Path, corpus_run: tuple[str, list[str]]
) -> None:
    run = str(tmp_path / "run")
    shutil.copytree(corpus_run[0], run)
    with pytest.raises(GlobalStageError, match=r"commit task .* failed, attempt 1 of 3: permanent.*disk on fire"):
        run_global_distributed(global_spec(AlwaysFailingDedup, DedupParams(), run), corpus_run[1], corpus_run[1])
    assert not glob.glob(f"{run}/manifests/dedup/*.parquet")


KILL_SCRIPT = textwrap.dedent("""
    import sys, tempfile, ray
    from pipeline.engine.global_exec import run_global_distributed
    from stages.corpus.consistency import ConsistencyParams, ConsistencyStage
    from tests.fixtures.synthetic_corpus import global_spec
    from manifests.storage import TMP_PREFIX, RunStorage
    from pipeline.engine.rundir import committed_shards
    run = sys.argv[1]
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ffray-", dir="/tmp"),
             configure_logging=False, log_to_driver=False)
    store = RunStorage(run)
    shards = sorted(committed_shards(store, "features"))
    done = committed_shards(store, "consistency")
    run_global_distributed(global_spec(ConsistencyStage, ConsistencyParams(fit_far=0.01), run), shards,
                           [s for s in shards if s not in done])
""")


HOG_SCRIPT = textwrap.dedent("""
    import sys, tempfile, ray
    from pipeline.engine.global_exec import run_global_distributed
    from stages.corpus.dedup import DedupParams
    from tests.fixtures.corpus_stages import MemoryHogDedup
    from tests.fixtures.synthetic_corpus import global_spec
    from manifests.storage import TMP_PREFIX, RunStorage
    from pipeline.engine.rundir import committed_shards
    run = sys.argv[1]
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ffray-", dir="/tmp"),
             configure_logging=False, log_to_driver=False)
    shards = sorted(committed_shards(RunStorage(run), "features"))
    run_global_distributed(global_spec(MemoryHogDedup, DedupParams(), run), shards, shards)
""")


@pytest.mark.faults
def test_a_global_task_killed_by_rays_memory_monitor_is_retried_and_the_stage_completes(
    tmp_path: Path, corpus_run: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a simulated kill: Ray's memory monitor runs with a threshold 1.5 GiB above what the machine
    uses now, the first commit task takes 4 GiB, and Ray kills it. The stage retries it and commits the
    reference decisions."""
    import psutil

    run = str(tmp_path / "run")
    shutil.copytree(corpus_run[0], run)
    mem = psutil.virtual_memory()
    threshold = (mem.total - mem.available + 1.5 * 2**30) / mem.total
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "100")
    monkeypatch.setenv("RAY_memory_usage_threshold", f"{threshold:.4f}")
    monkeypatch.setenv("FF_HOG_BYTES", str(4 * 2**30))  # 2.5 GiB of slack for memory freed meanwhile
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", HOG_SCRIPT, run], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    hog = int(Path(run, "hog-started").read_text())
    assert not Path(run, "hog-survived").exists()  # it was killed, not left to finish
    assert not psutil.pid_exists(hog) or psutil.Process(hog).status() == psutil.STATUS_ZOMBIE
    reference = json.loads(gzip.decompress(REFERENCE.read_bytes()))["dedup-default"]["rows"]
    assert [r["keep"] for r in _rows(run, "dedup")] == reference["keep"]


def _committed(run: str, stage: str) -> list[str]:
    """The stage's committed manifests (a write the kill interrupted leaves a temporary file beside them)."""
    return sorted(f for f in glob.glob(f"{run}/manifests/{stage}/*.parquet") if not Path(f).name.startswith(TMP_PREFIX))


def _run_script(run: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, run], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.faults
def test_kill_9_during_a_distributed_global_stage_then_resume_is_byte_identical(tmp_path: Path) -> None:
    corpus = SyntheticCorpus(samples=4000, dim=32, per_identity=20, shard_size=100, seed=2, dup_rate=0.02,
                             swap_rate=0.02)
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    write_run(corpus, whole)
    shutil.copytree(whole, killed)
    proc = _run_script(whole)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]

    proc = _run_script(killed)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(_committed(killed, "consistency")) < 5:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _committed(killed, "consistency")
    assert 5 <= len(first) < corpus.shards, "the kill must land while shards are being committed"
    stamps = {f: os.stat(f).st_mtime_ns for f in first}
    proc = _run_script(killed)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]

    assert {f: os.stat(f).st_mtime_ns for f in first} == stamps  # committed shards were not redone
    a, b = sorted(glob.glob(f"{whole}/manifests/consistency/*")), sorted(glob.glob(f"{killed}/manifests/consistency/*"))
    assert [Path(f).name for f in a] == [Path(f).name for f in b]
    for fa, fb in zip(a, b, strict=True):
        ta, tb = pq.read_table(fa), pq.read_table(fb)
        keep = [c for c in ta.column_names if c not in VOLATILE]
        assert ta.select(keep).equals(tb.select(keep)), Path(fa).name
    assert not glob.glob(f"{killed}/work/*")  # the shuffle scratch space is gone
