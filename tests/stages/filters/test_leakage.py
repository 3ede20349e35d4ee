"""The leakage gate through real pipeline runs.

The quickstart (12 identities x 8 renders) with a gallery of fresh renders of 3 of its own identities:
the threshold is fitted from the run's distinct identities, every image of the 3 goes (naming the right
gallery person) and no other image does; the fit is in the rows, the summary, the report and the card,
and a resumed run recomputes it.

A folder of photos (ingest -> YuNet -> align -> SFace -> leakage, no identity labels):

The gallery holds renders of six identity vectors, three faces cut from insightface's t1.jpg and
scikit-image's astronaut. The run's folder plants near-copies of them (re-renders of the same identity
vectors under other pose/light/expression, JPEG-40 re-encodes and 0.6x downscales of the gallery photos)
beside distinct people (renders of other identity vectors, the other three t1.jpg faces). SFace compresses
similarities on renders (distinct render identities reach ~0.75, re-renders of one sit at 0.90-0.97,
facekit/thresholds.py), so the run sets threshold 0.8 as a renders run would fit it; the photo copies sit
far above it and the distinct photo faces below the published 0.363.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from facekit.backends.opencv_zoo import SFaceEmbedder, YuNetDetector
from facekit.gallery import build_gallery, gallery_sha256
from facekit.geometry import align_to_template, warp
from facekit.identities.gaussian import perturb, sample_gaussian_identities
from facekit.renderer.render import render_sample
from manifests.layout import GALLERY_INDEX, GALLERY_TABLE, gallery_cache_path, gallery_pointer_path
from manifests.storage import RunStorage
from pipeline.config import load_config
from pipeline.engine.runner import Runner
from stages.base import StageContext
from stages.filters.leakage import LeakageParams, LeakageStage
from tests.fixtures import EXAMPLES, jpeg_bytes, png_bytes
from training.bin_pairs import write_pair_file

pytestmark = pytest.mark.usefixtures("ray_session")

THRESHOLD = 0.8
GALLERY_RENDERS = 6
T1_IN_GALLERY = 3


def _t1_faces() -> list[np.ndarray]:
    """The six t1.jpg faces, each cut with a margin (largest first, as the detector orders them)."""
    insightface = pytest.importorskip("insightface")
    photo = np.asarray(Image.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").convert("RGB"))
    out = []
    for f in YuNetDetector().detect(photo):
        x0, y0, x1, y1 = f.box
        m = 0.5 * max(x1 - x0, y1 - y0)
        a, b = int(max(0, x0 - m)), int(max(0, y0 - m))
        out.append(np.ascontiguousarray(photo[b : int(y1 + m), a : int(x1 + m)]))
    return out


@pytest.fixture(scope="module")
def leak_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from skimage import data as skdata

    base = tmp_path_factory.mktemp("leak")
    gallery, photos = base / "gallery", base / "photos"
    gallery.mkdir()
    photos.mkdir()
    ids = sample_gaussian_identities(GALLERY_RENDERS * 2, 512, 0.35, 11).vectors
    expected: dict[str, str] = {}  # planted file stem -> gallery identity
    for i, vec in enumerate(ids[:GALLERY_RENDERS]):
        (gallery / f"render{i}").mkdir()
        img, _ = render_sample(vec, None, 100 + i, 256, 0.0, 10.0)
        (gallery / f"render{i}" / "a.png").write_bytes(png_bytes(img))
        again, _ = render_sample(vec, perturb(vec, 0.3, 7 + i), 500 + i, 256, 0.3, 10.0)
        (photos / f"planted_rerender{i}.png").write_bytes(png_bytes(again))
        expected[f"planted_rerender{i}"] = f"render{i}"
    for i, vec in enumerate(ids[GALLERY_RENDERS:]):
        img, _ = render_sample(vec, None, 900 + i, 256, 0.3, 10.0)
        (photos / f"distinct_render{i}.png").write_bytes(png_bytes(img))
    real = [*_t1_faces(), np.asarray(skdata.astronaut())]
    in_gallery = {f"t1face{k}": real[k] for k in range(T1_IN_GALLERY)} | {"astronaut": real[-1]}
    for name, rgb in in_gallery.items():
        (gallery / name).mkdir()
        (gallery / name / "photo.jpg").write_bytes(jpeg_bytes(rgb, 95))
        (photos / f"planted_{name}_jpeg40.jpg").write_bytes(jpeg_bytes(rgb, 40))
        small = np.asarray(Image.fromarray(rgb).resize((round(rgb.shape[1] * 0.6), round(rgb.shape[0] * 0.6)),
                                                       Image.BILINEAR))
        (photos / f"planted_{name}_small.png").write_bytes(png_bytes(small))
        expected[f"planted_{name}_jpeg40"] = expected[f"planted_{name}_small"] = name
    for k in range(T1_IN_GALLERY, 6):
        (photos / f"distinct_t1face{k}.jpg").write_bytes(jpeg_bytes(real[k], 95))
    raw = {
        "name": "leakage-test",
        "run": {"seed": 0, "shard_size": 12},
        "stages": [
            {"stage": "ingest", "params": {"root": str(photos)}},
            {"stage": "detect", "params": {"backend": "yunet", "policy": "one_face_per_image"}},
            {"stage": "align"},
            {"stage": "embed", "params": {"backend": "sface"}},
            {"stage": "leakage", "params": {"gallery": str(gallery), "threshold": THRESHOLD}},
        ],
        "export": {"enabled": False},
    }
    cfg, stages = load_config(raw=raw)
    out = base / "run"
    result = Runner(cfg, stages, str(out), show_progress=False).run()
    assert not result.failures, result.failures
    ingest = pq.read_table(out / "manifests" / "ingest").to_pylist()
    stem = {r["sample_id"]: Path(r["source_path"]).stem for r in ingest}
    rows = {stem[r["sample_id"]]: r for r in pq.read_table(out / "manifests" / "leakage").to_pylist()}
    return {"out": out, "rows": rows, "expected": expected, "gallery": gallery, "stages": stages}


def test_planted_near_copies_of_gallery_identities_are_all_flagged(leak_run: dict) -> None:
    rows, expected = leak_run["rows"], leak_run["expected"]
    planted = {k: r for k, r in rows.items() if k.startswith("planted_")}
    assert set(planted) == set(expected)  # every planted file reached the gate (none lost upstream)
    for name, row in planted.items():
        assert row["status"] == "ok" and row["keep"] is False, (name, row["leakage_score"], row["leakage_identity"])
        assert row["reason"] == "leakage_above_max"
        assert row["leakage_identity"] == expected[name], name
        assert row["leakage_item"].startswith(expected[name] + "/") and row["leakage_item"] in row["detail"]
        assert row["leakage_score"] >= THRESHOLD


def test_distinct_identities_are_not_flagged(leak_run: dict) -> None:
    rows = leak_run["rows"]
    distinct = {k: r for k, r in rows.items() if k.startswith("distinct_")}
    assert len(distinct) == GALLERY_RENDERS + 6 - T1_IN_GALLERY
    for name, row in distinct.items():
        assert row["status"] == "ok" and row["keep"] is True, (name, row["leakage_score"], row["detail"])
        assert row["leakage_score"] < THRESHOLD and row["leakage_identity"]
        if name.startswith("distinct_t1face"):  # real people: below SFace's published same-person cosine too
            assert row["leakage_score"] < 0.363, (name, row["leakage_score"])
    sha = gallery_sha256(str(leak_run["gallery"]), "photos")
    assert {r["leakage_gallery_sha256"] for r in rows.values()} == {sha}


def test_gallery_is_embedded_once_cached_by_hash_and_summarised(leak_run: dict) -> None:
    out: Path = leak_run["out"]
    store = RunStorage(str(out))
    pointer = json.loads(store.read_bytes(*gallery_pointer_path("leakage")))
    assert pointer["gallery_sha256"] == gallery_sha256(str(leak_run["gallery"]), "photos")
    assert pointer["gallery"]["items"] == GALLERY_RENDERS + T1_IN_GALLERY + 1
    index = out.joinpath(*gallery_cache_path(pointer["key"], GALLERY_INDEX))
    table = out.joinpath(*gallery_cache_path(pointer["key"], GALLERY_TABLE))
    assert index.is_file() and table.is_file()
    before = index.stat().st_mtime_ns
    stage = next(s for s in leak_run["stages"] if s.stage_id == "leakage")
    again = LeakageStage(stage.params, StageContext(run_dir=str(out), stage_id="leakage", seed=0))
    again.prepare(store)  # a resumed run: the cached index is reused, not rebuilt
    assert index.stat().st_mtime_ns == before
    assert again.fit()["thresholds"] == {"sample": {"threshold": THRESHOLD, "source": "param", "fit": None}}
    summary = json.loads((out / "report" / "leakage.summary.json").read_text())
    dist = summary["distribution"]
    assert summary["threshold"] == THRESHOLD and summary["metric"] == "cosine"
    assert {r["leakage_basis"] for r in leak_run["rows"].values()} == {"sample"}  # no labels: each image alone
    assert dist["samples"] == len(leak_run["rows"]) and dist["flagged"] == len(leak_run["expected"])
    assert sum(dist["histogram"]["counts"]) == dist["samples"]


def _render_crops(n: int, seed: int) -> list[np.ndarray]:
    det = YuNetDetector()
    ids = sample_gaussian_identities(n, 512, 0.35, seed).vectors
    crops = []
    for i, vec in enumerate(ids):
        img, _ = render_sample(vec, None, 40 + i, 256, 0.0, 10.0)
        f = det.detect(img)[0]
        crops.append(warp(img, align_to_template(f.landmarks5).matrix, 112))
    return crops


def test_a_bin_verification_set_is_a_gallery_whose_same_pairs_are_one_identity(tmp_path: Path) -> None:
    crops = _render_crops(4, 3)
    path = tmp_path / "mini.bin"
    write_pair_file(str(path), [png_bytes(c) for c in crops], [True, False])
    g = build_gallery(str(path), "bin", gallery_sha256(str(path), "bin"), YuNetDetector(), SFaceEmbedder())
    assert g.identities == ["mini:pair0", "mini:pair0", "mini:2", "mini:3"]
    assert g.items == ["mini[0]", "mini[1]", "mini[2]", "mini[3]"]
    np.testing.assert_allclose(np.linalg.norm(g.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(g.vectors, SFaceEmbedder().embed(crops), atol=1e-5)  # crops used as they are


def test_a_parquet_gallery_must_be_in_the_runs_embedding_space(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    vectors = pa.array(list(x), type=pa.list_(pa.float32(), 128))
    pq.write_table(pa.table({"embedding": vectors, "identity": ["a", "a", "b"],
                             "embedding_space": ["sface-128"] * 3}), good)
    pq.write_table(pa.table({"embedding": vectors, "identity": ["a", "a", "b"],
                             "embedding_space": ["dlib-resnet-128"] * 3}), bad)
    g = build_gallery(str(good), "embeddings", "h", None, SFaceEmbedder())
    assert g.identities == ["a", "a", "b"] and g.items == ["row0", "row1", "row2"]
    np.testing.assert_allclose(np.linalg.norm(g.vectors, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="only comparable within one space"):
        build_gallery(str(bad), "embeddings", "h", None, SFaceEmbedder())


def test_a_leakage_config_without_a_gallery_fails_before_any_work() -> None:
    with pytest.raises(ValueError, match="gallery"):
        LeakageParams.model_validate({})


def test_a_changed_gallery_is_refused_once_shards_were_scored_against_the_old_one(leak_run: dict) -> None:
    """Runs last in this module: it adds a file to the shared gallery (and takes it out again)."""
    out: Path = leak_run["out"]
    stage = next(s for s in leak_run["stages"] if s.stage_id == "leakage")
    assert LeakageStage.doctor(stage.params) == []
    assert LeakageStage.doctor(LeakageParams(gallery=str(out / "nowhere"))) != []
    extra = leak_run["gallery"] / "newcomer" / "a.png"
    extra.parent.mkdir()
    extra.write_bytes(png_bytes(np.full((64, 64, 3), 128, np.uint8)))
    try:
        again = LeakageStage(stage.params, StageContext(run_dir=str(out), stage_id="leakage", seed=0))
        with pytest.raises(ValueError, match="gallery_sha256="):
            again.prepare(RunStorage(str(out)))
    finally:
        extra.unlink()
        extra.parent.rmdir()


def test_report_draws_the_similarity_distribution_with_the_threshold_line(leak_run: dict) -> None:
    from pipeline.report import build_report

    html = build_report(RunStorage(str(leak_run["out"])))
    scored, flagged = len(leak_run["rows"]), len(leak_run["expected"])
    assert f"{scored} scored, {flagged} dropped · stage threshold {THRESHOLD:g} (param)" in html


def test_a_run_without_labels_fits_from_the_gallerys_distinct_identities(leak_run: dict) -> None:
    out: Path = leak_run["out"]
    stage = LeakageStage(LeakageParams(gallery=str(leak_run["gallery"])),
                         StageContext(run_dir=str(out), stage_id="leakage", seed=0))
    ptr = stage.pointer()
    assert ptr is not None
    fitted = stage._fit_samples(ptr, np.zeros((0, 128), np.float32), np.empty(0, dtype=str))
    identities = GALLERY_RENDERS + T1_IN_GALLERY + 1
    assert fitted["fit"]["n_impostor"] == identities * (identities - 1) // 2  # every pair of two gallery people
    assert "gallery item pairs of distinct gallery identities" in fitted["source"]
    assert fitted["threshold"] >= 0.363  # never looser than SFace's published same-person point


# ---------------------------------------------------------------- the quickstart with its own people in the gallery

QS_IDENTITIES, QS_IMAGES, QS_LEAKED = 12, 8, 3


@pytest.fixture(scope="module")
def quickstart_leak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The quickstart config with the leakage gate after embed, every leakage param at its default but the
    identity partitions (16 for 12 identities: several, and some empty)."""
    base = tmp_path_factory.mktemp("qs-leak")
    gallery = base / "gallery"
    vectors = sample_gaussian_identities(QS_IDENTITIES, 512, 0.35, 0).vectors  # the run's identities (seed 0)
    for i in range(QS_LEAKED):  # a new frontal render of each, not one of the run's images
        (gallery / f"idx{i}").mkdir(parents=True)
        img, _ = render_sample(vectors[i], None, 7000 + i, 256, 0.0, 20.0)
        (gallery / f"idx{i}" / "a.png").write_bytes(png_bytes(img))
    raw = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    at = next(i for i, s in enumerate(raw["stages"]) if s["stage"] == "embed")
    raw["stages"].insert(at + 1, {"stage": "leakage", "params": {"gallery": str(gallery), "partitions": 16}})
    cfg, stages = load_config(raw=raw, overrides=[f"identities.count={QS_IDENTITIES}",
                                                  f"identities.images_per_identity={QS_IMAGES}", "run.shard_size=32"])
    out = base / "run"
    result = Runner(cfg, stages, str(out), show_progress=False).run()
    assert result.complete, result
    index = {r["identity_id"]: r["index"] for r in pq.read_table(out / "identities" / "identities.parquet").to_pylist()}
    assert np.allclose(np.stack(pq.read_table(out / "identities" / "identities.parquet").column("vector").to_pylist()),
                       vectors, atol=1e-6)
    rows = pq.read_table(out / "manifests" / "leakage").to_pylist()
    return {"out": out, "rows": rows, "index": index, "cfg": cfg, "stages": stages}


