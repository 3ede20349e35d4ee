"""The export plan's selection and leak-checked split on a reference samples table, over real Ray
tasks: the same identities, images and sides on 1, 4 and 16 partitions; look-alike identities and
identities joined by a dedup group on one side; ``flag`` lists the look-alikes that cross instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from manifests.storage import RunStorage
from pipeline.engine.tasks import task_options
from pipeline.export.config import ExportConfig
from pipeline.export.task import ExportPlan, plan_export
from tests.fixtures.selection_tables import POSES, STAGES, lookalike_twin, write_samples

pytestmark = pytest.mark.usefixtures("ray_session")

IDENTITIES, IMAGES, SHARDS = 30, 6, 16


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("splits") / "run"
    write_samples(out, IDENTITIES, IMAGES, SHARDS)
    return out


def _plan(run: Path, partitions: int, **export: Any) -> tuple[ExportPlan, dict[str, list[str]]]:
    rows = IDENTITIES * IMAGES
    cfg = ExportConfig(val_fraction=0.5, rows_per_task=max(1, rows // partitions), **export)
    store = RunStorage(str(run))
    version = f"v-test-{partitions}-{len(export)}"
    plan = plan_export(store, STAGES, cfg, version, rows // SHARDS, task_options(0.25, 2**28))
    kept = pads.dataset([store.path(*p) for p in plan.plan_files], format="parquet").to_table(
        columns=["sample_id", "identity_id"]).to_pylist()
    by_identity: dict[str, list[str]] = {}
    for r in kept:
        by_identity.setdefault(r["identity_id"], []).append(r["sample_id"])
    store.remove("export", version, recursive=True)
    return plan, {k: sorted(v) for k, v in by_identity.items()}


def _sides(plan: ExportPlan) -> dict[str, str]:
    return dict(zip(plan.identities.table.column("identity_id").to_pylist(),
                    plan.identities.table.column("split").to_pylist(), strict=True))


def test_selection_and_split_are_the_same_on_1_4_and_16_partitions_and_keep_lookalikes_together(run: Path) -> None:
    export = {"identities": {"max_images": 4, "prefer": {"score": "labels.quality"}}}
    results = [_plan(run, p, **export) for p in (1, 4, 16)]
    first_plan, first_rows = results[0]
    sides = _sides(first_plan)
    twins = [(f"id{i:07d}", f"id{t:07d}") for i in range(IDENTITIES) if (t := lookalike_twin(i)) is not None]
    assert first_plan.splits["lookalike_pairs"] == len(twins) == 3
    assert all(sides[a] == sides[b] for a, b in twins)
    assert sides["id0000005"] == sides["id0000006"]  # joined by a dedup group
    assert first_plan.splits["dedup_links"] == 1 and first_plan.splits["cross_split_lookalikes"] == 0
    assert set(sides.values()) == {"train", "val"}
    assert all(len(v) == 4 for v in first_rows.values())  # every identity has 4..6 images: capped at 4
    assert first_plan.selection.drops == {"over_quota": sum(IMAGES - i % 3 - 4 for i in range(IDENTITIES))}
    for plan, rows in results[1:]:
        assert _sides(plan) == sides and rows == first_rows
        assert plan.splits == first_plan.splits
    sim = first_plan.splits["max_identity_similarity"]
    assert sim is not None and sim["score"] < first_plan.splits["threshold"]
    assert first_plan.splits["max_image_similarity"]["checked"] > 0


def test_flag_leaves_lookalikes_where_the_hash_puts_them_and_counts_those_across_splits(run: Path) -> None:
    plan, _ = _plan(run, 4, splits={"lookalikes": "flag"})
    sides = _sides(plan)
    twins = [(f"id{i:07d}", f"id{t:07d}") for i in range(IDENTITIES) if (t := lookalike_twin(i)) is not None]
    crossing = sum(sides[a] != sides[b] for a, b in twins)
    assert crossing > 0  # without the look-alike rule these pairs would be split
    assert plan.splits["cross_split_lookalikes"] == crossing
    assert plan.splits["max_identity_similarity"]["score"] >= plan.splits["threshold"]


def test_stratified_split_holds_out_the_fraction_of_each_stratum(run: Path) -> None:
    plan, _ = _plan(run, 1, splits={"stratify": "labels.pose_bin", "lookalikes": "flag"})
    sides = _sides(plan)
    strata: dict[str, list[str]] = {}
    for i in range(IDENTITIES):  # the most frequent pose of the identity's images, ties by name
        poses = [POSES[(i + j) % 3] for j in range(IMAGES - i % 3)]
        strata.setdefault(min(set(poses), key=lambda p: (-poses.count(p), p)), []).append(f"id{i:07d}")
    assert len(strata) > 1
    for members in strata.values():
        assert sum(sides[m] == "val" for m in members) == round(0.5 * len(members))


def test_a_run_whose_distinct_identities_all_verify_at_the_photo_point_still_holds_out_validation(
        tmp_path: Path) -> None:
    """Identities that sit close together (as renders do in a photo-trained space) are not all look-alikes:
    the threshold is fitted from the run's own centroid pairs, and only the planted twins are joined."""
    run = tmp_path / "run"
    write_samples(run, IDENTITIES, IMAGES, SHARDS, dim=8)  # 8-d: distinct centroids up to cosine ~0.9
    plan, _ = _plan(run, 1)
    sides = _sides(plan)
    assert plan.splits["threshold_source"] == "fitted"
    assert plan.splits["threshold"] > plan.splits["floor"]
    assert 0 < sum(s == "val" for s in sides.values()) < IDENTITIES
    assert plan.splits["lookalike_pairs"] < IDENTITIES // 2


@pytest.mark.parametrize("image_check", [10_000, 7])
def test_the_image_leak_figure_is_the_closest_training_image_to_the_sampled_validation_images(
        run: Path, image_check: int) -> None:
    """With every validation image sampled it is the brute-force maximum over (validation, training)
    image pairs; with a few, the maximum over those the check hash picks, and it never exceeds that."""
    import numpy as np

    from pipeline.export.order import units

    plan, rows = _plan(run, 4, splits={"image_check": image_check, "lookalikes": "flag"})
    sides = _sides(plan)
    table = pads.dataset(str(run / "tables" / "samples"), format="parquet").to_table(
        columns=["sample_id", "identity_id", "emb__embedding"])
    kept = {s for v in rows.values() for s in v}
    ids = table.column("sample_id").to_pylist()
    x = np.asarray(table.column("emb__embedding").to_pylist(), dtype=np.float64)
    side = [sides.get(i) if s in kept else None for s, i in
            zip(ids, table.column("identity_id").to_pylist(), strict=True)]
    val = [r for r, sd in enumerate(side) if sd == "val"]
    train = [r for r, sd in enumerate(side) if sd == "train"]
    check = units("check:", pa.array([ids[r] for r in val]))
    sampled = [val[i] for i in np.lexsort((np.array([ids[r] for r in val]), check))[:image_check]]
    scores = x[sampled] @ x[train].T
    got = plan.splits["max_image_similarity"]
    assert got["of"] == len(val) and got["checked"] == min(image_check, len(val))
    assert got["score"] == pytest.approx(float(scores.max()), abs=1e-5)
    v, t = np.unravel_index(int(np.argmax(scores)), scores.shape)
    assert (got["val"], got["train"]) == (ids[sampled[v]], ids[train[t]])
    if image_check < len(val):
        assert got["score"] <= float((x[val] @ x[train].T).max()) + 1e-6
