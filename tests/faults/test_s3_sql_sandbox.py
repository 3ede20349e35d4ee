"""User SQL on an s3:// run (moto's S3 server on 127.0.0.1) reads the run and nothing of this machine."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from manifests.commit import encode_manifest
from manifests.schema import COMMON_FIELDS
from manifests.storage import RunStorage
from pipeline.cli import app
from tests.fixtures.s3 import S3Endpoint, moto_s3


@pytest.fixture(scope="module")
def s3_run() -> Iterator[tuple[str, S3Endpoint]]:
    with moto_s3() as s3:
        url = f"s3://{s3.new_bucket()}/run"
        store = RunStorage(url, s3.storage_options)
        config = {"stages": [{"stage": "tests.fixtures.engine_stages:PatternSource", "id": "pattern"}]}
        store.write_atomic(yaml.safe_dump({"config_hash": "h", "fingerprints": {}, "config": config}).encode(),
                           "run.yaml")
        rows = {f.name: [None] for f in COMMON_FIELDS}
        rows.update(sample_id=["a"], stage=["pattern"], stage_name=["p"], stage_version=["1"], shard=["000000"],
                    status=["ok"], keep=[True], params_hash=["p"], fingerprint=["f"])
        table = pa.Table.from_pydict(rows, schema=pa.schema(list(COMMON_FIELDS)))
        store.write_atomic(encode_manifest(table), "manifests", "pattern", "000000.parquet")
        yield url, s3


def _query(s3: S3Endpoint, url: str, sql: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(app, ["query", url, sql, "--format", "json"])
    return res.exit_code, res.output


def test_user_sql_reads_the_s3_run(s3_run: tuple[str, S3Endpoint], monkeypatch: pytest.MonkeyPatch) -> None:
    url, s3 = s3_run
    code, out = _query(s3, url, "SELECT sample_id FROM pattern", monkeypatch)
    assert code == 0 and '"sample_id": "a"' in out, out


def test_user_sql_on_an_s3_run_cannot_read_local_files(s3_run: tuple[str, S3Endpoint],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, s3 = s3_run
    code, out = _query(s3, url, "SELECT * FROM read_csv('/etc/passwd')", monkeypatch)
    assert code != 0 and "root" not in out, out[-2000:]