def test_every_image_of_a_gallery_person_goes_and_almost_no_other_does(quickstart_leak: dict) -> None:
    rows, index = quickstart_leak["rows"], quickstart_leak["index"]
    leaked = [r for r in rows if index[r["identity_id"]] < QS_LEAKED]
    innocent = [r for r in rows if index[r["identity_id"]] >= QS_LEAKED]
    assert len(leaked) == QS_LEAKED * QS_IMAGES and len(innocent) == (QS_IDENTITIES - QS_LEAKED) * QS_IMAGES
    flagged = [r for r in innocent if not r["keep"]]
    assert len(flagged) <= 0.01 * len(innocent), [(r["leakage_score"], r["leakage_identity"]) for r in flagged]
    for r in leaked:
        assert r["status"] == "ok" and r["keep"] is False, (r["leakage_score"], r["threshold"])
        assert r["reason"] == "leakage_identity_above_max" and r["leakage_basis"] == "identity"
        assert r["leakage_identity"] == f"idx{index[r['identity_id']]}"  # the right person named
        assert r["leakage_identity"] in r["detail"] and r["identity_id"] in r["detail"]
    threshold = {r["threshold"] for r in rows}
    assert len(threshold) == 1 and threshold.pop() > 0.363  # fitted above SFace's photo point: renders sit closer
    assert {r["threshold_source"] for r in rows} == {rows[0]["threshold_source"]}
    assert rows[0]["threshold_source"].startswith("fit_far=0.001 on ")


