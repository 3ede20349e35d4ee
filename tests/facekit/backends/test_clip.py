"""open_clip backend, clip_filter and the CLIP labeler on a tiny random-weight open_clip model.

The tiny model is a registered open_clip architecture (a JSON config) whose weights are saved and
loaded back through the same checkpoint code path as released weights: a named architecture plus a
checkpoint file, a ``local-dir:`` folder, and an ``hf-hub:`` repo found in a Hugging Face cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from facekit.backends.clip import ClipModel, ClipWeightsError, check_files
from facekit.imaging import encode_png
from facekit.labelers.clip import DEFAULT_ATTRIBUTES, ClipLabeler
from pipeline.engine.execution import StageSpec, build_manifest, process_isolated
from stages.base import STATUS_ERROR, STATUS_OK, Batch, Stage, StageContext
from stages.filters.clip_filter import ClipFilterParams, ClipFilterStage
from stages.labelers.labels import Labeler, LabelParams, LabelStage

ARCH = "facefoundry-tiny-clip"
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Config file, checkpoints in both formats, and a local-dir folder of one seeded random model."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_clip")
    config = root / f"{ARCH}.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in open_clip.create_model(ARCH).state_dict().items()}
    save_file(state, str(root / "tiny.safetensors"))
    torch.save(state, root / "tiny.pt")
    local = root / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    save_file(state, str(local / "open_clip_model.safetensors"))
    return {"config": config, "safetensors": root / "tiny.safetensors", "pt": root / "tiny.pt",
            "local": local}


@pytest.fixture(scope="module")
def model(tiny: dict[str, Path]) -> ClipModel:
    return ClipModel({"model": ARCH, "pretrained": str(tiny["safetensors"]),
                      "model_config_file": str(tiny["config"]), "device": "cpu"})


def manifest(stage: Stage, batch: Batch) -> pa.Table:
    """The stage's rows as the runner commits them (its own code, no Ray): proves the schema fits."""
    spec = StageSpec(stage_id=stage.context.stage_id, cls=type(stage), params=stage.params, batch_size=64,
                     fingerprint="f", params_hash="p", upstream=(), context=stage.context)
    out = process_isolated(stage, batch)
    return build_manifest(spec, stage, "000000", out, None, None, {}, "test", [])


def images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (40 + 8 * i, 36, 3), dtype=np.uint8) for i in range(n)]


def test_image_embeddings_are_unit_norm_deterministic_and_in_a_named_space(model: ClipModel) -> None:
    emb = model.embed_images(images())
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(model.embed_images(images()), emb)
    assert model.space == f"clip-{ARCH}-tiny-32"
    info = model.model_info()
    assert info.name == f"open_clip:{ARCH}:tiny.safetensors" and len(info.revision) == 16


@pytest.mark.parametrize("source", ["pt", "local"])
def test_every_checkpoint_layout_loads_the_same_weights(
    tiny: dict[str, Path], model: ClipModel, source: str
) -> None:
    spec = {"model": f"local-dir:{tiny['local']}"} if source == "local" else {
        "model": ARCH, "pretrained": str(tiny["pt"]), "model_config_file": str(tiny["config"])}
    other = ClipModel(spec)
    np.testing.assert_allclose(other.embed_images(images()), model.embed_images(images()), atol=1e-6)
    np.testing.assert_allclose(other.embed_texts(["a face"]), model.embed_texts(["a face"]), atol=1e-6)


def test_an_hf_hub_model_is_found_in_the_cache_without_network(
    tiny: dict[str, Path], model: ClipModel, tmp_path: Path
) -> None:
    repo = tmp_path / "models--facefoundry--tiny-clip"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for f in tiny["local"].iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    spec = {"model": "hf-hub:facefoundry/tiny-clip", "cache_dir": str(tmp_path)}
    assert check_files(spec) == []
    cached = ClipModel(spec).embed_images(images(1))
    np.testing.assert_allclose(cached, model.embed_images(images(1)), atol=1e-6)


def test_prompt_pair_probabilities_sum_to_one(model: ClipModel) -> None:
    text = model.embed_texts(["a sharp photo of a face", "a blurry photo of a face"])
    probs = model.probabilities(model.embed_images(images()), text)
    assert probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_released_weights_missing_from_the_cache_are_reported_not_downloaded(tmp_path: Path) -> None:
    spec = {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "cache_dir": str(tmp_path)}
    (problem,) = check_files(spec)
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in problem
    assert str(tmp_path) in problem and "allow_download" in problem
    with pytest.raises(ClipWeightsError):
        ClipModel(spec)
    assert ClipFilterStage.doctor(ClipFilterParams.model_validate({"clip": spec})) == [problem]
    (unknown,) = check_files({"model": "ViT-B-32", "pretrained": "no-such-tag"})
    assert "known tags" in unknown and "laion2b_s34b_b79k" in unknown
    (missing,) = check_files({"model": "ViT-B-32", "pretrained": str(tmp_path / "w.safetensors")})
    assert "does not exist" in missing


