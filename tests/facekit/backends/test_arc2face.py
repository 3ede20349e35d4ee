"""Arc2Face loads the released folder layout and generates reproducibly, on a tiny random-weight model.

The model (tests/fixtures/tiny_models.py) has the real files' layout and formats, so ``Arc2Face.load`` runs
the production path; only sizes differ (text width 576, 32 px images, 2 steps). Equality checks hold
on CPU in fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from facekit.backends.arc2face import (
    ID_TOKEN,
    PROMPT,
    Arc2Face,
    Arc2FaceSpec,
    GenerationSettings,
    ModelFilesError,
    convert_bin_to_safetensors,
)
from facekit.imaging import decode_rgb, encode_png
from manifests.schema import identity_schema
from stages.base import STATUS_ERROR, STATUS_OK, StageContext, sample_seed
from stages.sources.arc2face import POSE_COLUMN, Arc2FaceParams, Arc2FaceStage
from tests.fixtures import tiny_models

torch.set_num_threads(1)
SMALL = GenerationSettings(steps=2, guidance=3.0, height=32, width=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_models.build_tiny_arc2face(tmp_path_factory.mktemp("arc2face"), controlnet=True)


def spec_for(folders: tuple[Path, Path], **extra: object) -> Arc2FaceSpec:
    base, models = folders
    return Arc2FaceSpec(
        arc2face_dir=str(models / "arc2face"),
        encoder_dir=str(models / "encoder"),
        base_model=str(base),
        dtype="fp32",
        device="cpu",
        **extra,
    )


@pytest.fixture(scope="module")
def model(folders: tuple[Path, Path]) -> Arc2Face:
    return Arc2Face.load(spec_for(folders))


def identities(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 512)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_released_layout_loads_into_dpm_solver_pipeline_and_generates_two_identities_by_two_images(
    model: Arc2Face,
) -> None:
    assert type(model.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert model.pipe.scheduler.config.beta_schedule == "scaled_linear"  # taken from the base model's config
    vectors = np.repeat(identities(2), 2, axis=0)  # identity A, A, B, B
    images = model.generate(vectors, seeds=[1, 2, 3, 4], settings=SMALL)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == 4  # every seed gives its own image


def test_batched_projection_equals_one_identity_per_call_exactly(model: Arc2Face) -> None:
    vectors = identities(3)
    batched = model.project(vectors)
    assert batched.shape == (3, tiny_models.MAX_LENGTH, tiny_models.TEXT_WIDTH)
    for i in range(3):
        assert torch.equal(batched[i], model.project(vectors[i : i + 1])[0])


def test_projection_is_the_prompt_encoded_with_the_id_token_embedding_replaced_by_the_padded_vector(
    model: Arc2Face,
) -> None:
    """Independent of the hook: the padded vector in the embedding table's ``id`` row, prompt encoded."""
    vector = identities(1)
    encoder, tokenizer = model.pipe.text_encoder, model.pipe.tokenizer
    ids = tokenizer(
        PROMPT, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    id_row = tokenizer.encode(ID_TOKEN, add_special_tokens=False)[0]
    table = encoder.get_input_embeddings().weight
    saved = table[id_row].clone()
    padded = torch.zeros(tiny_models.TEXT_WIDTH)
    padded[:512] = torch.from_numpy(vector[0])
    with torch.no_grad():
        table[id_row] = padded
        expected = encoder(ids)[0]
        table[id_row] = saved
        plain = encoder(ids)[0]
    got = model.project(vector)
    torch.testing.assert_close(got, expected)  # equal up to float32 rounding of the re-normalised vector
    position = int(model.id_position[0])
    assert torch.equal(got[0, :position], plain[0, :position])  # causal: tokens before `id` are unchanged
    assert not torch.allclose(got[0, position:], plain[0, position:])


def test_identity_vectors_are_normalised_so_scale_does_not_matter(model: Arc2Face) -> None:
    vector = identities(1)
    torch.testing.assert_close(model.project(vector * 7.5), model.project(vector))


def test_rerun_with_a_freshly_loaded_model_is_byte_identical(
    folders: tuple[Path, Path], model: Arc2Face
) -> None:
    vectors, seeds = identities(2), [11, 12]
    first = model.generate(vectors, seeds, SMALL)
    again = Arc2Face.load(spec_for(folders)).generate(vectors, seeds, SMALL)
    assert encode_png(first[0]) == encode_png(again[0]) and np.array_equal(first, again)


def test_a_sample_has_the_same_pixels_alone_and_in_a_batch_of_three(model: Arc2Face) -> None:
    vectors, seeds = identities(3), [21, 22, 23]
    batch = model.generate(vectors, seeds, SMALL)
    alone = model.generate(vectors[1:2], seeds[1:2], SMALL)
    reordered = model.generate(vectors[::-1], seeds[::-1], SMALL)
    assert np.array_equal(alone[0], batch[1])
    assert np.array_equal(reordered[::-1], batch)


def test_model_revision_hashes_the_weight_files(
    folders: tuple[Path, Path], model: Arc2Face, tmp_path: Path
) -> None:
    assert model.info.name == "arc2face" and model.info.revision.startswith("sha256:")
    assert Arc2Face.load(spec_for(folders)).info == model.info
    base, models = folders
    other = tiny_models.build_arc2face(
        tmp_path / "other",
        vocab_size=len(json.loads((base / "tokenizer" / "vocab.json").read_text())),
        seed=99,
    )
    changed = Arc2Face.load(
        Arc2FaceSpec(
            arc2face_dir=str(other / "arc2face"),
            encoder_dir=str(models / "encoder"),
            base_model=str(base),
            dtype="fp32",
            device="cpu",
        )
    )
    assert changed.info.revision != model.info.revision


def test_a_pickle_only_encoder_is_refused_until_converted_with_weights_only(
    folders: tuple[Path, Path], model: Arc2Face, tmp_path: Path
) -> None:
    """The release ships encoder/pytorch_model.bin: loading asks for a one-time conversion, never unpickles"""
    from safetensors.torch import load_file

    base, models = folders
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    shutil.copy(models / "encoder" / "config.json", encoder)
    state = {"text_model." + k: v for k, v in load_file(models / "encoder" / "model.safetensors").items()}
    torch.save(state, encoder / "pytorch_model.bin")  # the release's key layout (transformers 4)
    spec = Arc2FaceSpec(
        arc2face_dir=str(models / "arc2face"),
        encoder_dir=str(encoder),
        base_model=str(base),
        dtype="fp32",
        device="cpu",
    )
    with pytest.raises(ModelFilesError, match=r"python -m facekit.backends.arc2face convert"):
        Arc2Face.load(spec)
    convert_bin_to_safetensors(encoder)
    converted = Arc2Face.load(spec)
    vectors = identities(2)
    assert torch.equal(converted.project(vectors), model.project(vectors))


def test_missing_folders_and_uncached_hub_ids_fail_naming_the_path_and_the_fix(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    base, models = folders
    with pytest.raises(
        ModelFilesError, match=r"arc2face arc2face: folder .*nowhere does not exist; download"
    ):
        Arc2Face.load(
            Arc2FaceSpec(
                arc2face_dir=str(tmp_path / "nowhere"),
                encoder_dir=str(models / "encoder"),
                base_model=str(base),
                device="cpu",
            )
        )
    with pytest.raises(ModelFilesError, match=r"not in the Hugging Face cache and allow_download is off"):
        Arc2Face.load(
            Arc2FaceSpec(
                arc2face_dir=str(models / "arc2face"),
                encoder_dir=str(models / "encoder"),
                base_model="facefoundry-tests/no-such-model",
                device="cpu",
            )
        )


def test_bf16_weights_load_and_generate_through_the_same_path(folders: tuple[Path, Path]) -> None:
    half = Arc2Face.load(spec_for(folders).model_copy(update={"dtype": "bf16"}))
    assert half.pipe.unet.dtype == torch.bfloat16 and half.pipe.text_encoder.dtype == torch.bfloat16
    images = half.generate(identities(2), [1, 2], SMALL)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_pose_controlnet_generates_from_pose_images_and_requires_them(folders: tuple[Path, Path]) -> None:
    _, models = folders
    posed = Arc2Face.load(spec_for(folders, controlnet_dir=str(models / "controlnet")))
    assert posed.has_controlnet and posed.info.name == "arc2face+controlnet"
    pose = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    flat = np.full((32, 32, 3), 128, dtype=np.uint8)
    vectors = np.repeat(identities(1), 2, axis=0)
    images = posed.generate(vectors, [5, 5], SMALL, pose_images=[pose, flat])
    assert images.shape == (2, 32, 32, 3)
    assert not np.array_equal(images[0], images[1])  # same identity and seed: only the pose differs
    with pytest.raises(ValueError, match="pose_images"):
        posed.generate(vectors, [5, 5], SMALL)


# -- the stage ----------------------------------------------------------------------------------------------


def stage_for(folders: tuple[Path, Path], run_dir: Path, seed: int = 0, **extra: object) -> Arc2FaceStage:
    base, models = folders
    settings: dict[str, object] = {"dtype": "fp32", "device": "cpu", "steps": 2, "size": 32, **extra}
    params = Arc2FaceParams(
        arc2face_dir=str(models / "arc2face"),
        encoder_dir=str(models / "encoder"),
        base_model=str(base),
        **settings,
    )
    identities_block = {
        "count": 2,
        "images_per_identity": 3,
        "perturbation": {"sigmas": [0.3, 0.5], "fractions": [0.5, 0.5]},
    }
    return Arc2FaceStage(
        params,
        StageContext(run_dir=str(run_dir), stage_id="arc2face", seed=seed, identities=identities_block),
    )


def rows(n: int) -> list[dict[str, object]]:
    vectors = identities(n, seed=5)
    return [
        {
            "sample_id": f"s{i}",
            "key": f"s{i}",
            "identity_id": f"id-{i}",
            "identity_vector": vectors[i],
            "perturbed_vector": vectors[i],
            "perturbation_sigma": 0.0,
        }
        for i in range(n)
    ]


def test_defaults_are_arc2faces_own_and_the_stage_asks_for_a_gpu() -> None:
    params = Arc2FaceParams(arc2face_dir="a", encoder_dir="e")
    assert (params.steps, params.guidance, params.size, params.allow_download) == (25, 3.0, 512, False)
    assert Arc2FaceStage.resources.gpus == 1 and Arc2FaceStage.name == "arc2face"


def test_stage_renders_rows_as_png_with_seed_steps_and_guidance_and_a_bad_row_becomes_an_error_row(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    stage = stage_for(folders, tmp_path)
    batch = rows(3)
    batch[1]["perturbed_vector"] = np.zeros(512, np.float32)
    out = stage.render_batch(batch)
    assert out["status"] == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert out["keep"] == [True, False, True] and out["reason"][1] == "bad_identity_vector"
    assert "not finite or is zero" in out["detail"][1]
    assert out["image"][1] is None
    assert decode_rgb(out["image"][0]).shape == (32, 32, 3) and out["image_ext"][0] == "png"
    assert out["seed"] == [sample_seed(0, f"s{i}", "arc2face") for i in range(3)]
    assert out["steps"] == [2] * 3 and out["guidance"] == [3.0] * 3 and out["key"] == ["s0", "s1", "s2"]
    pa.Table.from_pydict({f.name: out[f.name] for f in stage.columns}, schema=pa.schema(stage.columns))
    assert stage.model_info().revision.startswith("sha256:")


def test_stage_output_depends_on_the_sample_and_run_seed_not_on_batch_composition(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    stage = stage_for(folders, tmp_path)
    three = stage.render_batch(rows(3))
    one = stage.render_batch(rows(3)[2:])
    assert one["image"][0] == three["image"][2]
    reseeded = stage_for(folders, tmp_path, seed=1).render_batch(rows(3)[2:])
    assert reseeded["image"][0] != three["image"][2]


def test_stage_with_controlnet_turns_a_row_without_pose_image_into_an_error_row(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    _, models = folders
    stage = stage_for(folders, tmp_path, controlnet_dir=str(models / "controlnet"))
    batch = rows(2)
    batch[0][POSE_COLUMN] = encode_png(np.full((32, 32, 3), 90, np.uint8))
    out = stage.render_batch(batch)
    assert out["status"] == [STATUS_OK, STATUS_ERROR]
    assert out["reason"][1] == "no_pose_image" and "EMOCA" in out["detail"][1]


def write_identities(run_dir: Path) -> None:
    vectors = identities(2, seed=9)
    table = pa.Table.from_pydict(
        {
            "identity_id": ["id-a", "id-b"],
            "index": [0, 1],
            "sampler": ["gaussian"] * 2,
            "sampler_params": ["{}"] * 2,
            "seed": [0, 0],
            "max_cosine_to_kept": [None, None],
            "candidates_tried": [2, 2],
            "reference_sha256": [None, None],
            "vector": list(vectors),
        },
        schema=identity_schema(512),
    )
    (run_dir / "identities").mkdir()
    pq.write_table(table, run_dir / "identities" / "identities.parquet")


def test_stage_reads_a_shard_of_the_identities_table_into_generated_batches(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    write_identities(tmp_path)
    stage = stage_for(folders, tmp_path, batch_size=4)
    shards = stage.plan(shard_size=4)
    assert [(s["start"], s["stop"]) for s in shards] == [(0, 4), (4, 6)]
    batches = list(stage.read(shards[0]))
    assert [len(b["sample_id"]) for b in batches] == [4]
    out = batches[0]
    assert out["identity_id"] == ["id-a", "id-a", "id-a", "id-b"] and out["variant"] == [0, 1, 2, 0]
    assert all(s == STATUS_OK for s in out["status"])
    assert len(set(out["image"])) == 4


def test_batch_size_changes_neither_sample_ids_nor_pixels(folders: tuple[Path, Path], tmp_path: Path) -> None:
    write_identities(tmp_path)
    shard = {"start": 0, "stop": 3}
    by_four = [b for b in stage_for(folders, tmp_path, batch_size=4).read(shard)]
    by_one = [b for b in stage_for(folders, tmp_path, batch_size=1).read(shard)]
    assert len(by_four) == 1 and len(by_one) == 3
    assert by_four[0]["sample_id"] == [b["sample_id"][0] for b in by_one]
    # Same seeds and noise per sample; BLAS may block a batch of 4 differently from a batch of 1, so
    # pixels may differ by rounding (a rerun with the same batches is byte-identical: tested above).
    from facekit.imaging import decode_rgb

    for a, b in zip(by_four[0]["image"], [b["image"][0] for b in by_one], strict=True):
        assert np.abs(decode_rgb(a).astype(int) - decode_rgb(b).astype(int)).max() <= 2
    assert stage_for(folders, tmp_path, steps=3).sample_id("id-a", 0) != by_one[0]["sample_id"][0]