def test_the_fitted_threshold_its_rate_and_pairs_are_in_the_summary_report_and_card(quickstart_leak: dict) -> None:
    out: Path = quickstart_leak["out"]
    row = quickstart_leak["rows"][0]
    summary = json.loads((out / "report" / "leakage.summary.json").read_text())
    ident = summary["thresholds"]["identity"]
    assert summary["fit_far"] == 0.001 and summary["threshold"] == pytest.approx(row["threshold"])
    assert ident["source"] == row["threshold_source"]
    assert ident["fit"]["target_far"] == 0.001 and ident["fit"]["far"] <= 0.001 and ident["fit"]["floor"] == 0.363
    # every sampled identity centroid against every image of the 11 other identities
    assert ident["fit"]["n_impostor"] == QS_IDENTITIES * (QS_IDENTITIES - 1) * QS_IMAGES
    assert summary["distribution"]["flagged"] == QS_LEAKED * QS_IMAGES
    html = (out / "report" / "index.html").read_text()
    assert f"stage threshold {row['threshold']:.3g} ({row['threshold_source']})" in html
    card = (out / "export" / "README.md").read_text()
    assert "## Leakage gate" in card
    assert f"threshold {ident['threshold']:.4g} ({ident['source']}; false-match rate " in card
    assert f"on {ident['fit']['n_impostor']} impostor pairs" in card


def test_a_resumed_run_decides_a_lost_shard_with_the_same_fitted_threshold(quickstart_leak: dict) -> None:
    out: Path = quickstart_leak["out"]
    shard = out / "manifests" / "leakage" / "000001.parquet"
    before = pq.read_table(shard).drop_columns(["worker", "processed_at", "duration_ms"]).to_pylist()
    shard.unlink()
    shutil.rmtree(out / "manifests" / "leakage" / "_compacted", ignore_errors=True)
    result = Runner(quickstart_leak["cfg"], quickstart_leak["stages"], str(out), show_progress=False).run()
    assert result.complete and result.stages["leakage"]["computed"] == 1, result.stages["leakage"]
    assert pq.read_table(shard).drop_columns(["worker", "processed_at", "duration_ms"]).to_pylist() == before
