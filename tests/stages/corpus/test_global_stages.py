"""Global stages (consistency, separation, dedup, grouping) and the fingerprint mapper.

Acceptance tests run on real faces: procedural renders (facekit.renderer.render) embedded with dlib's
ResNet through dlib directly (HOG detector, 68-point predictor, ``face_recognition_models`` weights),
with duplicates, other-identity images and identity clones planted by the tests. Edge cases use small
synthetic vectors. Consistency and separation run their distributed steps in this process (LocalCorpus) over
the table written as a run of several shards; dedup is called on the whole table (``run_global``).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest

from facekit.imaging import decode_rgb, encode_jpeg, encode_png
from stages.base import EmptyParams, StageContext, stable_hash
from stages.corpus.consistency import ConsistencyParams, ConsistencyStage
from stages.corpus.dedup import DedupParams, DedupStage
from stages.corpus.grouping import GroupingParams, GroupingStage
from stages.corpus.separation import SeparationParams, SeparationStage
from stages.mappers.fingerprint import FingerprintStage
from tests.fixtures.synthetic_corpus import decide_table, run_written, write_table_run

CTX = StageContext(run_dir="/tmp/unused", stage_id="test", seed=0)
DLIB = "dlib-resnet-128"
IDENTITIES, IMAGES = 20, 8
SIGMAS = (0.3, 0.3, 0.5, 0.5, 0.7)  # the Vec2Face-style schedule the generator uses (40/40/20 %)


# --------------------------------------------------------------------------- real faces


@dataclass
class Face:
    sample_id: str
    kind: str  # clean / other / swap / clone / dup-<variant>
    label: str  # the identity_id the sample carries
    truth: str  # the identity it really shows
    image: bytes
    embedding: np.ndarray | None
    source: str | None = None  # for planted duplicates: the clean sample they copy


class DlibFaces:
    """dlib's own pipeline: HOG (upsample 1), 68 points, ResNet descriptor of dlib's chip."""

    def __init__(self) -> None:
        import dlib

        spec = importlib.util.find_spec("face_recognition_models")
        assert spec is not None and spec.submodule_search_locations
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(self, image: bytes) -> np.ndarray | None:
        rgb = np.ascontiguousarray(decode_rgb(image))
        boxes = self.detector(rgb, 1)
        if not boxes:
            return None
        box = max(boxes, key=lambda b: b.area())
        return np.asarray(self.net.compute_face_descriptor(rgb, self.predictor(rgb, box)), dtype=np.float32)


def _render(vector: np.ndarray, seed: int) -> bytes:
    renderer = pytest.importorskip("facekit.renderer.render")
    from facekit.identities.gaussian import perturb

    sigma = SIGMAS[seed % len(SIGMAS)]
    rgb, _ = renderer.render_sample(
        vector, perturb(vector, sigma, seed), seed=seed, size=256, perturbation_sigma=sigma
    )
    return encode_png(rgb)


DUP_VARIANTS = {
    "exact": lambda b: b,
    "png-recompressed": lambda b: encode_png(decode_rgb(b), compress_level=9),
    "jpeg75": lambda b: encode_jpeg(decode_rgb(b), quality=75),
    "jpeg90": lambda b: encode_jpeg(decode_rgb(b), quality=90),
    "resized192": lambda b: encode_png(cv2.resize(decode_rgb(b), (192, 192), interpolation=cv2.INTER_AREA)),
    "resized160-jpeg": lambda b: encode_jpeg(
        cv2.resize(decode_rgb(b), (160, 160), interpolation=cv2.INTER_AREA), quality=90
    ),
}


@pytest.fixture(scope="module")
def faces() -> list[Face]:
    """20 identities x 8 renders, plus planted other-identity images, label swaps, clones and duplicates."""
    dlib_faces = DlibFaces()
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((IDENTITIES + 10, 512))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    name = [f"id{k:03d}" for k in range(IDENTITIES)] + [f"out{k:03d}" for k in range(10)]
    out: list[Face] = []

    def add(kind: str, label: str, truth: int, image: bytes, source: str | None = None) -> None:
        sid = "s" + stable_hash([kind, label, len(out)], 15)
        out.append(Face(sid, kind, label, name[truth], image, dlib_faces.embed(image), source))

    for k in range(IDENTITIES):
        for m in range(IMAGES):
            add("clean", name[k], k, _render(vectors[k], 1000 * k + m))
    for k in range(IDENTITIES):  # two people from inside the run, one from outside it
        for n, step in enumerate((7, 13)):
            j = (k + step) % IDENTITIES
            add("swap", name[k], j, _render(vectors[j], 60_000 + 100 * n + k))
        add("other", name[k], IDENTITIES + k % 10, _render(vectors[IDENTITIES + k % 10], 50_000 + k))
    for c in range(3):  # the same person generated again under another id, later in sorted order
        for m in range(IMAGES):
            add("clone", f"zz{c:03d}", c, _render(vectors[c], 70_000 + 100 * c + m))
    clean = [f for f in out if f.kind == "clean" and f.embedding is not None]
    for n, (variant, make) in enumerate(list(DUP_VARIANTS.items()) * 3):
        src = clean[(n * 11) % len(clean)]
        add(f"dup-{variant}", src.label, name.index(src.truth), make(src.image), src.sample_id)
    return out


def embedded(faces: list[Face], kinds: set[str]) -> list[Face]:
    return [
        f for f in faces if f.embedding is not None and (f.kind in kinds or f.kind.split("-")[0] in kinds)
    ]


def face_table(rows: list[Face], labels: bool = True, extra: dict[str, list[Any]] | None = None) -> pa.Table:
    """The table the runner hands a global stage: carried columns + the embed stage's columns."""
    n = len(rows)
    data: dict[str, Any] = {
        "sample_id": [f.sample_id for f in rows],
        "key": [f.sample_id for f in rows],
        "identity_id": [f.label if labels else None for f in rows],
        "parent_id": [None] * n,
        "embedding": pa.array(
            [None if f.embedding is None else f.embedding.tolist() for f in rows], pa.list_(pa.float32(), 128)
        ),
        "embedding_space": [DLIB] * n,
        "embedding_metric": ["euclidean"] * n,
    }
    data.update(extra or {})
    return pa.table(data)


