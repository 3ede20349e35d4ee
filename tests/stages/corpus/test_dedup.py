"""Dedup through the real pipeline (ingest, fingerprint, YuNet detect, align, SFace embed, dedup) on
planted duplicates among distinct images: procedural renders (several renders of each identity, the
pictures most easily taken for one another) and photos (the six faces of insightface's t1.jpg and
skimage's astronaut). Every original gets four planted copies: a JPEG re-encode (quality 50-95), a 0.5x
resize, a 5% crop (centred or at a corner) and a horizontal flip. Measured: recall per transform (the
copy in its original's duplicate group) and false drops (a sample dropped for a sample of another
picture)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facekit.identities.gaussian import perturb
from facekit.renderer.render import render_sample
from pipeline.config import load_config
from pipeline.engine.runner import Runner
from tests.fixtures import jpeg_bytes, png_bytes

pytestmark = pytest.mark.usefixtures("ray_session")

IDENTITIES, RENDERS = 10, 4
SIGMAS = (0.3, 0.5, 0.7, 0.3)


def _crop(rgb: np.ndarray, n: int) -> np.ndarray:
    """5% off each axis: centred for even n, at the top-left corner for odd n."""
    h, w = rgb.shape[:2]
    dy, dx = round(0.05 * h), round(0.05 * w)
    if n % 2 == 0:
        return rgb[dy // 2 : h - (dy - dy // 2), dx // 2 : w - (dx - dx // 2)]
    return rgb[dy:, dx:]


TRANSFORMS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "jpeg": lambda rgb, n: jpeg_bytes(rgb, 50 + (n * 5) % 50),
    "half": lambda rgb, n: png_bytes(
        cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)),
    "crop": lambda rgb, n: png_bytes(np.ascontiguousarray(_crop(rgb, n))),
    "flip": lambda rgb, n: png_bytes(np.ascontiguousarray(rgb[:, ::-1])),
}


def _originals() -> dict[str, np.ndarray]:
    from skimage import data as skdata

    from facekit.backends.opencv_zoo import YuNetDetector

    insightface = pytest.importorskip("insightface")
    out: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(3)
    for i in range(IDENTITIES):
        vec = rng.standard_normal(512).astype(np.float32)
        vec /= np.linalg.norm(vec)
        for j in range(RENDERS):
            sigma = SIGMAS[j]
            rgb, _ = render_sample(vec, perturb(vec, sigma, 100 * i + j), 100 * i + j, 256, sigma, 20.0)
            out[f"render{i:02d}_{j}"] = rgb
    photo = np.asarray(Image.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").convert("RGB"))
    for k, f in enumerate(YuNetDetector().detect(photo)):
        x0, y0, x1, y1 = f.box
        m = 0.5 * max(x1 - x0, y1 - y0)
        a, b = int(max(0, x0 - m)), int(max(0, y0 - m))
        out[f"t1face{k}"] = np.ascontiguousarray(photo[b : int(y1 + m), a : int(x1 + m)])
    out["astronaut"] = np.asarray(skdata.astronaut())
    return out


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """One pipeline run over the planted folder; rows of the dedup manifest by file stem."""
    root = tmp_path_factory.mktemp("planted")
    for n, (name, rgb) in enumerate(_originals().items()):
        (root / f"{name}.png").write_bytes(png_bytes(rgb))
        for t, make in TRANSFORMS.items():
            data = make(rgb, n)
            ext = "jpg" if t == "jpeg" else "png"
            (root / f"{name}~{t}.{ext}").write_bytes(data)
    raw = {
        "name": "planted-dedup",
        "run": {"seed": 0, "shard_size": 64},
        "stages": [
            {"stage": "ingest", "params": {"root": str(root)}},
            {"stage": "fingerprint"},
            {"stage": "detect", "params": {"backend": "yunet", "policy": "one_face_per_image"}},
            {"stage": "align"},
            {"stage": "embed", "params": {"backend": "sface"}},
            {"stage": "dedup"},
        ],
        "export": {"min_images_per_identity": 1, "val_fraction": 0.0},
    }
    cfg, stages = load_config(raw=raw)
    out = tmp_path_factory.mktemp("planted-run") / "run"
    res = Runner(cfg, stages, str(out), show_progress=False).run()
    assert res.complete, res.failures
    ingest = pq.read_table(out / "manifests" / "ingest").to_pylist()
    stem = {r["sample_id"]: Path(r["source_path"]).stem for r in ingest}
    rows = {stem[r["sample_id"]]: r for r in pq.read_table(out / "manifests" / "dedup").to_pylist()}
    summary = json.loads((out / "report" / "dedup.summary.json").read_text())
    return {"rows": rows, "summary": summary, "stems": {s: s for s in stem.values()}}


def test_planted_reencodes_resizes_crops_and_flips_are_found_and_no_distinct_picture_is_dropped(
    planted_run: dict[str, dict[str, object]],
) -> None:
    rows: dict[str, dict[str, object]] = planted_run["rows"]  # type: ignore[assignment]
    id_of = {r["sample_id"]: stem for stem, r in rows.items()}
    originals = sorted(s for s in planted_run["stems"] if "~" not in s)
    recall: dict[str, float] = {}
    for t in TRANSFORMS:
        judged = [o for o in originals if o in rows and f"{o}~{t}" in rows]
        # a copy the detector misses never reaches dedup; nearly all must
        assert len(judged) >= 0.9 * len(originals), (t, len(judged))
        group = {o: rows[o]["dup_group_id"] for o in judged}
        found = [o for o in judged if group[o] and group[o] == rows[f"{o}~{t}"]["dup_group_id"]]
        recall[t] = len(found) / len(judged)
    false_drops = [stem for stem, r in rows.items() if not r["keep"]
                   and id_of[r["kept_sample_id"]].split("~")[0] != stem.split("~")[0]]
    print(f"dedup recall {recall}, false drops {len(false_drops)} of {len(rows)}, summary {planted_run['summary']}")
    assert all(v >= 0.95 for v in recall.values()), recall
    assert false_drops == []
    # Renders of one identity stay apart: close in identity space, they are reported, never grouped.
    renders = [r for stem, r in rows.items() if stem.startswith("render") and "~" not in stem]
    assert len({r["dup_group_id"] for r in renders}) == len(renders)
    summary: dict[str, object] = planted_run["summary"]
    assert summary["dropped"] == sum(summary["duplicates"].values())  # type: ignore[union-attr]
    assert {"picture_min_similarity", "embedding_threshold", "phash_max_distance"} <= set(summary)
