"""Grouping through its distributed steps in one process (LocalCorpus): the scalable path against the
exact one, the method and threshold choices, the summary's clustering scores."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from scipy.cluster.hierarchy import fcluster, linkage

from facekit.identities.cluster_metrics import cluster_scores
from facekit.thresholds import Metric, defaults_for, fit_at_far, pair_scores_from_labels
from manifests.schema import VOLATILE
from pipeline.engine.local_corpus import run_local
from stages.corpus.grouping import GroupingParams, GroupingStage, group_id
from tests.fixtures.synthetic_corpus import global_spec, run_written, write_table_run

SPACE = "arcface-r100-512"
SUMMARY_KEYS = {"method", "levels", "embedding_space", "threshold", "threshold_source", "groups", "singletons",
                "largest_group", "purity", "inverse_purity", "pairwise_precision", "pairwise_recall", "pairwise_f",
                "bcubed_precision", "bcubed_recall", "bcubed_f", "gt_identities"}


def lookalikes(identities: int, per: int, dim: int, seed: int, sibling: float = 0.7,
               noise: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of ``identities`` x ``per`` images, every second identity a look-alike of the one
    before (centres at cosine ``sibling``), images their centre plus noise of norm ``noise``; shuffled."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((identities, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    for i in range(1, identities, 2):
        o = rng.standard_normal(dim)
        o -= o @ c[i - 1] * c[i - 1]
        c[i] = sibling * c[i - 1] + np.sqrt(1 - sibling**2) * o / np.linalg.norm(o)
    label = np.repeat(np.arange(identities), per)
    e = rng.standard_normal((label.size, dim))
    e *= noise / np.linalg.norm(e, axis=1, keepdims=True)
    x = c[label] + e
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(label.size)
    return x[order].astype(np.float32), label[order]


def vector_table(x: np.ndarray, truth: np.ndarray, metric: str = "cosine", space: str = SPACE,
                 labels: list[str | None] | None = None, valid: np.ndarray | None = None) -> pa.Table:
    n = len(x)
    ids = [f"s{i:06d}" for i in range(n)]
    ok = np.ones(n, dtype=bool) if valid is None else valid
    vectors = pa.array([v.tolist() if k else None for v, k in zip(x, ok, strict=True)],
                       pa.list_(pa.float32(), x.shape[1]))
    return pa.table({"sample_id": ids, "key": ids, "identity_id": pa.array(labels or [None] * n, pa.string()),
                     "parent_id": pa.nulls(n, pa.string()), "embedding": vectors,
                     "embedding_space": [space] * n, "embedding_metric": [metric] * n,
                     "truth_identity": [f"id{t}" for t in truth]})


def group(run: str, shards: list[str], stage_id: str, partitions: int | None = None,
          **params: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run grouping over a written run with LocalCorpus; its manifest rows (run order) and summary."""
    return run_written(GroupingStage, GroupingParams(**params), run, shards, stage_id, partitions)


def written(tmp_path: Path, table: pa.Table, shard_rows: int = 250) -> tuple[str, list[str]]:
    run = str(tmp_path / "run")
    return run, write_table_run(table, run, shard_rows)


def _partition(rows: list[dict[str, Any]]) -> list[int]:
    first: dict[str, int] = {}
    return [first.setdefault(r["identity_id"], len(first)) for r in rows]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalable_with_every_pair_a_candidate_gives_the_exact_groups(tmp_path: Path, seed: int) -> None:
    x, truth = lookalikes(30, 10, 32, seed)
    run, shards = written(tmp_path, vector_table(x, truth), 100)
    exact, s_exact = group(run, shards, "exact", method="exact", threshold=0.3, gt_column="truth_identity")
    scalable, s_scal = group(run, shards, "scalable", method="scalable", threshold=0.3, k=len(x),
                             gt_column="truth_identity")
    assert s_exact["method"] == "exact" and s_scal["method"] == "scalable"
    assert 30 < s_exact["groups"] < 150 and s_exact["purity"] < 1.0  # look-alikes really merge somewhere
    assert [r["identity_id"] for r in scalable] == [r["identity_id"] for r in exact]
    assert s_scal["bcubed_f"] == s_exact["bcubed_f"]