def judgeable(rows: list[Face], min_clean: int = 3) -> list[Face]:
    """Rows of identities with enough embedded clean images to have a centroid at all."""
    clean = Counter(f.label for f in rows if f.kind == "clean")
    return [f for f in rows if clean[f.label] >= min_clean]


# --------------------------------------------------------------------------- consistency


def test_consistency_drops_planted_other_identity_images_and_keeps_clean_ones(
    faces: list[Face], tmp_path: Path
) -> None:
    rows = judgeable(embedded(faces, {"clean", "swap"}))
    params = ConsistencyParams(mode="generated", fit_far=0.01)
    out, summary = decide_table(ConsistencyStage, params, face_table(rows), str(tmp_path / "run"))

    assert out["sample_id"] == [f.sample_id for f in rows]
    keep = np.array(out["keep"])
    planted = np.array([f.kind == "swap" for f in rows])
    dropped, kept = (~keep[planted]).mean(), keep[~planted].mean()
    print(f"consistency: planted dropped {dropped:.3f} of {planted.sum()}, clean kept {kept:.3f}")
    assert dropped >= 0.95
    assert kept >= 0.95
    assert set(out["threshold_source"]) == {"fit_far=0.01"}
    fit = summary["fit"]
    assert fit["far"] <= 0.01 and fit["n_impostor"] > 1000
    reasons = [r for r, k in zip(out["reason"], keep, strict=True) if not k]
    assert set(reasons) == {"inconsistent_identity"}
    assert all(d.startswith("centroid score ") for d, k in zip(out["detail"], keep, strict=True) if not k)


def test_images_of_strangers_are_dropped_and_keep_nearest_trades_a_few_for_clean_images(
    faces: list[Face], tmp_path: Path
) -> None:
    """Images of people outside the run: the strict rule drops all beyond the threshold; keep_nearest
    also keeps the ones that happen to be nearest their label (about 1 in K) -- and the clean images
    that only glasses or pose moved away."""
    rows = judgeable(embedded(faces, {"clean", "other"}))
    strangers = np.array([f.kind == "other" for f in rows])
    figures = {}
    for keep_nearest in (False, True):
        params = ConsistencyParams(mode="generated", fit_far=0.01, keep_nearest=keep_nearest)
        out, _ = decide_table(ConsistencyStage, params, face_table(rows), str(tmp_path / f"run-{keep_nearest}"))
        keep = np.array(out["keep"])
        figures[keep_nearest] = ((~keep[strangers]).mean(), keep[~strangers].mean())
    print(f"strangers dropped / clean kept: strict {figures[False]}, keep_nearest {figures[True]}")
    assert figures[False][0] >= 0.95
    assert figures[True][0] >= 0.8
    assert figures[True][1] > figures[False][1]


