"""One writer per run directory.

Local directories: an ``flock`` on ``.lock``. The kernel releases it when the process dies, even by
SIGKILL, so a dead run never blocks a resume and a live one can never be taken over.

Object stores: a lock object taken with a conditional PUT (S3 ``If-None-Match: *``: exactly one of
two racing runs creates it) and kept alive by a heartbeat thread that rewrites it every
``heartbeat_s`` with ``If-Match: <its own ETag>`` (so a run whose lock was taken over notices it
instead of overwriting the new owner). A run finding the lock held takes it over, again with
``If-Match`` on the ETag it read so that two resumers cannot both win, only when

- the holder ran on this host and its process is gone (at once: a SIGKILLed driver, a RayJob retry
  in the same pod), or
- its heartbeat is older than ``STALE_INTERVALS`` heartbeats (the holder's host or pod is gone);
  this compares the holder's clock with ours, so hosts are assumed NTP-synchronised to well under
  the stale period (a minute by default), or
- ``--force`` is given.

A live lock is otherwise never taken over; there is no fixed TTL, so a run may take days.
On object stores every file is written with one atomic PUT (manifests/storage.py): there are no
temporary files another run could delete.

Other fsspec stores (GCS, Azure, memory://...) create the lock with fsspec's exclusive write
(``pipe_file(mode="create")``: GCS ``ifGenerationMatch=0``, Azure ``overwrite=False``), so two racing
creators still get one lock, and take a stale lock over by deleting it and creating it again
exclusively, so two resumers cannot both win. Their heartbeat is read-compare-write: it notices a
takeover on its next beat, but a takeover that lands between its read and its write is overwritten
(the taker then notices on its own next beat and stops). A store whose fsspec backend has no
exclusive write falls back to check-then-put, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import fsspec.asyn

from manifests.layout import LOCK_FILE
from manifests.storage import RunStorage

log = logging.getLogger("facefoundry.lock")

HEARTBEAT_S = float(os.environ.get("FACEFOUNDRY_LOCK_HEARTBEAT_S", "15"))
STALE_INTERVALS = 4


class RunLockedError(RuntimeError):
    pass


class LockLostError(RuntimeError):
    """Our lock object was replaced by another run (``--force``)."""


# ---------------------------------------------------------------- the lock record


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of a process: with the pid it names one process, even after pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


@dataclass
class LockRecord:
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float
    heartbeat_s: float
    pid_start: str | None = None

    @property
    def owner(self) -> str:
        return f"{self.host} pid {self.pid}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LockRecord | None:
        try:
            doc = json.loads(data)
            return cls(str(doc["host"]), int(doc["pid"]), str(doc["token"]), float(doc["started"]),
                       float(doc["heartbeat"]), float(doc["heartbeat_s"]), doc.get("pid_start"))
        except (ValueError, KeyError, TypeError):
            return None


def takeover_reason(rec: LockRecord | None, *, force: bool, now: float | None = None) -> str | None:
    """Why a held lock may be taken over, or None when it belongs to a live run."""
    if rec is None:
        return "the lock object is unreadable"
    if force:
        return "--force"
    if rec.host == socket.gethostname() and not _alive(rec.pid, rec.pid_start):
        return f"its process ({rec.owner}) is gone"
    age = (time.time() if now is None else now) - rec.heartbeat
    if age > STALE_INTERVALS * rec.heartbeat_s:
        return f"its heartbeat stopped {age:.0f}s ago (every {rec.heartbeat_s:g}s expected)"
    return None


# ---------------------------------------------------------------- conditional writes per store


class _Conditional:
    """create / read / replace / delete of one small object, each conditional on what we saw."""

    def __init__(self, store: RunStorage, path: str) -> None:
        self.store, self.path = store, path

    def create(self, data: bytes) -> str:
        """Write if absent; FileExistsError if present. Returns a version tag."""
        fs = self.store.fs
        try:
            fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            raise
        except (NotImplementedError, TypeError, ValueError) as exc:  # a backend without exclusive writes
            log.warning("%s has no exclusive write (%s): the run lock falls back to check-then-put",
                        type(fs).__name__, exc)
            if fs.exists(self.path):
                raise FileExistsError(self.path) from None
            fs.pipe_file(self.path, data)
        fs.invalidate_cache(self.path)
        return hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[bytes, str]:
        data = self.store.fs.cat_file(self.path)
        return data, hashlib.sha256(data).hexdigest()

    def replace(self, data: bytes, tag: str) -> str:
        """Overwrite only if the object is still the version ``tag``; LockLostError otherwise."""
        try:
            _, now = self.read()
        except FileNotFoundError:
            raise LockLostError(self.path) from None
        if now != tag:
            raise LockLostError(self.path)
        self.store.fs.pipe_file(self.path, data)
        return hashlib.sha256(data).hexdigest()

    def take_over(self, data: bytes, tag: str) -> str:
        """Replace a stale lock so that of two takers exactly one wins: delete it if it is still
        ``tag``, then create it exclusively (the loser's create finds the winner's)."""
        self.delete(tag)
        try:
            return self.create(data)
        except FileExistsError:
            raise LockLostError(self.path) from None

    def delete(self, tag: str) -> None:
        with contextlib.suppress(FileNotFoundError, LockLostError):
            if self.read()[1] == tag:
                self.store.remove_path(self.path)
                self.store.fs.invalidate_cache(self.path)


def _precondition_failed(exc: BaseException) -> bool:
    cause = exc.__cause__ or exc
    response = getattr(cause, "response", None)
    return isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")


class _S3Conditional(_Conditional):
    """The real thing: S3 conditional PUT / DELETE by ETag (AWS, MinIO, moto, R2...)."""

    def _call(self, method: str, **kwargs: Any) -> Any:
        fs = self.store.fs
        bucket, key, _ = fs.split_path(self.path)
        out = fsspec.asyn.sync(fs.loop, fs._call_s3, method, Bucket=bucket, Key=key, **kwargs)
        fs.invalidate_cache(self.path)
        return out

    def create(self, data: bytes) -> str:
        try:
            return str(self._call("put_object", Body=data, IfNoneMatch="*")["ETag"])
        except FileExistsError:
            raise
        except OSError as exc:
            if _precondition_failed(exc):
                raise FileExistsError(self.path) from None
            raise

    def read(self) -> tuple[bytes, str]:
        out = self._call("get_object")
        body = out["Body"]
        data = fsspec.asyn.sync(self.store.fs.loop, body.read)
        body.close()
        return data, str(out["ETag"])

    def replace(self, data: bytes, tag: str) -> str:
        try:
            return str(self._call("put_object", Body=data, IfMatch=tag)["ETag"])
        except FileNotFoundError:
            raise LockLostError(self.path) from None
        except OSError as exc:
            if _precondition_failed(exc):
                raise LockLostError(self.path) from None
            raise

    def take_over(self, data: bytes, tag: str) -> str:
        return self.replace(data, tag)  # If-Match on the ETag read: one of two takers wins

    def delete(self, tag: str) -> None:
        try:
            self._call("delete_object", IfMatch=tag)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not _precondition_failed(exc):
                raise


def _conditional(store: RunStorage, path: str) -> _Conditional:
    protocols = (store.fs.protocol,) if isinstance(store.fs.protocol, str) else tuple(store.fs.protocol)
    if any(p in ("s3", "s3a") for p in protocols) and hasattr(store.fs, "_call_s3"):
        return _S3Conditional(store, path)
    return _Conditional(store, path)


# ---------------------------------------------------------------- the remote lock


class RemoteLock:
    def __init__(self, store: RunStorage, *, force: bool = False, heartbeat_s: float | None = None) -> None:
        self.store = store
        self.force = force
        self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else HEARTBEAT_S)
        self.obj = _conditional(store, store.path(LOCK_FILE))
        now = time.time()
        pid = os.getpid()
        self.record = LockRecord(socket.gethostname(), pid, uuid.uuid4().hex, now, now, self.heartbeat_s,
                                 _proc_start(pid))
        self.tag = ""
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(3):  # a lock released or taken over between our reads: look again
            self.record.heartbeat = time.time()
            try:
                self.tag = self.obj.create(self.record.encode())
                break
            except FileExistsError:
                pass
            try:
                data, tag = self.obj.read()
            except FileNotFoundError:
                continue
            held = LockRecord.decode(data)
            why = takeover_reason(held, force=self.force)
            if why is None:
                assert held is not None
                age = time.time() - held.heartbeat
                raise RunLockedError(f"{self.store.url} is in use by {held.owner} (heartbeat {age:.0f}s ago); "
                                     f"wait for it, or --force takes the lock over")
            self.record.heartbeat = time.time()
            try:
                self.tag = self.obj.take_over(self.record.encode(), tag)
            except LockLostError:
                continue
            log.warning("took over the lock of %s from %s: %s", self.store.url,
                        held.owner if held else "an unknown owner", why)
            break
        else:
            raise RunLockedError(f"{self.store.url}: another run keeps taking the lock; try again")
        self._thread = threading.Thread(target=self._beat, name="facefoundry-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.record.heartbeat = time.time()
            try:
                self.tag = self.obj.replace(self.record.encode(), self.tag)
            except LockLostError:
                self.lost.set()
                log.error("the lock of %s was taken over by another run (--force); this run no longer owns it",
                          self.store.url)
                return
            except Exception as exc:  # a storage hiccup: the next beat tries again, staleness allows several
                log.warning("lock heartbeat on %s failed (%s); retrying", self.store.url, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 30)
        if not self.lost.is_set() and self.tag:
            with contextlib.suppress(Exception):  # never fail a finished run on its way out
                self.obj.delete(self.tag)


@contextlib.contextmanager
def run_lock(store: RunStorage, force: bool = False, heartbeat_s: float | None = None) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block (see the module doc)."""
    store.fs.makedirs(store.root, exist_ok=True)
    if store.is_local:
        with _local_lock(store):
            yield
        return
    lock = RemoteLock(store, force=force, heartbeat_s=heartbeat_s)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _local_lock(store: RunStorage) -> Iterator[None]:
    path = store.path(LOCK_FILE)
    handle: BinaryIO = open(path, "a+b")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().decode(errors="replace").strip() or "another process"
        handle.close()
        raise RunLockedError(f"{store.url} is in use by {owner}; wait for it or choose another --output") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{socket.gethostname()} pid {os.getpid()}".encode())
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