def test_scalable_in_a_euclidean_space_is_average_linkage_on_squared_distances(tmp_path: Path) -> None:
    x, truth = lookalikes(30, 10, 24, 4)
    x = (x * 0.6).astype(np.float32)  # dlib-like distances
    run, shards = written(tmp_path, vector_table(x, truth, "euclidean", "dlib-resnet-128"), 100)
    rows, summary = group(run, shards, "euclid", method="scalable", threshold=0.6, k=len(x))
    want = fcluster(linkage(x.astype(np.float64), method="average", metric="sqeuclidean"), 0.36,
                    criterion="distance")
    first: dict[int, int] = {}
    assert _partition(rows) == [first.setdefault(int(v), len(first)) for v in want]
    assert 30 < summary["groups"] < 150


def test_scalable_bcubed_f_is_within_0_01_of_exact_on_planted_lookalikes(tmp_path: Path) -> None:
    """1,200 points, 60 identities in look-alike pairs; the default k, with one cell and with the cell
    search really cut (8 k-means cells, each point in its 2 nearest). The summary's scores are those of
    the committed groups. A component above max_component is split and counted."""
    x, truth = lookalikes(60, 20, 48, 7)
    run, shards = written(tmp_path, vector_table(x, truth), 200)
    _, exact = group(run, shards, "exact", method="exact", threshold=0.3, gt_column="truth_identity")
    assert 0.7 < exact["bcubed_f"] < 0.99
    for cells in (None, 8):
        rows, scal = group(run, shards, f"scalable-{cells}", method="scalable", threshold=0.3, cells=cells,
                           gt_column="truth_identity", partitions=3)
        print(f"cells {cells}: exact {exact['bcubed_f']:.4f} scalable {scal['bcubed_f']:.4f} levels {scal['levels']}")
        assert set(scal) >= SUMMARY_KEYS and scal["cells"] == (cells or 1)
        assert abs(scal["bcubed_f"] - exact["bcubed_f"]) <= 0.01
        assert abs(scal["pairwise_f"] - exact["pairwise_f"]) <= 0.02
        want = cluster_scores([r["identity_id"] for r in rows], [f"id{t}" for t in truth])
        assert {k: scal[k] for k in want} == pytest.approx(want)
    # At this loose threshold every point is in one component; above max_component it is clustered within
    # its cells (bounded memory), counted, and costs some accuracy.
    _, split = group(run, shards, "split", method="scalable", threshold=0.3, cells=8, max_component=200,
                     gt_column="truth_identity")
    print(f"split: {split['split_components']} components, BCubed F {split['bcubed_f']:.4f}")
    assert split["split_components"] == 1 and split["largest_component"] == len(x)
    assert exact["bcubed_f"] - 0.1 < split["bcubed_f"] < exact["bcubed_f"]


def test_group_ids_hash_the_smallest_member_and_do_not_depend_on_row_order_or_shards(tmp_path: Path) -> None:
    x, truth = lookalikes(20, 8, 16, 3, sibling=0.2, noise=0.5)
    table = vector_table(x, truth)
    run, shards = written(tmp_path, table, 40)
    base, _ = group(run, shards, "g", method="scalable", threshold=0.5, cells=3)
    by_sid = {r["sample_id"]: r["identity_id"] for r in base}
    order = np.random.default_rng(1).permutation(len(x))
    run2, shards2 = written(tmp_path / "b", table.take(pa.array(order)), 70)
    again, _ = group(run2, shards2, "g", method="scalable", threshold=0.5, cells=3)
    assert {r["sample_id"]: r["identity_id"] for r in again} == by_sid
    exact, _ = group(run2, shards2, "e", method="exact", threshold=0.5)
    assert {r["sample_id"]: r["identity_id"] for r in exact} == by_sid
    assert 18 <= len(set(by_sid.values())) <= 20
    members: dict[str, list[str]] = {}
    for sid, gid in by_sid.items():
        members.setdefault(gid, []).append(sid)
    for rows in members.values():
        assert group_id("g", rows) == by_sid[rows[0]]
        assert {r["group_size"] for r in base if r["sample_id"] in rows} == {len(rows)}