def test_label_noise_mode_names_the_identity_a_swapped_image_belongs_to(faces: list[Face], tmp_path: Path) -> None:
    rows = judgeable(embedded(faces, {"clean", "swap"}))
    params = ConsistencyParams(mode="label_noise", fit_far=0.01)
    out, _ = decide_table(ConsistencyStage, params, face_table(rows), str(tmp_path / "run"))

    swaps = [i for i, f in enumerate(rows) if f.kind == "swap"]
    caught = [i for i in swaps if not out["keep"][i]]
    assert len(caught) >= 0.95 * len(swaps)
    named = sum(out["nearest_other_identity"][i] == rows[i].truth for i in caught)
    assert named >= 0.9 * len(caught)
    assert all(f"nearer {out['nearest_other_identity'][i]}" in out["detail"][i] for i in caught)
    clean = [i for i, f in enumerate(rows) if f.kind == "clean"]
    assert np.mean([out["keep"][i] for i in clean]) >= 0.95


# --------------------------------------------------------------------------- separation


def test_separation_drops_the_later_identity_of_each_planted_collision(faces: list[Face], tmp_path: Path) -> None:
    rows = embedded(faces, {"clean", "clone"})
    params = SeparationParams(policy="drop_later", fit_quantile=0.99)
    out, summary = decide_table(SeparationStage, params, face_table(rows), str(tmp_path / "run"))

    dropped = {rows[i].label for i, k in enumerate(out["keep"]) if not k}
    assert dropped == {"zz000", "zz001", "zz002"}
    for i, f in enumerate(rows):
        if f.kind == "clone":
            assert out["reason"][i] == "identity_collision"
            assert out["detail"][i].startswith(f"with {f.truth} (")
            assert out["collision_with"][i] == f.truth
            assert out["collision_score"][i] < out["threshold"][i]
        else:
            assert out["keep"][i] and out["reason"][i] is None
    assert summary["dropped_identities"] == 3


def test_separation_merge_relabels_a_collision_to_its_partner(faces: list[Face], tmp_path: Path) -> None:
    rows = embedded(faces, {"clean", "clone"})
    params = SeparationParams(policy="merge", fit_quantile=0.99)
    out, _ = decide_table(SeparationStage, params, face_table(rows), str(tmp_path / "run"))

    assert all(out["keep"])
    for i, f in enumerate(rows):
        assert out["identity_id"][i] == f.truth  # clones take the id of the person they show
        assert out["collision_with"][i] == (f.truth if f.kind == "clone" else None)


# --------------------------------------------------------------------------- dedup


def test_dedup_catches_every_planted_duplicate_and_drops_no_clean_sample(faces: list[Face]) -> None:
    rows = [f for f in faces if f.kind == "clean" or f.kind.startswith("dup-")]
    prints = FingerprintStage(EmptyParams(), CTX).process(
        {"sample_id": [f.sample_id for f in rows], "image": [f.image for f in rows]}
    )
    assert all(s == "ok" for s in prints["status"])
    columns = ("content_sha256", "pixel_sha256", "phash", "phash_mirror", "thumbnail", "width", "height",
               "image_format")
    stage = DedupStage(DedupParams(), CTX)
    out = stage.run_global(face_table(rows, extra={c: prints[c] for c in columns}))

    group = dict(zip(out["sample_id"], out["dup_group_id"], strict=True))
    keep = dict(zip(out["sample_id"], out["keep"], strict=True))
    for f in rows:
        if f.source is not None:
            assert group[f.sample_id] is not None and group[f.sample_id] == group[f.source], f.kind
    by_group: dict[str, list[Face]] = {}
    for f in rows:
        if group[f.sample_id]:
            by_group.setdefault(group[f.sample_id], []).append(f)
    for members in by_group.values():
        assert sum(f.kind == "clean" for f in members) == 1  # never two distinct renders in one group
        assert sum(keep[f.sample_id] for f in members) == 1
    clean_dropped = [f.kind for f in rows if f.kind == "clean" and not keep[f.sample_id]]
    same_pixels = {f.source for f in rows if f.kind in ("dup-exact", "dup-png-recompressed")}
    # a clean sample may only lose to a pixel-identical copy of itself (then either copy is the same)
    assert all(f.sample_id in same_pixels for f in rows if f.kind == "clean" and not keep[f.sample_id])
    kinds = dict(zip(out["sample_id"], out["dup_kind"], strict=True))
    assert {kinds[f.sample_id] for f in rows if f.kind in ("dup-exact", "dup-png-recompressed")} == {"exact"}
    assert {kinds[f.sample_id] for f in rows if f.kind.startswith("dup-j") or f.kind.startswith("dup-r")} <= {
        "phash",
        "embedding",
    }
    print(f"dedup: {stage.summary()}, clean dropped {len(clean_dropped)}")