def test_clip_filter_stores_pair_scores_and_embeddings_and_decides_per_pair(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    params = ClipFilterParams.model_validate({
        "clip": {"model": f"local-dir:{tiny['local']}"},
        "pairs": [
            {"name": "sharp", "positive": "a sharp photo of a face", "negative": "a blurry photo of a face",
             "min_prob": 0.0},
            {"name": "photo", "positive": "a photograph", "negative": "a drawing", "min_prob": 1.0},
        ],
    })
    assert ClipFilterStage.doctor(params) == []
    stage = ClipFilterStage(params, StageContext(run_dir=str(tmp_path), stage_id="clip", seed=0))
    stage.setup()
    names = [f.name for f in stage.output_fields()]
    assert names == ["clip_sharp", "clip_photo", "clip_embedding", "clip_space"]
    data = [encode_png(a) for a in images()] + [b"\x89PNG truncated"]
    ids = ["a", "b", "c", "bad"]
    batch = {"sample_id": ids, "key": ids, "identity_id": [None] * 4, "parent_id": [None] * 4,
             "image": data, "image_ext": ["png"] * 4}
    out = stage.process(batch)
    assert out["sample_id"] == ids
    assert out["status"] == [STATUS_OK] * 3 + [STATUS_ERROR]
    assert out["keep"] == [False] * 4
    for i in range(3):
        assert 0.0 < out["clip_sharp"][i] < 1.0 and 0.0 < out["clip_photo"][i] < 1.0
        assert out["reason"][i] == "clip_photo_below_min"
        assert out["detail"][i] == f"clip_photo {out['clip_photo'][i]:.2f} < 1"
        assert len(out["clip_embedding"][i]) == 32 and out["clip_space"][i] == "clip-local-32"
    assert out["clip_sharp"][3] is None and out["reason"][3]
    table = manifest(stage, batch)
    assert table.column("clip_photo").to_pylist()[:3] == pytest.approx(out["clip_photo"][:3])
    assert table.column("status").to_pylist() == out["status"]


def test_clip_labeler_stores_the_label_its_probability_and_the_whole_distribution(
    tiny: dict[str, Path],
) -> None:
    labeler = ClipLabeler({"clip": {"model": f"local-dir:{tiny['local']}"}})
    assert isinstance(labeler, Labeler)
    names = [f.name for f in labeler.fields()]  # known before any model loads
    for attr in ("expression", "glasses", "hair", "age_group"):
        assert {f"clip_{attr}", f"clip_{attr}_prob", f"clip_{attr}_probs"} <= set(names)
    labeler.setup()
    rows = labeler.label(images())
    assert len(rows) == 3 and labeler.label([]) == []
    for row in rows:
        for attr in DEFAULT_ATTRIBUTES:
            dist = row[f"clip_{attr.name}_probs"]
            assert list(dist) == list(attr.prompts)
            assert sum(dist.values()) == pytest.approx(1.0, abs=1e-5)
            assert row[f"clip_{attr.name}"] == max(dist, key=dist.__getitem__)
            assert row[f"clip_{attr.name}_prob"] == pytest.approx(max(dist.values()))
    assert labeler.label(images()) == rows  # deterministic


def test_the_labels_stage_runs_the_clip_labeler_and_writes_its_schema(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    glasses = {"name": "glasses", "prompts": {"none": "a face", "eyeglasses": "a face wearing glasses"}}
    params = LabelParams.model_validate({"labelers": [{"kind": "facekit.labelers.clip:ClipLabeler", "params": {
        "clip": {"model": f"local-dir:{tiny['local']}"}, "attributes": [glasses]}}]})
    stage = LabelStage(params, StageContext(run_dir=str(tmp_path), stage_id="labels", seed=0))
    stage.setup()
    ids = ["a", "b", "bad"]
    batch = {"sample_id": ids, "key": ids, "identity_id": [None] * 3, "parent_id": [None] * 3,
             "image": [encode_png(a) for a in images(2)] + [b"junk"], "image_ext": ["png"] * 3}
    out = stage.process(batch)
    assert out["status"] == ["ok"] * 3
    assert out["clip_glasses"][0] in {"none", "eyeglasses"} and out["clip_glasses"][2] is None
    table = manifest(stage, batch)
    assert table.column("clip_glasses_probs").type == pa.map_(pa.string(), pa.float32())
    assert table.column("clip_glasses").to_pylist() == out["clip_glasses"]
