"""The streaming shard loader: disjoint per consumer, every sample once per epoch, bad data skipped."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facekit.imaging import decode_rgb
from manifests.shards import write_tar
from tests.fixtures.procedural_export import ProceduralExportSpec, write_procedural_export
from training.augmentations import recognition_train_transform
from training.config import AugmentConfig
from training.export_index import ExportError, ExportIndex, load_export
from training.shard_loader import RecognitionDecoder, ShardStream, decode_rgb_tensor, make_loader

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> ExportIndex:
    spec = ProceduralExportSpec(train_identities=5, val_identities=2, images_per_identity=4, shard_size=4)
    return write_procedural_export(tmp_path_factory.mktemp("loader-run"), spec)


def _keys(sample: dict) -> str:
    return sample["__key__"]


def test_export_hash_is_the_sha256_of_export_json_and_shards_resolve_from_the_run(
    export: ExportIndex,
) -> None:
    data = (Path(export.export_dir) / "export.json").read_bytes()
    assert export.sha256 == hashlib.sha256(data).hexdigest()
    assert json.loads(data)["splits"]["train"]["shards"][0] == "export/train/shard-000000.tar"
    train = export.split("train")
    assert (train.samples, train.identities, len(train.shards)) == (20, 5, 5)
    assert all(Path(s).is_file() for s in train.shards)
    with pytest.raises(ExportError, match="no split 'test'"):
        export.split("test")


@pytest.mark.parametrize("world_size", [2, 8])  # 5 shards: whole shards per rank, then sample striding
def test_every_sample_is_read_exactly_once_per_epoch_across_ranks(
    export: ExportIndex, world_size: int
) -> None:
    shards = export.split("train").shards
    seen = [
        list(
            ShardStream(shards, _keys, rank=r, world_size=world_size, seed=3, shuffle_buffer=8, repeat=False)
        )
        for r in range(world_size)
    ]
    flat = [k for keys in seen for k in keys]
    assert len(flat) == len(set(flat)) == 20
    assert sum(1 for keys in seen if keys) == min(world_size, 20)


def test_dataloader_workers_split_each_rank_further(export: ExportIndex) -> None:
    shards = export.split("train").shards
    per_rank = []
    for rank in range(2):  # 2 ranks x 2 loader workers = 4 consumers of 5 shards
        stream = ShardStream(shards, _keys, rank=rank, world_size=2, repeat=False)
        per_rank.append(list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)))
    flat = per_rank[0] + per_rank[1]
    assert len(flat) == len(set(flat)) == 20


def test_epochs_reshuffle_and_repeat(export: ExportIndex) -> None:
    stream = iter(ShardStream(export.split("train").shards, _keys, seed=1, shuffle_buffer=8))
    first, second = [next(stream) for _ in range(20)], [next(stream) for _ in range(20)]
    assert sorted(first) == sorted(second) and first != second


def test_batches_hold_normalised_augmented_crops_labels_and_keys(export: ExportIndex) -> None:
    aug = AugmentConfig(randaugment=True, random_erasing=0.5)
    decoder = RecognitionDecoder(recognition_train_transform(aug, input_size=48))
    loader = make_loader(ShardStream(export.split("train").shards, decoder, seed=0), batch_size=6)
    images, labels, keys = next(iter(loader))
    assert images.shape == (6, 3, 48, 48) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(5))
    assert len(keys) == 6 and len(set(keys)) == 6


def test_corrupt_samples_and_truncated_shards_are_skipped(export: ExportIndex, tmp_path: Path) -> None:
    good = Path(export.split("train").shards[0])
    bad_sample, _ = write_tar(
        [{"__key__": "broken", "png": b"not a png", "cls": "0"}, {"__key__": "nolabel", "png": b"x"}]
    )
    (tmp_path / "bad.tar").write_bytes(bad_sample)
    (tmp_path / "cut.tar").write_bytes(good.read_bytes()[:3000])
    shards = [str(tmp_path / "bad.tar"), str(tmp_path / "cut.tar"), str(good), str(tmp_path / "missing.tar")]
    decoder = RecognitionDecoder(recognition_train_transform(AugmentConfig(), 48))
    items = list(ShardStream(shards, decoder, shuffle=False, repeat=False))
    assert len(items) == 4  # the intact shard; nothing from the cut one (its first member is cut short)
    assert {key for _, _, key in items} == {s for s in ShardStream([str(good)], _keys, repeat=False)}


def test_load_export_accepts_the_run_folder_or_the_export_folder(export: ExportIndex) -> None:
    assert load_export(export.run_dir).sha256 == load_export(export.export_dir).sha256 == export.sha256


def test_training_decodes_a_turned_or_16_bit_export_member_as_the_pipeline_did() -> None:
    upright = np.zeros((20, 36, 3), np.uint8)
    upright[:, :12] = (200, 30, 30)  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 8
    turned, deep = io.BytesIO(), io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_270).save(turned, format="JPEG", quality=95, exif=exif)
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint16) * 257, (20, 1))).save(deep, format="PNG")
    for data in (turned.getvalue(), deep.getvalue()):
        tensor = decode_rgb_tensor(data)
        assert tensor.dtype == torch.uint8 and tensor.is_contiguous()
        assert torch.equal(tensor, torch.from_numpy(decode_rgb(data).copy()).permute(2, 0, 1))
    assert decode_rgb_tensor(turned.getvalue()).shape == (3, 20, 36)
    assert decode_rgb_tensor(deep.getvalue())[0, 0, 31] == 248  # the 16-bit ramp's 8-bit level, not white