def test_dedup_keep_rule_prefers_quality_then_size_then_lossless_then_sample_id() -> None:
    table = pa.table(
        {
            "sample_id": ["a", "b", "c", "d", "e", "f"],
            "key": ["a", "b", "c", "d", "e", "f"],
            "identity_id": ["x"] * 6,
            "parent_id": [None] * 6,
            "content_sha256": ["h1", "h1", "h2", "h2", "h3", "h3"],
            "pixel_sha256": ["p1", "p2", "p3", "p4", "p5", "p6"],
            "phash": ["0" * 16, "f" * 16, "0f" * 8, "f0" * 8, "00ff" * 4, "ff00" * 4],
            "width": [100, 200, 100, 100, 100, 100],
            "height": [100, 200, 100, 100, 100, 100],
            "image_format": ["png", "jpeg", "jpeg", "png", "png", "png"],
            "sharpness": [0.9, 0.1, None, None, None, None],
        }
    )
    plain = DedupStage(DedupParams(embeddings=False), CTX).run_global(table)
    assert plain["kept_sample_id"] == ["b", "b", "d", "d", "e", "e"]  # larger; lossless; smaller id
    quality = DedupStage(DedupParams(embeddings=False, prefer="sharpness"), CTX).run_global(table)
    assert quality["kept_sample_id"][:2] == ["a", "a"]
    assert quality["keep"] == [True, False, False, True, True, False]
    assert quality["reason"][1] == "duplicate_of" and quality["detail"][1] == "exact: a"
    assert "sharpness" in DedupStage(DedupParams(prefer="sharpness"), CTX).needs


