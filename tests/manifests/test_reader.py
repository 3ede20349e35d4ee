"""The one reader of a shard's rows: verified fragments, the own-or-parent join, and one rule for a
sample id a fragment holds twice (the first row wins) everywhere the rows are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from manifests.commit import CorruptFragmentError
from manifests.layout import manifest_path
from manifests.reader import ShardReader, shard_rows
from manifests.storage import RunStorage
from manifests.tables import StageColumns, build_shard_tables, samples_schema
from tests.manifests.test_tables import _frag

SRC = StageColumns("src", (pa.field("variant", pa.int64()),), writes_pixels=False)
FACES = StageColumns("faces", (pa.field("score", pa.float64()),), writes_pixels=False)


@dataclass(frozen=True)
class _Up:
    stage_id: str
    prune: bool = False
    columns: tuple[str, ...] = ()


def _run(tmp_path: Path) -> RunStorage:
    """Image p0 (variant 7, then a repeated row with variant 8), and two faces cut from it; face f1
    also appears twice in its own stage (score 0.9 first, then 0.1)."""
    store = RunStorage(str(tmp_path / "run"))
    _frag(store, SRC, "000000", [{"sample_id": "p0", "key": "p0", "variant": 7},
                                 {"sample_id": "p0", "key": "p0", "variant": 8}])
    _frag(store, FACES, "000000", [{"sample_id": "f0", "parent_id": "p0", "score": 0.5},
                                   {"sample_id": "f1", "parent_id": "p0", "score": 0.9},
                                   {"sample_id": "f1", "parent_id": "p0", "score": 0.1}])
    return store


def test_a_repeated_sample_id_takes_its_first_row_in_stage_input_and_in_the_run_tables(tmp_path: Path) -> None:
    store = _run(tmp_path)
    rows = shard_rows(ShardReader(store, "000000"), [_Up("src"), _Up("faces")], ["variant", "score"])
    assert rows.column("sample_id").to_pylist() == ["f0", "f1", "f1"]
    assert rows.column("variant").to_pylist() == [7, 7, 7]  # the parent's first row
    assert rows.column("score").to_pylist() == [0.5, 0.9, 0.9]  # a sample's own first row

    samples, _ = build_shard_tables(store, [SRC, FACES], "000000", samples_schema([SRC, FACES]))
    by_id = {r["sample_id"]: r for r in samples.to_pylist()}
    assert by_id["p0"]["src__variant"] == 7 and by_id["f1"]["faces__score"] == 0.9 and by_id["f1"]["src__variant"] == 7


def test_a_fragment_whose_bytes_changed_is_refused_before_any_column_is_used(tmp_path: Path) -> None:
    store = _run(tmp_path)
    path = Path(store.path(*manifest_path("faces", "000000")))
    data = bytearray(path.read_bytes())
    data[8] ^= 0xFF  # a flipped byte in the first data page, size unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFragmentError):
        shard_rows(ShardReader(store, "000000"), [_Up("src"), _Up("faces")], ["score"])
    lost: list[tuple[str, str]] = []

    def record(stage_id: str, shard: str, reason: str) -> BaseException:
        lost.append((stage_id, shard))
        return RuntimeError(reason)

    with pytest.raises(RuntimeError):
        ShardReader(store, "000000", lost=record).fragment("faces")
    assert lost == [("faces", "000000")] and not path.exists()  # uncommitted: the shard is recomputed
