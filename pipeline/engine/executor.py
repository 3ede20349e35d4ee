"""Carrying out the scheduler's actions on Ray: the one place the streaming phase touches Ray.

``RayExecutor`` is what the runner's loop drives (start and stop actors, send requests, wait for
what finished), on Ray actors that each hold one ``fused.FusedChain``. Every failure Ray can
report for an actor call is turned into one of four outcomes the scheduler understands: done,
failed (the stage raised), transient (retry later) or died (the actor or its node is gone).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.engine.cluster import ActorPlan
from pipeline.engine.execution import ShardResult, StageSpec
from pipeline.engine.faults import Fault, describe
from pipeline.engine.faults import classify as classify_fault
from pipeline.engine.fused import FusedChain, StageSetupError
from pipeline.engine.scheduler import Kind, Request


class Outcome(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"
    TRANSIENT = "transient"
    DIED = "died"
    SETUP = "setup"  # the stage cannot set up: stop the run


@dataclass
class Event:
    req: int
    outcome: Outcome
    results: list[ShardResult] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    error: str = ""


# ---------------------------------------------------------------- failure classification


def classify(exc: BaseException) -> Outcome:
    """What a failed actor call means for its shard: faults.classify, plus a stage whose setup failed
    (the same for every shard: the run stops instead of retrying)."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, StageSetupError) or isinstance(cause, StageSetupError):
        return Outcome.SETUP
    return {Fault.LOST: Outcome.DIED, Fault.TRANSIENT: Outcome.TRANSIENT,
            Fault.PERMANENT: Outcome.FAILED}[classify_fault(exc)]


# ---------------------------------------------------------------- Ray


@ray.remote
class StageActor:
    """Holds one set-up chain of stages; Ray keeps it alive while the chain has work."""

    def __init__(self, specs: list[StageSpec]) -> None:
        self.chain = FusedChain(specs)

    def run(self, shard: str, source_spec: dict[str, Any] | None, start: int, quarantine: tuple[str, ...],
            detail: str) -> list[ShardResult]:
        return self.chain.run(shard, source_spec, start, quarantine, detail)

    def samples(self, shard: str, start: int) -> list[str]:
        return self.chain.samples(shard, start)

    def probe(self, shard: str, start: int, sample_ids: tuple[str, ...]) -> bool:
        return self.chain.probe(shard, start, sample_ids)

    def teardown(self) -> None:
        self.chain.teardown()

    def park(self) -> None:
        """The stages are done: release what they hold, keep the warm process (see engine/warm.py)."""
        self.chain.teardown()
        self.chain = FusedChain([])

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A closing step of the run (compaction, the run tables) on this parked process."""
        return fn(*args, **kwargs)


class RayExecutor:
    def __init__(self, specs: list[list[StageSpec]], plans: list[ActorPlan], source_specs: dict[str, Any],
                 source_chain: int | None, park_chain: int | None = None) -> None:
        self.specs = specs
        self.plans = plans
        self.source_specs = source_specs
        self.source_chain = source_chain
        self.actors: dict[int, Any] = {}
        self.pending: dict[Any, Request] = {}  # insertion order is submission order
        # The run's last chain: its actors, once stopped, are parked for the closing steps, not killed.
        self.park_chain = park_chain
        self.chain_of: dict[int, int] = {}
        self.parked: list[Any] = []

    def start_actor(self, chain: int, actor: int) -> None:
        p = self.plans[chain]
        opts: dict[str, Any] = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus, "max_concurrency": 1}
        if p.memory:
            opts["memory"] = p.memory
        self.actors[actor] = StageActor.options(**opts).remote(self.specs[chain])  # type: ignore[attr-defined]
        self.chain_of[actor] = chain

    def stop_actor(self, actor: int) -> None:
        handle = self.actors.pop(actor, None)
        if handle is not None and self.park_chain is not None and self.chain_of.get(actor) == self.park_chain:
            try:
                ray.get(handle.park.remote(), timeout=30)
            except Exception:  # a dead or stuck actor is no use warm: killed as usual
                ray.kill(handle)
            else:
                self.parked.append(handle)
            return
        if handle is not None:
            # Let the stages release servers and GPU memory; a dead or stuck actor is killed anyway.
            with contextlib.suppress(Exception):
                ray.get(handle.teardown.remote(), timeout=30)
            ray.kill(handle)

    def send(self, r: Request) -> None:
        actor = self.actors[r.actor]
        if r.kind == Kind.RUN:
            src = self.source_specs.get(r.shard) if r.chain == self.source_chain and r.start == 0 else None
            ref = actor.run.remote(r.shard, src, r.start, r.samples, r.detail)
        elif r.kind == Kind.SAMPLES:
            ref = actor.samples.remote(r.shard, r.start)
        else:
            ref = actor.probe.remote(r.shard, r.start, r.samples)
        self.pending[ref] = r

    def wait(self, timeout: float) -> list[Event]:
        if not self.pending:
            return []
        first, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout, fetch_local=False)
        if not first:
            return []
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0, fetch_local=False)
        ready = set(done) | set(first)
        events = []
        for ref in [r for r in self.pending if r in ready]:  # in submission order: deaths are blamed right
            r = self.pending.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as exc:  # every Ray failure becomes an outcome; none ends the loop unseen
                outcome = classify(exc)
                if outcome == Outcome.DIED:
                    self.actors.pop(r.actor, None)
                events.append(Event(r.req, outcome, error=describe(exc)))
                continue
            if r.kind == Kind.RUN:
                events.append(Event(r.req, Outcome.DONE, results=value))
            elif r.kind == Kind.SAMPLES:
                events.append(Event(r.req, Outcome.DONE, samples=value))
            else:
                events.append(Event(r.req, Outcome.DONE))
        return events

    def close(self) -> None:
        # Killing the actors ends their in-flight shards; nothing of those was committed.
        for aid in list(self.actors):
            self.stop_actor(aid)
        self.pending.clear()
