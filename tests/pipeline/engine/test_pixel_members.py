"""Pixel members: images a stage writes besides its main one travel as tar members, never as
manifest columns; later stages read them as bytes (fused or not), and the export copies them."""

from __future__ import annotations

import glob
import hashlib
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.engine.runner import Runner, RunResult
from tests.fixtures import engine_stage, pattern_config

pytestmark = pytest.mark.usefixtures("ray_session")

CONFIG: dict[str, Any] = pattern_config(
    "members", seed=5, shard_size=6, identities=(4, 3, 16, 0.9),
    stages=[engine_stage("ThumbMapper", "thumbs", params={"side": 16}), engine_stage("ThumbReader", "reader")],
    export={"shard_size": 4, "val_fraction": 0.25, "min_images_per_identity": 1,
            "extra_members": {"thumb.png": "thumbs.thumb"}})


def _run(out: Path, fuse: bool) -> RunResult:
    cfg, stages = load_config(raw=CONFIG, overrides=[f"run.fuse={str(fuse).lower()}"])
    return Runner(cfg, stages, str(out), show_progress=False).run()


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}  # type: ignore[union-attr]


@pytest.mark.parametrize("fuse", [False, True])
def test_a_pixel_member_is_a_tar_member_read_back_as_bytes_and_exported(tmp_path: Path, fuse: bool) -> None:
    out = tmp_path / "run"
    res = _run(out, fuse)
    assert res.complete, res.failures
    for f in glob.glob(str(out / "manifests" / "*" / "*.parquet")):
        schema = pq.read_schema(f)
        assert not [x.name for x in schema if pa.types.is_binary(x.type) or pa.types.is_large_binary(x.type)], \
            f"{f} carries pixels in a column"
    seen = 0
    for frag in sorted(glob.glob(str(out / "manifests" / "thumbs" / "*.parquet"))):
        rows = pq.read_table(frag).to_pylist()
        reader = {r["sample_id"]: r for r in pq.read_table(frag.replace("/thumbs/", "/reader/")).to_pylist()}
        for r in rows:
            loc = r["thumb"]
            tar = out / loc["tar"]
            members = _members(tar)
            data = tar.read_bytes()[loc["offset"] : loc["offset"] + loc["size"]]
            assert members[f"{r['key']}.thumb.png"] == data  # the location names the member's bytes
            assert reader[r["sample_id"]]["status"] == "ok"
            assert reader[r["sample_id"]]["thumb_sha256"] == hashlib.sha256(data).hexdigest()
            assert reader[r["sample_id"]]["thumb_shape"] == [16, 16, 3]
            seen += 1
    assert seen == 12

    exported = 0
    for tar in glob.glob(str(out / "export" / "*" / "*" / "*.tar")):
        members = _members(Path(tar))
        for name, data in members.items():
            if name.endswith(".thumb.png"):
                key = name[: -len(".thumb.png")]
                assert f"{key}.png" in members
                exported += 1
                assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert exported == 12
    # The samples table says where each member lies, for readers that want them by range.
    import duckdb

    con = duckdb.connect()
    n = con.execute(f"SELECT count(*) FROM read_parquet('{out}/tables/samples/*.parquet') "
                    "WHERE thumbs__thumb.tar LIKE 'shards/thumbs/%' AND thumbs__thumb.size > 0").fetchone()
    assert n == (12,)
