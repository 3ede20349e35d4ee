"""Curating a folder through the real pipeline: bad files, a group photo, planted duplicates and
identity grouping, each ending as a row with a reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facekit.renderer.render import render_sample
from pipeline.config import load_config
from pipeline.engine.runner import Runner
from tests.fixtures import jpeg_bytes, png_bytes

pytestmark = pytest.mark.usefixtures("ray_session")

IDENTITIES = 5
PER_IDENTITY = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    first: dict[int, np.ndarray] = {}
    for i in range(IDENTITIES):
        vec = rng.standard_normal(512).astype(np.float32)
        vec /= np.linalg.norm(vec)
        (root / f"person{i}").mkdir()
        for j in range(PER_IDENTITY):
            rgb, _ = render_sample(vec, vec, seed=100 * i + j, size=256, perturbation_sigma=0.4, max_yaw=15)
            (root / f"person{i}" / f"img{j}.png").write_bytes(png_bytes(rgb))
            first.setdefault(i, rgb)
    # Planted duplicates of person0/img0 and person1/img0: a byte copy, a JPEG re-encode, a resize.
    (root / "person0" / "copy.png").write_bytes((root / "person0" / "img0.png").read_bytes())
    (root / "person1" / "reencoded.jpg").write_bytes(jpeg_bytes(first[1], 90))
    small = np.asarray(Image.fromarray(first[2]).resize((200, 200), Image.BILINEAR))
    (root / "person2" / "resized.png").write_bytes(png_bytes(small))
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("this is not an image")
    (bad / "truncated.jpg").write_bytes(jpeg_bytes(first[3])[:600])
    (bad / "tiny.png").write_bytes(png_bytes(np.zeros((1, 1, 3), np.uint8)))
    Image.new("L", (12000, 12000)).save(bad / "huge.png", optimize=False, compress_level=1)
    (bad / "noface.png").write_bytes(png_bytes(np.full((200, 200, 3), 127, np.uint8)))
    from importlib.resources import files

    group = files("insightface") / "data" / "images" / "t1.jpg"
    (root / "group").mkdir()
    (root / "group" / "t1.jpg").write_bytes(group.read_bytes())
    # The same photo as a phone stores it held sideways: pixels a quarter turn away, EXIF 8 to undo it.
    exif = Image.Exif()
    exif[0x0112] = 8
    sideways = Image.open(io.BytesIO(group.read_bytes())).transpose(Image.Transpose.ROTATE_270)
    sideways.save(root / "group" / "t1_phone.jpg", format="JPEG", quality=95, exif=exif)
    return root


def test_folder_curation_keeps_a_reason_for_every_bad_item_and_groups_identities(folder: Path,
                                                                                 tmp_path: Path) -> None:
    raw = {
        "name": "curate-test",
        "run": {"seed": 0, "shard_size": 16},
        "stages": [
            {"stage": "ingest", "params": {"root": str(folder), "labels_from_dirs": True}},
            {"stage": "fingerprint"},
            {"stage": "detect", "params": {"backend": "dlib", "options": {"upsample": 1},
                                           "policy": "sample_per_face"}},
            {"stage": "align"},
            {"stage": "embed"},
            {"stage": "dedup"},
            {"stage": "grouping", "params": {"threshold": 0.3, "gt_column": "identity_id"}},
        ],
        "export": {"min_images_per_identity": 1, "val_fraction": 0.0},
    }
    cfg, stages = load_config(raw=raw)
    out = tmp_path / "run"
    res = Runner(cfg, stages, str(out), show_progress=False).run()
    assert res.complete, res.failures
    ingest = {r["source_path"]: r for r in pq.read_table(out / "manifests" / "ingest").to_pylist()}
    reasons = {p.split("/")[-1]: r["reason"] for p, r in ingest.items() if r["status"] == "error"}
    assert set(reasons) == {"zero.jpg", "notes.jpg", "truncated.jpg", "tiny.png", "huge.png"}, reasons
    assert reasons["zero.jpg"] == "empty_file" and reasons["notes.jpg"] == "not_an_image"
    assert reasons["huge.png"] == "image_too_large" and reasons["tiny.png"] == "image_too_small"
    detect = pq.read_table(out / "manifests" / "detect").to_pylist()
    by_parent: dict[str, list[dict]] = {}
    for r in detect:
        by_parent.setdefault(r["parent_id"] or r["sample_id"], []).append(r)
    path_of = {r["sample_id"]: p for p, r in ingest.items()}
    noface = [r for sid, rows in by_parent.items() if path_of.get(sid, "").endswith("noface.png") for r in rows]
    assert len(noface) == 1 and noface[0]["status"] == "error" and noface[0]["reason"] == "no_face"
    group = [r for sid, rows in by_parent.items() if path_of.get(sid, "").endswith("t1.jpg") for r in rows]
    assert len(group) == 6 and all(r["parent_id"] and r["status"] == "ok" for r in group)
    # The sideways-stored copy is seen upright: same size, its six faces where the upright photo has them.
    phone = [r for sid, rows in by_parent.items() if path_of.get(sid, "").endswith("t1_phone.jpg") for r in rows]
    assert len(phone) == 6 and all(r["status"] == "ok" for r in phone)
    boxes = [np.array(sorted(r["face_box"] for r in rows)) for rows in (group, phone)]
    assert np.abs(boxes[0] - boxes[1]).max() < 4, boxes
    sizes = [tuple(ingest[f"group/{name}"][k] for k in ("width", "height", "orientation"))
             for name in ("t1.jpg", "t1_phone.jpg")]
    assert sizes == [(1280, 886, 1), (1280, 886, 8)]
    dedup = {r["sample_id"]: r for r in pq.read_table(out / "manifests" / "dedup").to_pylist()}
    src_of = {r["sample_id"]: path_of.get(r["parent_id"], "") for r in detect if r["status"] == "ok"}
    dropped = {"/".join(src_of[s].split("/")[-2:]) for s, r in dedup.items() if not r["keep"]}
    planted = {"person0/copy.png", "person0/img0.png", "person1/reencoded.jpg", "person1/img0.png",
               "person2/resized.png", "person2/img0.png", "group/t1.jpg", "group/t1_phone.jpg"}
    assert len(dropped - {"group/t1.jpg", "group/t1_phone.jpg"}) == 3 and dropped <= planted, dropped
    # ... and each of its faces is a duplicate of the upright photo's: six of the twelve are dropped.
    group_drops = [s for s, r in dedup.items() if not r["keep"] and src_of.get(s, "").startswith("group/")]
    assert len(group_drops) == 6
    summary = json.loads((out / "report" / "grouping.summary.json").read_text())
    assert summary["purity"] >= 0.95, summary
    # Every ingested file is accounted for: a row with ok or an error reason, none vanished.
    assert len(ingest) == IDENTITIES * PER_IDENTITY + 3 + 6 + 2
