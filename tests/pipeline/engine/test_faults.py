"""Transient is not permanent: the classification, and process_isolated letting transient failures through."""

from __future__ import annotations

import errno
from typing import ClassVar

import aiohttp
import pyarrow as pa
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from ray import exceptions as rex

from pipeline.engine.execution import process_isolated
from pipeline.engine.faults import (
    RETRY_RAY_ERRORS,
    UpstreamNotCommittedError,
    is_retryable,
    is_transient,
    upstream_lost,
)
from stages.base import SAMPLE_ID, Batch, Params, Stage, StageContext, StageKind, TransientError


class _FlakyMapper(Stage):
    """Fails one sample for good (a bad image) and, when told, the whole batch transiently (server down)."""

    name: ClassVar[str] = "flaky"
    kind: ClassVar[StageKind] = StageKind.MAPPER
    columns: ClassVar[tuple[pa.Field, ...]] = (pa.field("n", pa.int64()),)
    server_down = False

    def process(self, batch: Batch) -> Batch:
        if self.server_down:
            raise TransientError("model server at 127.0.0.1:9 refused the connection")
        if "bad" in batch[SAMPLE_ID]:
            raise ValueError("cannot decode image")
        return {SAMPLE_ID: list(batch[SAMPLE_ID]), "n": [len(s) for s in batch[SAMPLE_ID]]}


def _batch(ids: list[str]) -> Batch:
    n = len(ids)
    return {SAMPLE_ID: ids, "key": ids, "identity_id": [None] * n, "parent_id": [None] * n}


def _stage() -> _FlakyMapper:
    return _FlakyMapper(Params(), StageContext(run_dir="memory://x", stage_id="flaky", seed=0))


def test_a_bad_sample_costs_one_error_row() -> None:
    out = process_isolated(_stage(), _batch(["a", "bad", "c"]))
    assert out["status"] == ["ok", "error", "ok"]
    assert out["reason"][1] == "stage_error" and "cannot decode image" in out["detail"][1]


def test_a_transient_failure_propagates_instead_of_becoming_error_rows() -> None:
    stage = _stage()
    stage.server_down = True
    with pytest.raises(TransientError, match="refused"):
        process_isolated(stage, _batch(["a", "b"]))


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize("exc", [
    TransientError("down"),
    OSError(errno.EBUSY, "SlowDown"),  # how s3fs reports throttling
    OSError(errno.EREMOTEIO, "InternalError"),
    TimeoutError("read timed out"),
    ConnectionResetError("reset by peer"),
    _client_error("SlowDown", 503),
    _client_error("InternalError", 500),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),  # botocore: the store is unreachable
    aiohttp.ServerDisconnectedError(),  # s3fs's aiohttp: the connection dropped mid-request
])
def test_storage_hiccups_and_server_outages_are_transient(exc: BaseException) -> None:
    assert is_transient(exc) and is_retryable(exc)


@pytest.mark.parametrize("exc", [
    ValueError("cannot decode image"),
    FileNotFoundError(errno.ENOENT, "gone"),
    PermissionError(errno.EACCES, "denied"),
    OSError(errno.ENOSPC, "disk full"),
    _client_error("AccessDenied", 403),
    _client_error("NoSuchKey", 404),
])
def test_what_is_wrong_with_the_data_or_the_setup_is_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc) and not is_retryable(exc)


def test_a_transient_error_keeps_its_class_through_ray_and_through_a_cause_chain() -> None:
    wrapped = rex.RayTaskError("process", "Traceback ...", TransientError("down")).as_instanceof_cause()
    assert isinstance(wrapped, rex.RayTaskError) and is_transient(wrapped)
    try:
        try:
            raise OSError(errno.EBUSY, "SlowDown")
        except OSError as inner:
            raise RuntimeError("reading shard failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)
    assert not is_transient(rex.RayTaskError("process", "tb", ValueError("bad")).as_instanceof_cause())


def test_ray_failures_that_lose_work_are_retryable() -> None:
    names = {c.__name__ for c in RETRY_RAY_ERRORS}
    assert {"WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ObjectLostError", "RayActorError",
            "ActorDiedError"} <= names
    assert is_retryable(rex.WorkerCrashedError()) and is_retryable(rex.NodeDiedError("node gone"))
    assert not is_retryable(rex.TaskCancelledError())


def test_an_uncommitted_upstream_names_the_shard_to_recompute_even_through_ray() -> None:
    err = UpstreamNotCommittedError("render", "000004", "shard tar checksum mismatch")
    wrapped = rex.RayTaskError("run_shard", "tb", err).as_instanceof_cause()
    assert upstream_lost(wrapped) == ("render", "000004") and is_transient(wrapped)
    assert upstream_lost(ValueError("x")) is None
