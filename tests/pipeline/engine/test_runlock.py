"""The run lock on remote stores: conditional put, heartbeat, takeover. Each test runs on moto's S3
server on 127.0.0.1 (If-None-Match / If-Match) and on fsspec's memory store (the exclusive-write path
every other fsspec backend takes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from manifests.layout import LOCK_FILE
from manifests.storage import RunStorage
from pipeline.engine.runlock import LockLostError, LockRecord, RemoteLock, RunLockedError, run_lock
from tests.fixtures.s3 import S3Endpoint, moto_s3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["s3", "memory"])
def new_store(request: pytest.FixtureRequest) -> Callable[[], RunStorage]:
    """A factory of fresh, empty run directories on one kind of remote store."""
    if request.param == "s3":
        s3: S3Endpoint = request.getfixturevalue("s3")
        return lambda: RunStorage(f"s3://{s3.new_bucket()}/run", {**s3.storage_options, "skip_instance_cache": True})
    return lambda: RunStorage(f"memory://runlock-{uuid.uuid4().hex}/run", {})


def _plant(store: RunStorage, **kw: object) -> None:
    rec = {"host": socket.gethostname(), "pid": 1, "token": "t", "started": time.time(), "heartbeat": time.time(),
           "heartbeat_s": 15.0, "pid_start": None, **kw}
    store.fs.pipe_file(store.path(LOCK_FILE), json.dumps(rec).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_refuses_a_second_run_and_is_released_at_the_end(new_store: Callable[[], RunStorage]) -> None:
    store = new_store()
    with run_lock(store):
        held = LockRecord.decode(store.read_bytes(LOCK_FILE))
        assert held is not None and held.owner == f"{socket.gethostname()} pid {os.getpid()}"
        refused = pytest.raises(RunLockedError, match=r"in use by .* pid \d+ \(heartbeat \d+s ago\).*--force")
        with refused, run_lock(_store_same(store)):
            pass
    assert not store.exists(LOCK_FILE)


def _store_same(store: RunStorage) -> RunStorage:
    return RunStorage(store.url, store.storage_options)


def test_two_racing_creators_get_exactly_one_lock(new_store: Callable[[], RunStorage]) -> None:
    store = new_store()
    a, b = RemoteLock(store, heartbeat_s=30), RemoteLock(_store_same(store), heartbeat_s=30)
    a.acquire()
    try:
        with pytest.raises(RunLockedError):
            b.acquire()
    finally:
        a.release()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_at_once(new_store: Callable[[], RunStorage]) -> None:
    store = new_store()
    _plant(store, pid=_dead_pid())  # a SIGKILLed driver: fresh heartbeat, no process
    with run_lock(store):
        held = LockRecord.decode(store.read_bytes(LOCK_FILE))
        assert held is not None and held.pid != 1 and held.token != "t"


def test_a_lock_whose_heartbeat_stopped_is_taken_over_and_a_beating_one_is_not(
        new_store: Callable[[], RunStorage]) -> None:
    store = new_store()
    _plant(store, host="other-node", pid=4242, heartbeat=time.time() - 10, heartbeat_s=15.0)
    with pytest.raises(RunLockedError, match="other-node pid 4242"), run_lock(store):
        pass
    _plant(store, host="other-node", pid=4242, heartbeat=time.time() - 61, heartbeat_s=15.0)
    with run_lock(store):
        assert LockRecord.decode(store.read_bytes(LOCK_FILE)).host == socket.gethostname()  # type: ignore[union-attr]


def test_force_takes_a_live_lock_and_the_old_holder_notices_it_lost_it(new_store: Callable[[], RunStorage]) -> None:
    store = new_store()
    first = RemoteLock(store, heartbeat_s=0.2)
    first.acquire()
    try:
        before = LockRecord.decode(store.read_bytes(LOCK_FILE))
        time.sleep(0.7)
        after = LockRecord.decode(store.read_bytes(LOCK_FILE))
        assert before and after and after.heartbeat > before.heartbeat, "the heartbeat does not refresh the lock"
        second = RemoteLock(_store_same(store), force=True, heartbeat_s=30)
        second.acquire()
        assert first.lost.wait(5), "the first run did not notice that its lock was taken over"
        assert LockRecord.decode(store.read_bytes(LOCK_FILE)).token == second.record.token  # type: ignore[union-attr]
        second.release()
    finally:
        first.release()
    assert not store.exists(LOCK_FILE)


def test_two_racing_takers_of_a_stale_lock_get_exactly_one(new_store: Callable[[], RunStorage]) -> None:
    store = new_store()
    _plant(store, host="other-node", pid=4242, heartbeat=time.time() - 600, heartbeat_s=15.0)
    a, b = RemoteLock(store, heartbeat_s=30), RemoteLock(_store_same(store), heartbeat_s=30)
    _, tag = a.obj.read()
    a_tag = a.obj.take_over(a.record.encode(), tag)
    with pytest.raises(LockLostError):
        b.obj.take_over(b.record.encode(), tag)  # read the same stale lock, lost the race
    assert LockRecord.decode(store.read_bytes(LOCK_FILE)).token == a.record.token  # type: ignore[union-attr]
    a.tag = a_tag
    a.release()
    assert not store.exists(LOCK_FILE)