def test_agglomerative_names_the_exact_method_and_single_linkage_is_refused_with_a_reason() -> None:
    assert GroupingParams(method="agglomerative").method == "exact"
    assert GroupingParams(agglomerative_max=50).exact_limit == 50
    with pytest.raises(ValidationError, match="chains look-alike identities"):
        GroupingParams(method="connected_components")


def test_auto_is_exact_up_to_the_limit_and_scalable_above_where_exact_is_refused(tmp_path: Path) -> None:
    x, truth = lookalikes(10, 6, 16, 5, sibling=0.2, noise=0.5)
    run, shards = written(tmp_path, vector_table(x, truth), 30)
    _, small = group(run, shards, "a", threshold=0.5)
    _, large = group(run, shards, "b", threshold=0.5, exact_limit=59)
    assert (small["method"], large["method"]) == ("exact", "scalable")
    assert small["groups"] == large["groups"] == 10
    with pytest.raises(ValueError, match="above exact_limit 59"):
        group(run, shards, "c", method="exact", threshold=0.5, exact_limit=59)


def test_the_threshold_is_given_fitted_from_labelled_pairs_or_the_spaces_default(tmp_path: Path) -> None:
    x, truth = lookalikes(30, 8, 32, 6, sibling=0.3, noise=0.9)
    labels = [f"id{t}" for t in truth]
    run, shards = written(tmp_path, vector_table(x, truth, labels=labels), 60)
    _, fitted = group(run, shards, "fit", fit_far=0.01)
    _, default = group(run, shards, "default")
    _, given = group(run, shards, "given", threshold=0.42, fit_far=0.01)
    genuine, impostor = pair_scores_from_labels(x, np.array(labels), Metric.COSINE, seed=0)
    assert fitted["threshold_source"] == "fitted"
    assert fitted["threshold"] == pytest.approx(fit_at_far(genuine, impostor, Metric.COSINE, 0.01).threshold)
    assert (default["threshold_source"], default["threshold"]) == ("default", defaults_for(SPACE).grouping)
    assert (given["threshold_source"], given["threshold"]) == ("given", 0.42)


@pytest.mark.parametrize("method", ["exact", "scalable"])
def test_samples_without_a_vector_are_dropped_with_the_reason_and_the_rest_grouped(tmp_path: Path,
                                                                                  method: str) -> None:
    x, truth = lookalikes(4, 5, 8, 2, sibling=0.1, noise=0.3)
    valid = np.arange(20) % 5 != 0
    run, shards = written(tmp_path, vector_table(x, truth, valid=valid), 7)
    rows, summary = group(run, shards, "v", method=method, threshold=0.8)
    assert [r["reason"] for r in rows if not r["keep"]] == ["no_embedding"] * 4
    assert all(r["identity_id"] is None for r in rows if not r["keep"])
    assert summary["groups"] == 4 and sum(1 for r in rows if r["keep"]) == 16
    run2, shards2 = written(tmp_path / "none", vector_table(x, truth, valid=np.zeros(20, dtype=bool)), 7)
    rows, summary = group(run2, shards2, "n", method=method)
    assert summary["groups"] == 0 and not any(r["keep"] for r in rows)


def test_centroid_merge_levels_join_identities_the_neighbour_search_split(tmp_path: Path) -> None:
    """40 cells, each point in one: level 1 leaves identities in pieces (one per cell); the next levels
    search the pieces again, each in more cells (``merge_spill``), and merge them by exact average linkage
    of their sums."""
    x, truth = lookalikes(40, 20, 48, 9, sibling=0.3, noise=1.0)
    run, shards = written(tmp_path, vector_table(x, truth), 200)
    common = {"method": "scalable", "threshold": 0.3, "cells": 40, "spill": 1, "gt_column": "truth_identity"}
    _, one = group(run, shards, "one", max_levels=1, **common)
    _, levels = group(run, shards, "levels", **common)
    _, exact = group(run, shards, "exact", method="exact", threshold=0.3, gt_column="truth_identity")
    print(f"one level {one['groups']} groups F {one['bcubed_f']:.4f}; {levels['levels']} levels {levels['groups']} "
          f"groups F {levels['bcubed_f']:.4f}; exact {exact['groups']} groups F {exact['bcubed_f']:.4f}")
    assert levels["levels"] >= 2
    assert one["groups"] > 1.1 * levels["groups"]
    assert abs(levels["bcubed_f"] - exact["bcubed_f"]) <= 0.01 < exact["bcubed_f"] - one["bcubed_f"]


