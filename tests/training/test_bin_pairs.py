"""insightface .bin pair files without mxnet or pickle.load, and the verification protocol's numbers."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facekit.imaging import encode_png
from training.bin_pairs import PairFileError, parse_pair_file, read_pair_file, write_pair_file
from training.verification import evaluate_on_pair_file, kfold_accuracy, tar_at_far

torch.set_num_threads(1)

# 40 pairs, ten folds of four. Genuine pairs score 0.9 and impostors 0.1, except a hard genuine pair
# (0.05, pair 5, fold 1) and a hard impostor (0.95, pair 22, fold 5). Every 9-fold threshold lands
# between 0.1 and 0.9, so exactly those two pairs are wrong: folds 1 and 5 score 3/4, the eight others
# 4/4, and the 10-fold accuracy is (8 * 1 + 2 * 0.75) / 10 = 0.95.
ISSAME = np.array([i % 2 == 0 for i in range(40)])
SCORES = np.where(ISSAME, 0.9, 0.1)
SCORES[4], SCORES[21] = 0.05, 0.95  # pair index 4 is genuine (fold 1), pair 21 an impostor (fold 5)
HAND_ACCURACY = 0.95


def test_ten_fold_accuracy_matches_the_hand_computed_value() -> None:
    result = kfold_accuracy(SCORES, ISSAME)
    assert result["accuracy"] == pytest.approx(HAND_ACCURACY)
    assert result["fold_accuracies"] == [1.0, 0.75, 1.0, 1.0, 1.0, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert 0.1 < result["threshold"] < 0.9


def test_tar_at_far_uses_the_impostor_score_quantile() -> None:
    # 20 impostors: FAR 0.05 lets one pass (the 0.95 one), so the threshold is the next score, 0.1,
    # and 19 of 20 genuine pairs are above it. FAR 1e-3 lets none pass: threshold 0.95, TAR 0.
    loose = tar_at_far(SCORES, ISSAME, 0.05)
    assert (loose["threshold"], loose["tar"], loose["far_resolved"]) == (0.1, 0.95, True)
    strict = tar_at_far(SCORES, ISSAME, 1e-3)
    assert (strict["threshold"], strict["tar"], strict["far_resolved"]) == (0.95, 0.0, False)


class MeanColourEmbedder(nn.Module):
    """Test model: embedding = mean of the first two normalised channels (a 2-d vector)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2].mean(dim=(2, 3))


def _solid(angle: float) -> bytes:
    # After (x/255 - 0.5)/0.5, channels 0 and 1 hold 0.8*(cos, sin) of the angle: a unit direction.
    value = (0.8 * np.array([math.cos(angle), math.sin(angle), 0.0]) * 0.5 + 0.5) * 255
    return encode_png(np.broadcast_to(np.round(value).astype(np.uint8), (112, 112, 3)).copy())


def test_bin_file_written_in_insightface_format_evaluates_to_the_hand_computed_accuracy(
    tmp_path: Path,
) -> None:
    images = []
    for score in SCORES:
        images += [_solid(0.0), _solid(math.acos(score))]  # the pair's cosine is its designed score
    path = tmp_path / "synthetic.bin"
    write_pair_file(str(path), images, ISSAME.tolist())
    pair_file = read_pair_file(str(path))
    assert pair_file.name == "synthetic" and len(pair_file.images) == 80
    assert pair_file.images[3] == images[3] and pair_file.issame.tolist() == ISSAME.tolist()
    result = evaluate_on_pair_file(MeanColourEmbedder(), pair_file, input_size=112, batch_size=16)
    assert result["accuracy"] == pytest.approx(HAND_ACCURACY)
    assert result["pairs"] == 40 and result["genuine_pairs"] == 20


def test_reads_protocol_2_files_with_numpy_bools_and_array_images() -> None:
    images = [np.frombuffer(_solid(0.1), np.uint8), _solid(0.2)]
    data = pickle.dumps((images, [np.bool_(True)]), protocol=2)  # uses _codecs.encode and numpy globals
    pair_file = parse_pair_file(data)
    assert pair_file.images == [_solid(0.1), _solid(0.2)]
    assert pair_file.issame.tolist() == [True]


def test_reads_protocol_2_empty_bytes_but_refuses_bytes_of_a_length() -> None:
    data = pickle.dumps(([b"", _solid(0.3)], [False]), protocol=2)  # b"" is spelled __builtin__.bytes()
    assert parse_pair_file(data).images == [b"", _solid(0.3)]
    bomb = b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R]\x86."  # bytes(2**30) as images
    with pytest.raises(PairFileError, match="bytes"):
        parse_pair_file(bomb)


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.target}",))


def test_refuses_a_pickle_that_calls_os_system_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(marker)], [True])))
    with pytest.raises(PairFileError, match="system"):
        read_pair_file(str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps((eval, [True])),  # a callable from builtins
        pickle.dumps(
            ([np.array([object()], dtype=object)], [True])
        ),  # object arrays unpickle arbitrary objects
    ],
)
def test_refuses_other_globals(payload: bytes) -> None:
    with pytest.raises(PairFileError):
        parse_pair_file(payload)


def test_rejects_files_whose_counts_do_not_match() -> None:
    with pytest.raises(PairFileError, match="twice as many"):
        parse_pair_file(pickle.dumps(([b"a", b"b", b"c"], [True, False])))
