"""A run to s3:// on an S3-protocol server started here on 127.0.0.1 (moto), SIGKILLed and resumed:
byte-identical to a local run; the dead run's lock is taken over by the resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from manifests.layout import LOCK_FILE
from manifests.schema import VOLATILE
from manifests.storage import RunStorage
from tests.fixtures import REPO
from tests.fixtures.s3 import S3Endpoint, moto_s3
from tests.pipeline.engine.test_resume import CONFIG, _files, _finish, _rows

STAGES = ("pattern", "busy", "meanf")


def _cli(args: list[str], s3: S3Endpoint) -> subprocess.Popen[bytes]:
    env = {**os.environ, **s3.env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _run_args(config: Path, out: str) -> list[str]:
    return ["run", str(config), "--output", out, "--no-progress", "--num-cpus", "2"]


def _remote_files(store: RunStorage, pattern: str) -> dict[str, bytes]:
    return {store.rel(p): store.fs.cat_file(p) for p in sorted(store.fs.glob(store.path(pattern)))}


def _remote_rows(store: RunStorage, stage: str) -> list[dict]:
    rows = []
    for p in sorted(store.fs.glob(store.path("manifests", stage, "*.parquet"))):
        with store.fs.open(p, "rb") as f:
            rows.extend({k: v for k, v in r.items() if k not in VOLATILE} for r in pq.read_table(f).to_pylist())
    return rows


@pytest.mark.faults
def test_an_s3_run_killed_and_resumed_is_byte_identical_to_a_local_run(tmp_path: Path) -> None:
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    ref = tmp_path / "ref"
    with moto_s3() as s3:
        _finish(_cli(_run_args(config, str(ref)), s3))
        url = f"s3://{s3.new_bucket()}/run"
        store = RunStorage(url, {**s3.storage_options, "skip_instance_cache": True})

        proc = _cli(_run_args(config, url), s3)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            store.fs.invalidate_cache()
            done = len(store.fs.glob(store.path("manifests", "busy", "*.parquet")))
            if 2 <= done < 8:
                break
            if proc.poll() is not None:
                pytest.fail("the run finished before it could be killed; make the busy stage slower")
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        store.fs.invalidate_cache()
        assert store.exists(LOCK_FILE), "a SIGKILLed run cannot have released its lock"
        assert not store.exists("export", "export.json")

        resumed = _cli(_run_args(config, url), s3)
        text, _ = resumed.communicate(timeout=600)
        log = text.decode(errors="replace")
        assert resumed.returncode == 0, log[-6000:]
        assert "took over the lock" in log and "is gone" in log, log[-3000:]  # dead pid here: at once
        store.fs.invalidate_cache()
        assert not store.exists(LOCK_FILE), "the finished run did not release its lock"
        for pattern in ("shards/*/*.tar", "export/*/*/*.tar", "identities/*.parquet", "plan.*"):
            a, b = _files(ref, pattern), _remote_files(store, pattern)
            assert a.keys() == b.keys() and a, pattern
            assert a == b, f"{pattern} differs between the local run and the resumed s3 run"
        for stage in STAGES:
            assert _rows(ref, stage) == _remote_rows(store, stage)
        assert not store.fs.glob(store.path("**", "_tmp-*")), "object-store writes go straight to their key"

        # User SQL on the s3 run reads the run (that it reads nothing else: test_s3_sql_sandbox.py).
        q = _cli(["query", url, "SELECT count(*) AS n FROM meanf", "--format", "json"], s3)
        out, _ = q.communicate(timeout=300)
        assert q.returncode == 0 and '"n": 32' in out.decode(), out.decode()[-2000:]