def test_dedup_decisions_do_not_depend_on_row_order_and_identity_closeness_alone_drops_nothing() -> None:
    """20 pairs close in identity space: the first 10 also show the same picture (one copy mirrored), the
    other 10 are different pictures -- redundant variants, reported and kept."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    x[20:] = x[:20] + 0.001
    ids = [f"s{i:02d}" for i in range(40)]
    pictures = rng.integers(0, 255, (30, 32, 32, 3), dtype=np.uint8)
    thumbs = [pictures[i].tobytes() for i in range(20)]
    thumbs += [np.ascontiguousarray(pictures[i][:, ::-1]).tobytes() for i in range(10)]
    thumbs += [pictures[i].tobytes() for i in range(20, 30)]

    def table(order: np.ndarray) -> pa.Table:
        return pa.table(
            {
                "sample_id": [ids[i] for i in order],
                "key": [ids[i] for i in order],
                "identity_id": [None] * 40,
                "parent_id": [None] * 40,
                "embedding": pa.array([x[i].tolist() for i in order], pa.list_(pa.float32(), 16)),
                "embedding_space": [DLIB] * 40,
                "embedding_metric": ["euclidean"] * 40,
                "thumbnail": pa.array([thumbs[i] for i in order], pa.binary()),
            }
        )

    stage = DedupStage(DedupParams(), CTX)
    a = stage.run_global(table(np.arange(40)))
    b = DedupStage(DedupParams(), CTX).run_global(table(rng.permutation(40)))

    def as_map(out: dict[str, list[Any]]) -> dict[str, tuple[str, str, str]]:
        cols = ("dup_group_id", "kept_sample_id", "redundant_variant_of")
        return {s: tuple(out[c][k] for c in cols) for k, s in enumerate(out["sample_id"])}  # type: ignore[misc]

    assert as_map(a) == as_map(b)
    dropped = {s for s, k in zip(a["sample_id"], a["keep"], strict=True) if not k}
    assert dropped == {f"s{i:02d}" for i in range(20, 30)}
    assert {a["dup_kind"][i] for i in range(40) if a["dup_group_id"][i]} == {"embedding"}
    variants = {s: r for s, r in zip(a["sample_id"], a["redundant_variant_of"], strict=True) if r}
    assert variants == {f"s{i + 20:02d}": f"s{i:02d}" for i in range(10, 20)}
    summary = stage.summary()
    assert summary["duplicates"] == {"exact": 0, "phash": 0, "embedding": 10}
    assert summary["redundant_variants"] == 10 and summary["not_same_picture"] == 10
    off = DedupStage(DedupParams(redundant_variants="off"), CTX).run_global(table(np.arange(40)))
    assert not any(off["redundant_variant_of"]) and off["keep"] == a["keep"]


# --------------------------------------------------------------------------- grouping


def test_grouping_recovers_procedural_identities_with_high_purity(faces: list[Face], tmp_path: Path) -> None:
    rows = embedded(faces, {"clean"})
    truth = [f.truth for f in rows]
    run = str(tmp_path / "run")
    shards = write_table_run(face_table(rows, labels=False, extra={"gt_identity_id": truth}), run, 40)
    params = GroupingParams(method="agglomerative", threshold=0.3, gt_column="gt_identity_id")
    exact, summary = run_written(GroupingStage, params, run, shards, "exact")
    _, fast = run_written(GroupingStage, params.model_copy(update={"method": "scalable"}), run, shards, "fast")

    print(f"grouping: {summary}\nscalable: {fast}")
    assert summary["purity"] >= 0.95
    assert summary["inverse_purity"] >= 0.8  # not purity by shattering everything into singletons
    assert summary["groups"] <= 3 * summary["gt_identities"]
    assert abs(fast["bcubed_f"] - summary["bcubed_f"]) <= 0.01
    sizes = Counter(r["identity_id"] for r in exact)
    assert all(r["group_size"] == sizes[r["identity_id"]] for r in exact)
    assert all(r["identity_id"].startswith("g") for r in exact)


# --------------------------------------------------------------------------- synthetic edge cases


def _vec_table(
    x: np.ndarray,
    labels: list[str | None],
    space: str = DLIB,
    metric: str = "euclidean",
    valid: list[bool] | None = None,
) -> pa.Table:
    n = len(x)
    valid = valid or [True] * n
    return pa.table(
        {
            "sample_id": [f"s{i:03d}" for i in range(n)],
            "key": [f"s{i:03d}" for i in range(n)],
            "identity_id": labels,
            "parent_id": [None] * n,
            "embedding": pa.array(
                [v.tolist() if ok else None for v, ok in zip(x, valid, strict=True)],
                pa.list_(pa.float32(), x.shape[1]),
            ),
            "embedding_space": [space] * n,
            "embedding_metric": [metric] * n,
        }
    )


def test_consistency_keeps_a_row_for_every_sample_even_without_embedding_or_centroid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros((6, 8)) + rng.normal(0, 0.05, (6, 8)), np.ones((1, 8))]).astype(np.float32)
    x = np.concatenate([x, np.full((1, 8), 3.0, dtype=np.float32)])
    labels: list[str | None] = ["a"] * 6 + ["b", None]
    valid = [True] * 5 + [False, True, True]
    out, _ = decide_table(ConsistencyStage, ConsistencyParams(threshold=0.5), _vec_table(x, labels, valid=valid),
                          str(tmp_path / "run"), shard_rows=3)

    assert len(out["sample_id"]) == 8
    assert all(out["keep"])  # nothing to judge against: no embedding, a lone identity, no label
    assert out["centroid_score"][5] is None and out["centroid_score"][6] is None
    assert out["centroid_score"][0] is not None and out["centroid_score"][0] < 0.5
    assert out["threshold_source"][0] == "param"


def test_consistency_in_a_cosine_space_drops_the_planted_vector(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((5, 64))
    x = np.repeat(centres, 8, axis=0) + 0.3 * rng.standard_normal((40, 64))
    x[3] = rng.standard_normal(64) * 2  # identity 0's 4th image shows nobody in the run
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [f"id{i // 8}" for i in range(40)]
    table = _vec_table(x.astype(np.float32), labels, space="arcface-r100-512", metric="cosine")
    out, _ = decide_table(ConsistencyStage, ConsistencyParams(keep_nearest=False), table, str(tmp_path / "run"), 16)

    assert [i for i, k in enumerate(out["keep"]) if not k] == [3]
    assert out["score_metric"][0] == "cosine" and out["threshold_source"][0] == "default:arcface-r100-512"
    assert out["centroid_score"][0] > out["threshold"][0] > out["centroid_score"][3]


def test_separation_greedy_order_keeps_an_identity_whose_only_partner_was_dropped(tmp_path: Path) -> None:
    # a--b and b--c collide, a--c do not: drop b (later than a), keep c (its partner b is gone)
    pts = {"a": 0.0, "b": 0.3, "c": 0.6, "d": 5.0}
    x = np.array([[pts[k] + 0.01 * j, 0.0] for k in pts for j in range(3)], dtype=np.float32)
    labels = [k for k in pts for _ in range(3)]
    out, _ = decide_table(SeparationStage, SeparationParams(threshold=0.4), _vec_table(x, labels),
                          str(tmp_path / "drop"), shard_rows=5)

    dropped = {labels[i] for i, k in enumerate(out["keep"]) if not k}
    assert dropped == {"b"}
    assert {out["reason"][i] for i in range(len(labels)) if labels[i] == "b"} == {"identity_collision"}
    assert {out["detail"][i].split(" (")[0] for i in range(len(labels)) if labels[i] == "b"} == {"with a"}
    merged, _ = decide_table(SeparationStage, SeparationParams(threshold=0.4, policy="merge"), _vec_table(x, labels),
                             str(tmp_path / "merge"), shard_rows=5)
    assert sorted(set(merged["identity_id"])) == ["a", "d"]  # a chain merges into its smallest id


def test_fingerprint_gives_same_pixel_hash_to_a_lossless_reencode_and_an_error_row_to_garbage() -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a, b = encode_png(rgb, compress_level=1), encode_png(rgb, compress_level=9)
    assert a != b
    out = FingerprintStage(EmptyParams(), CTX).process(
        {"sample_id": ["a", "b", "c", "d"], "image": [a, b, encode_jpeg(rgb), b"not an image"]}
    )
    assert out["content_sha256"][0] != out["content_sha256"][1]
    assert out["pixel_sha256"][0] == out["pixel_sha256"][1] != out["pixel_sha256"][2]
    assert len(out["phash"][0]) == 16 and out["image_format"][:3] == ["png", "png", "jpeg"]
    assert out["status"] == ["ok", "ok", "ok", "error"] and out["reason"][3] == "not_an_image"
    assert out["keep"][3] is False and out["phash"][3] is None
    assert len(out["thumbnail"][0]) == 32 * 32 * 3 and out["phash_mirror"][0] != out["phash"][0]


def test_picture_similarity_tells_a_crop_or_flip_of_a_render_from_another_render_of_the_same_identity() -> None:
    from facekit.identities.gaussian import perturb
    from facekit.renderer.render import render_sample
    from stages.mappers.fingerprint import picture_similarity, thumbnail

    vec = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    vec /= np.linalg.norm(vec)
    one, two = (render_sample(vec, perturb(vec, 0.3, s), s, 256, 0.3, 20.0)[0] for s in (11, 12))
    same = {
        "jpeg50": decode_rgb(encode_jpeg(one, quality=50)),
        "half": cv2.resize(one, (128, 128), interpolation=cv2.INTER_AREA),
        "crop5-corner": one[13:, 13:],
        "crop5-centre": one[6:-7, 6:-7],
        "flip": one[:, ::-1],
    }
    t = thumbnail(one)
    scores = {k: picture_similarity(t, thumbnail(np.ascontiguousarray(v))) for k, v in same.items()}
    assert all(v >= 0.97 for v in scores.values()), scores
    assert picture_similarity(t, thumbnail(two)) < 0.97


def test_every_global_stage_accepts_an_empty_table(tmp_path: Path) -> None:
    empty = _vec_table(np.zeros((0, 8), dtype=np.float32), [])
    stage = DedupStage(DedupParams(), CTX)
    out = stage.run_global(empty)
    assert out["sample_id"] == [] and out["keep"] == []
    assert isinstance(stage.summary(), dict)
    for cls, params in ((ConsistencyStage, ConsistencyParams()), (SeparationStage, SeparationParams())):
        out, summary = decide_table(cls, params, empty, str(tmp_path / cls.name))
        assert out["sample_id"] == [] and out["keep"] == []
        assert summary in ({"judged": 0}, {"identities": 0})
