"""The export's hash order: the batch form gives every id the very value the one-id form gives, on both
sides of the size where it moves the hashing into SQL."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.export.order import BATCH_IN_SQL_FROM, unit, units


def test_a_batch_of_ids_gets_the_same_units_as_one_id_at_a_time() -> None:
    ids = [f"s{i:06d}" for i in range(BATCH_IN_SQL_FROM + 5)] + ["", "é☃ 'quoted'", "x" * 300]
    for batch in (ids[:7], ids):
        got = units("pick:'", pa.array(batch))
        assert got.dtype == np.float64
        assert got.tolist() == [unit("pick:'" + s) for s in batch]
    assert units("rank:", ids[:3]).tolist() == [unit("rank:" + s) for s in ids[:3]]