def blurred(seed: int, identities: int = 60, per: int = 16, dim: int = 48) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
    """Look-alike identities where a quarter of the images are low quality: their embeddings are pulled
    towards one shared direction (blurred faces look alike whoever they show), so they link identities."""
    x, truth = lookalikes(identities, per, dim, seed)
    rng = np.random.default_rng(seed + 100)
    low = rng.random(len(x)) < 0.25
    shared = rng.standard_normal(dim)
    y = x.copy()
    y[low] = 0.55 * x[low] + 0.8 * shared / np.linalg.norm(shared) + 0.05 * rng.standard_normal((low.sum(), dim))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return y.astype(np.float32), truth, low


@pytest.mark.parametrize("method", ["exact", "scalable"])
def test_low_quality_samples_never_bridge_two_groups_and_join_their_nearest(tmp_path: Path, method: str) -> None:
    y, truth, low = blurred(0)
    table = vector_table(y, truth).append_column("det_score", pa.array(np.where(low, 0.3, 0.9)))
    run, shards = written(tmp_path, table, 200)
    common = {"method": method, "threshold": 0.3, "gt_column": "truth_identity"}
    _, plain = group(run, shards, "plain", **common)
    rows, guarded = group(run, shards, "guarded", quality_column="det_score", quality_min=0.5, **common)
    run2, shards2 = written(tmp_path / "good", table.filter(pa.array(~low)), 200)
    good_rows, _ = group(run2, shards2, "good", **common)
    print(f"{method}: BCubed F {plain['bcubed_f']:.4f} -> {guarded['bcubed_f']:.4f}, "
          f"{guarded['low_quality_attached']} of {guarded['low_quality']} low-quality samples attached")

    def partition(found: list[dict[str, Any]]) -> set[frozenset[str]]:
        members: dict[str, set[str]] = {}
        for r in found:
            if r["sample_id"] in good:
                members.setdefault(r["identity_id"], set()).add(r["sample_id"])
        return {frozenset(m) for m in members.values()}

    good = {r["sample_id"] for r in good_rows}
    assert partition(rows) == partition(good_rows)  # the good samples' groups, whatever joined them
    assert guarded["low_quality"] == int(low.sum()) and 0 < guarded["low_quality_attached"] < guarded["low_quality"]
    assert guarded["bcubed_f"] > plain["bcubed_f"] + 0.02


def test_a_grouping_resumed_after_some_shards_committed_is_identical_to_one_run(tmp_path: Path) -> None:
    """Decisions are a pure function of the upstream manifests: committing half the shards, then the rest
    in a second run (what resume does), gives the manifests of one uninterrupted run."""
    x, truth = lookalikes(30, 12, 32, 8)
    run, shards = written(tmp_path, vector_table(x, truth), 40)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    params = GroupingParams(method="scalable", threshold=0.3, cells=4)
    run_local(global_spec(GroupingStage, params, run), shards, shards)  # type: ignore[arg-type]
    half = shards[: len(shards) // 2]
    run_local(global_spec(GroupingStage, params, resumed), shards, half)  # type: ignore[arg-type]
    run_local(global_spec(GroupingStage, params, resumed), shards, shards[len(half):])  # type: ignore[arg-type]
    whole = sorted(Path(run, "manifests", "grouping").glob("*.parquet"))
    again = sorted(Path(resumed, "manifests", "grouping").glob("*.parquet"))
    assert [f.name for f in whole] == [f.name for f in again] and len(whole) == len(shards)
    for a, b in zip(whole, again, strict=True):
        ta, tb = pq.read_table(a), pq.read_table(b)
        keep = [c for c in ta.column_names if c not in VOLATILE]
        assert ta.select(keep).equals(tb.select(keep)), a.name
