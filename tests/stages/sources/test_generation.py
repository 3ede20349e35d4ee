"""A generator source's identities table: look-alike pairs from ``identities.siblings``."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from manifests.layout import IDENTITIES_FILE
from manifests.storage import RunStorage
from pipeline.config import load_config
from stages.base import StageContext
from tests.conftest import ENGINE_CONFIG


def _identities(tmp_path: Path, overrides: list[str]) -> np.ndarray:
    cfg, stages = load_config(raw=copy.deepcopy(ENGINE_CONFIG), overrides=overrides)
    assert cfg.identities is not None
    src = stages[0]
    ctx = StageContext(run_dir=str(tmp_path), stage_id=src.stage_id, seed=cfg.run.seed,
                       identities=cfg.identities.model_dump(mode="json"))
    src.cls(src.params, ctx).prepare(RunStorage(str(tmp_path)))
    table = pq.read_table(tmp_path.joinpath(*IDENTITIES_FILE))
    return np.asarray(table.column("vector").to_pylist(), dtype=np.float32)


def test_a_generator_with_siblings_writes_look_alike_pairs_at_the_chosen_cosine(tmp_path: Path) -> None:
    plain = _identities(tmp_path / "plain", [])
    twins = _identities(tmp_path / "twins", ["identities.siblings={fraction: 1.0, cosine: 0.75}"])
    g = twins @ twins.T
    np.fill_diagonal(g, -1.0)
    assert len(twins) == 6 and np.allclose(g.max(axis=1), 0.75, atol=1e-5)  # three pairs, each at 0.75
    p = plain @ plain.T
    np.fill_diagonal(p, -1.0)
    assert p.max() < 0.5  # without siblings every identity keeps the max_cosine rule
