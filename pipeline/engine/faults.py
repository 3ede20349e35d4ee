"""Which failures mean "try the work again" and which mean "something is wrong with this sample".

One classification for the whole engine, so that the per-shard scheduler, the global stages and the
export agree on it:

- ``is_transient(exc)``: the failure says nothing about the data: a stage raised
  ``stages.base.TransientError`` (a model server down), or the storage failure is one
  ``manifests.transient`` names (the object store answered 5xx / throttled / timed out, a connection
  dropped). Inside ``process`` such an exception is never turned into
  per-sample error rows; it propagates out of ``run_shard`` and the scheduler retries the shard.
- ``RETRY_RAY_ERRORS``: Ray's own failures that lose the work but not the reason to do it: a
  worker or node that died, an out-of-memory kill, a lost object, a dead actor.
- ``is_retryable(exc)``: either of the above, also when Ray wraps it (``RayTaskError`` keeps the
  original as ``.cause`` and, for picklable exceptions, is an instance of the original class).
- ``upstream_lost(exc)``: the shard could not run because a fragment it reads was missing or
  proven corrupt (and has been uncommitted): recompute that upstream shard, then this one.
- ``classify(exc)``: the three answers every submit/retry loop acts on (``Fault``): Ray lost the work,
  the failure was transient (both: run it again), or the work itself raised (permanent: running it
  again gives the same answer). What is wrong with one sample never reaches this far: ``process``
  makes it that sample's error row, and a worker that dies on a sample is bisected down to it by the
  scheduler (``execution.WORKER_CRASH``).

``pipeline.engine.tasks`` is the one submit / collect / retry loop built on this classification.
"""

from __future__ import annotations

import enum

from ray import exceptions as rex

from manifests.transient import one_is_transient
from stages.base import TransientError


class UpstreamNotCommittedError(TransientError):
    """A fragment this shard reads is absent or failed verification; it has been uncommitted.

    Transient for this shard (it is right once the upstream shard is recomputed); the scheduler can
    read ``stage_id`` / ``shard`` to requeue the upstream shard first."""

    def __init__(self, stage_id: str, shard: str, reason: str) -> None:
        super().__init__(f"upstream shard {shard} of {stage_id!r} is not committed: {reason}")
        self.stage_id = stage_id
        self.shard = shard
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:  # picklable through Ray with its fields
        return (type(self), (self.stage_id, self.shard, self.reason))


RETRY_RAY_ERRORS: tuple[type[BaseException], ...] = tuple(
    cls for cls in (
        getattr(rex, name, None) for name in (
            "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ObjectLostError", "OwnerDiedError",
            "ObjectFetchTimedOutError", "ObjectReconstructionFailedError", "RayActorError", "ActorDiedError",
            "ActorUnavailableError", "LocalRayletDiedError", "RaySystemError", "TaskUnschedulableError",
            "ActorUnschedulableError", "ReferenceCountingAssertionError",
        )
    ) if isinstance(cls, type)
)

def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what Ray wrapped, and its causes (bounded: chains can loop)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(out) < 16 and all(cur is not e for e in out):
        out.append(cur)
        wrapped = getattr(cur, "cause", None) if isinstance(cur, rex.RayTaskError) else None
        cur = wrapped if isinstance(wrapped, BaseException) else (cur.__cause__ or cur.__context__)
    return out


def is_transient(exc: BaseException) -> bool:
    """A failure that says nothing about the sample: retry the work, never record it as a bad sample."""
    return any(isinstance(e, TransientError) or one_is_transient(e) for e in _chain(exc))


def is_retryable(exc: BaseException) -> bool:
    """Retry the shard / task: Ray lost the work (dead worker, node, actor, OOM kill) or it failed transiently."""
    return classify(exc) is not Fault.PERMANENT


def upstream_lost(exc: BaseException) -> tuple[str, str] | None:
    """(stage_id, shard) of the upstream fragment that must be recomputed first, if that is why it failed."""
    for e in _chain(exc):
        if isinstance(e, UpstreamNotCommittedError):
            return e.stage_id, e.shard
    return None


class Fault(enum.StrEnum):
    """What a failed piece of work means for it."""

    LOST = "lost"  # Ray lost the work (a dead worker, node or actor, an OOM kill, a lost object): run it again
    TRANSIENT = "transient"  # the failure says nothing about the work (storage 5xx, a server down): run it again
    PERMANENT = "permanent"  # the work itself raised: the same inputs give the same failure


def _unwrapped(exc: BaseException) -> BaseException:
    """What a ``RayTaskError`` wraps (Ray reports an actor that died inside a task as a task error)."""
    cause = getattr(exc, "cause", None) if isinstance(exc, rex.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


def classify(exc: BaseException) -> Fault:
    """The one answer to "run it again?" for a failure that reached a driver or a scheduler."""
    if is_transient(exc):
        return Fault.TRANSIENT
    if isinstance(exc, RETRY_RAY_ERRORS) or isinstance(_unwrapped(exc), RETRY_RAY_ERRORS):
        return Fault.LOST
    return Fault.PERMANENT


def describe(exc: BaseException) -> str:
    """What the work raised, not Ray's wrapping, for a history row (bounded)."""
    return str(_unwrapped(exc))[:2000]
