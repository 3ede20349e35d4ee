"""The streaming phase's decisions, as a plain object that is fed events and answers with actions.

Nothing here talks to Ray: the runner's loop hands the scheduler what happened (a shard committed, a
request failed, an actor died) and carries out what it decides (start an actor, send a request, stop
a pool). So each policy is a small named method that a unit test drives with made-up events:

- fusion (``fuse_chains``): consecutive per-shard stages that fit one actor run as one chain;
- readiness: a shard enters a chain's ready queue when the stage before the chain commits it (an
  event), never by rescanning blocked queues;
- growth: pools grow towards the chain with ready work, within the cluster's actor budget, and a
  chain with no work left gives its actors back (downstream chains are served first, so shards
  finish before new ones start);
- faults: an actor death is blamed on the request it was running (the oldest one sent to it; the
  others queued behind it are requeued free), counted per shard; after ``max_shard_deaths`` the
  shard's samples are bisected with probe requests to find the poison ones, which alone get a
  ``worker_crash`` error row; a transient failure is retried with exponential backoff up to a bound
  and never counts as a permanent failure; any other failure is retried ``max_attempts`` times.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pipeline.engine.cluster import ActorPlan
from stages.base import Resources

# ---------------------------------------------------------------- fusion


@dataclass(frozen=True)
class StageInfo:
    """What the scheduler knows of a per-shard stage."""

    stage_id: str
    resources: Resources
    workers: int | None = None
    source: bool = False


def can_fuse(a: StageInfo, b: StageInfo) -> bool:
    """The fusion rule: ``b`` joins ``a``'s actor when one actor can serve both without wasting a
    device. Same GPU request (both CPU-only, or the same GPU share: a GPU model and a CPU stage in one
    actor would hold the GPU through the CPU work), the same ``workers`` cap (a user who limits one
    stage's actors, e.g. an MLLM client, limits the chain). Batch sizes never block fusion: each stage
    keeps its own batch size inside the chain, since the shard, not the batch, is what passes between
    them. CPU and memory requests are merged by taking the larger one."""
    return a.resources.gpus == b.resources.gpus and a.workers == b.workers


def fuse_chains(stages: Sequence[StageInfo], enabled: bool = True) -> list[list[StageInfo]]:
    chains: list[list[StageInfo]] = []
    for s in stages:
        if enabled and chains and can_fuse(chains[-1][-1], s):
            chains[-1].append(s)
        else:
            chains.append([s])
    return chains


def chain_resources(chain: Sequence[StageInfo]) -> Resources:
    return Resources(cpus=max(s.resources.cpus for s in chain), gpus=max(s.resources.gpus for s in chain),
                     memory_gb=max(s.resources.memory_gb for s in chain))


# ---------------------------------------------------------------- actions and events


class Kind(StrEnum):
    RUN = "run"  # run the chain on a shard from stage ``start`` on, committing each stage
    SAMPLES = "samples"  # list the live input sample ids of stage ``start`` for a shard (for bisection)
    PROBE = "probe"  # run the chain on some samples of a shard in memory, committing nothing


@dataclass(frozen=True)
class StartActor:
    chain: int
    actor: int


@dataclass(frozen=True)
class StopActor:
    chain: int
    actor: int


@dataclass(frozen=True)
class Request:
    req: int
    kind: Kind
    chain: int
    actor: int
    shard: str
    start: int  # index in the chain of the first stage to run
    samples: tuple[str, ...] = ()  # PROBE: the samples to try; RUN: the quarantined ones
    detail: str = ""  # RUN: why the quarantined samples are quarantined


@dataclass(frozen=True)
class ShardFailed:
    """A shard of a stage the run could not compute; nothing of it was committed (resume retries it)."""

    stage_id: str
    shard: str
    error: str


Action = StartActor | StopActor | Request | ShardFailed


class SetupFailed(RuntimeError):
    """A chain's actors cannot start or keep dying before doing any work: the run stops."""


# ---------------------------------------------------------------- state


@dataclass
class _Actor:
    aid: int
    chain: int
    inflight: deque[int] = field(default_factory=deque)  # request ids, oldest first (Ray runs them in order)
    dead: bool = False


@dataclass
class _Bisect:
    """Where the search for a shard's poison samples stands."""

    start: int
    todo: deque[tuple[str, ...]] = field(default_factory=deque)  # subsets still to probe
    outstanding: int = 0  # probes (or the sample listing) in flight
    poison: list[str] = field(default_factory=list)
    single_deaths: dict[str, int] = field(default_factory=dict)


@dataclass
class ShardState:
    """Everything a phase tracks for one shard in one chain, so each fault rule reads one record."""

    attempts: int = 0  # failures that count towards ``max_attempts``
    transient: int = 0  # transient retries so far (backed off, not counted as failures)
    deaths: int = 0  # actor deaths blamed on the shard since its last bisection
    bisect_rounds: int = 0  # bisections done; a shard that kills its worker after one is given up
    bisect: _Bisect | None = None  # the poison-sample search under way, if any
    quarantine: tuple[tuple[str, ...], str] = ((), "")  # poison samples found, and why: sent with its next run


@dataclass
class _Chain:
    index: int
    stages: list[str]
    plan: ActorPlan
    source: bool
    expect: set[str] = field(default_factory=set)  # shards this chain still has to finish
    ready: deque[str] = field(default_factory=deque)
    actors: list[_Actor] = field(default_factory=list)
    deaths_in_a_row: int = 0


@dataclass(frozen=True)
class Limits:
    max_in_flight: int = 2  # requests queued per actor
    max_attempts: int = 3  # failures (not deaths, not transient) before a shard is given up
    max_shard_deaths: int = 3  # actor deaths blamed on one shard before it is bisected
    max_transient: int = 5  # transient retries of one shard before they count as a failure
    backoff_s: float = 1.0  # first transient retry delay; doubled per retry
    backoff_max_s: float = 60.0
    poison_confirm: int = 2  # deaths of a one-sample probe before that sample is called poison


class Scheduler:
    """One streaming phase. ``committed`` maps every stage of the run to its committed shards; it is
    updated in place as commits are reported (the runner shares it with later phases)."""

    def __init__(self, chains: Sequence[Sequence[str]], plans: Sequence[ActorPlan], budget: int,
                 shards: Sequence[str], committed: dict[str, set[str]], upstream: str | None,
                 source: bool = False, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.budget = budget
        self.committed = committed
        self.upstream = upstream  # the stage before the phase (a global stage, or None for a source phase)
        self.chains = [_Chain(i, list(c), p, source=(source and i == 0)) for i, (c, p) in
                       enumerate(zip(chains, plans, strict=True))]
        self.position = {sid: (c.index, j) for c in self.chains for j, sid in enumerate(c.stages)}
        self.order = {sh: i for i, sh in enumerate(shards)}
        self.requests: dict[int, Request] = {}
        self.actors: dict[int, _Actor] = {}
        self.shard_states: dict[tuple[int, str], ShardState] = {}  # keyed by (chain, shard)
        self.delayed: list[tuple[float, int, int, str]] = []  # (due, tiebreak, chain, shard)
        self._ids = itertools.count(1)
        self._probes: dict[int, deque[tuple[Kind, str, int, tuple[str, ...]]]] = {}
        self._tiebreak = itertools.count()
        self.out: list[Action] = []
        for c in self.chains:
            todo = [sh for sh in shards if any(sh not in committed[s] for s in c.stages)]
            c.expect = set(todo)
            for sh in todo:
                if self._input_ready(c, sh):
                    c.ready.append(sh)
        # Shards whose input can never arrive in this phase (the stage before the phase left them
        # uncommitted) are not this phase's work.
        for c in self.chains:
            for sh in list(c.expect):
                if not self._can_arrive(c, sh):
                    c.expect.discard(sh)

    # ------------------------------------------------------------ readiness

    def _before(self, c: _Chain) -> str | None:
        return self.chains[c.index - 1].stages[-1] if c.index else self.upstream

    def _input_ready(self, c: _Chain, shard: str) -> bool:
        before = self._before(c)
        return c.source or before is None or shard in self.committed.get(before, set())

    def _can_arrive(self, c: _Chain, shard: str) -> bool:
        if self._input_ready(c, shard):
            return True
        return c.index > 0 and shard in self.chains[c.index - 1].expect

    def _first_open(self, c: _Chain, shard: str) -> int:
        return next(j for j, s in enumerate(c.stages) if shard not in self.committed[s])

    def _state(self, chain: int, shard: str) -> ShardState:
        return self.shard_states.setdefault((chain, shard), ShardState())

    def _bisection(self, chain: int, shard: str) -> _Bisect:
        b = self._state(chain, shard).bisect
        assert b is not None, f"no bisection under way for shard {shard} of chain {chain}"
        return b

    def _finish(self, c: _Chain, shard: str) -> None:
        c.expect.discard(shard)
        st = self.shard_states.get((c.index, shard))
        if st is not None:
            st.deaths = 0
            st.quarantine = ((), "")
        if c.index + 1 < len(self.chains):
            nxt = self.chains[c.index + 1]
            if shard in nxt.expect and self._input_ready(nxt, shard):
                nxt.ready.append(shard)

    def _give_up(self, c: _Chain, shard: str, error: str) -> None:
        """The shard stays uncommitted from its first open stage on; later chains will not get it."""
        open_ = [s for s in c.stages if shard not in self.committed[s]]
        sid = open_[0] if open_ else c.stages[-1]
        self.out.append(ShardFailed(sid, shard, error))
        for later in self.chains[c.index:]:
            later.expect.discard(shard)
        self._state(c.index, shard).bisect = None

    # ------------------------------------------------------------ events

    def committed_stage(self, stage_id: str, shard: str) -> None:
        """A stage committed a shard (reported by the worker that ran it)."""
        self.committed.setdefault(stage_id, set()).add(shard)

    def done(self, req: int, committed: Iterable[str] = (), samples: Sequence[str] = ()) -> None:
        r = self._close(req)
        c = self.chains[r.chain]
        c.deaths_in_a_row = 0
        if r.kind == Kind.RUN:
            for sid in committed:
                self.committed_stage(sid, r.shard)
            if all(r.shard in self.committed[s] for s in c.stages):
                self._finish(c, r.shard)
            else:  # a chain stops early when nothing is left alive for the rest of it: nothing to do
                c.ready.appendleft(r.shard)
            return
        b = self._bisection(r.chain, r.shard)
        b.outstanding -= 1
        if r.kind == Kind.SAMPLES:
            ids = tuple(samples)
            if not ids:
                self._give_up(c, r.shard, f"the shard killed its worker {self.limits.max_shard_deaths} times "
                                          "and has no samples to bisect")
                return
            self._split(b, ids)
        self._bisect_step(c, r.shard)

    def failed(self, req: int, error: str, *, transient: bool = False, now: float = 0.0,
               committed: Iterable[str] = ()) -> None:
        """The request raised (the actor is alive). Transient: back off and retry, up to a bound.
        ``committed``: the stages of the chain found committed for the shard (a chain commits stage by
        stage, so the ones before the failure are done)."""
        r = self._close(req)
        for sid in committed:
            self.committed_stage(sid, r.shard)
        c = self.chains[r.chain]
        if r.kind != Kind.RUN:
            # A probe or listing that raises (not a crash) says the subset is not poison for the worker.
            self._bisection(r.chain, r.shard).outstanding -= 1
            self._bisect_step(c, r.shard)
            return
        st = self._state(r.chain, r.shard)
        if transient:
            st.transient += 1
            if st.transient <= self.limits.max_transient:
                delay = min(self.limits.backoff_s * 2 ** (st.transient - 1), self.limits.backoff_max_s)
                heapq.heappush(self.delayed, (now + delay, next(self._tiebreak), r.chain, r.shard))
                return
        st.attempts += 1
        if st.attempts < self.limits.max_attempts:
            c.ready.append(r.shard)  # at the back: the others go first
        else:
            self._give_up(c, r.shard, error)

    def died(self, req: int, error: str = "", committed: Iterable[str] = ()) -> None:
        """The actor that held the request died (or its node went away); ``committed`` as in ``failed``.
        Only the request the actor was running is blamed; the ones queued behind it go back."""
        r = self.requests[req]
        for sid in committed:
            self.committed_stage(sid, r.shard)
        actor = self.actors[r.actor]
        blamed = not actor.dead and bool(actor.inflight) and actor.inflight[0] == req
        if not actor.dead:
            actor.dead = True
            owner = self.chains[actor.chain]
            if actor in owner.actors:
                owner.actors.remove(actor)
        self._close(req)
        c = self.chains[r.chain]
        if r.kind == Kind.RUN:
            self._run_died(c, r, blamed, error)
        else:
            self._probe_died(c, r, blamed, error)

    def _run_died(self, c: _Chain, r: Request, blamed: bool, error: str) -> None:
        """A shard run lost its actor: requeue it, or after ``max_shard_deaths`` bisect its samples."""
        if not blamed:  # it was queued behind the one that killed the actor
            c.ready.appendleft(r.shard)
            return
        c.deaths_in_a_row += 1
        limit = (self.limits.max_shard_deaths + self.limits.max_in_flight) * max(c.plan.maximum, 1)
        if c.deaths_in_a_row > limit:
            raise SetupFailed(f"stage(s) {', '.join(c.stages)}: {c.deaths_in_a_row} workers died in a row "
                              f"without finishing any work: {error}")
        st = self._state(c.index, r.shard)
        st.deaths += 1
        if st.deaths < self.limits.max_shard_deaths:
            c.ready.append(r.shard)  # at the back, never the front: other shards go on
            return
        if st.bisect_rounds >= 1 or (c.source and self._first_open(c, r.shard) == 0):
            why = ("a source shard cannot be split" if st.bisect_rounds == 0
                   else "again after its poison samples were quarantined")
            self._give_up(c, r.shard, f"shard {r.shard} killed its worker {st.deaths} times ({why}): {error}")
            return
        self._start_bisection(c, r.shard)

    # ------------------------------------------------------------ bisection

    def _start_bisection(self, c: _Chain, shard: str) -> None:
        """Look for the shard's poison samples: list its live samples first, then probe halves."""
        st = self._state(c.index, shard)
        st.bisect_rounds += 1
        st.deaths = 0
        st.bisect = _Bisect(start=self._first_open(c, shard), outstanding=1)
        self._send(c, Kind.SAMPLES, shard, st.bisect.start, front=True)

    def _probe_died(self, c: _Chain, r: Request, blamed: bool, error: str) -> None:
        """A listing or probe lost its actor: a one-sample probe that kills it enough times names a
        poison sample, a larger one is split; one queued behind the killer is sent again."""
        b = self._bisection(r.chain, r.shard)
        b.outstanding -= 1
        if not blamed:
            if r.kind == Kind.SAMPLES:
                b.outstanding += 1
                self._send(c, Kind.SAMPLES, r.shard, b.start, front=True)
            else:
                b.todo.appendleft(r.samples)
            self._bisect_step(c, r.shard)
            return
        if r.kind == Kind.SAMPLES:
            self._give_up(c, r.shard, f"listing the samples of shard {r.shard} kills the worker: {error}")
            return
        if len(r.samples) == 1:
            sid = r.samples[0]
            b.single_deaths[sid] = b.single_deaths.get(sid, 0) + 1
            if b.single_deaths[sid] >= self.limits.poison_confirm:
                b.poison.append(sid)
            else:
                b.todo.appendleft(r.samples)
        else:
            self._split(b, r.samples)
        self._bisect_step(c, r.shard)

    @staticmethod
    def _split(b: _Bisect, ids: tuple[str, ...]) -> None:
        mid = (len(ids) + 1) // 2
        b.todo.append(ids[:mid])
        if ids[mid:]:
            b.todo.append(ids[mid:])

    def _bisect_step(self, c: _Chain, shard: str) -> None:
        """Send the subsets still to probe; when none is out, quarantine what was found and rerun."""
        st = self._state(c.index, shard)
        b = self._bisection(c.index, shard)
        while b.todo:
            self._send(c, Kind.PROBE, shard, b.start, samples=b.todo.popleft(), front=True)
            b.outstanding += 1
        if b.outstanding == 0:
            st.bisect = None
            names = ", ".join(c.stages[b.start:])
            detail = (f"this sample killed the worker of stage(s) {names} "
                      f"(found by bisecting shard {shard}); quarantined")
            st.quarantine = (tuple(sorted(b.poison)), detail)
            c.ready.appendleft(shard)

    # ------------------------------------------------------------ decisions

    def _send(self, c: _Chain, kind: Kind, shard: str, start: int, samples: tuple[str, ...] = (),
              front: bool = False) -> None:
        """Queue a probe or listing: they go out before any shard (``front``) in ``decide``."""
        self._probes.setdefault(c.index, deque())
        (self._probes[c.index].appendleft if front else self._probes[c.index].append)((kind, shard, start, samples))

    def _close(self, req: int) -> Request:
        r = self.requests.pop(req)
        actor = self.actors.get(r.actor)
        if actor is not None and req in actor.inflight:
            actor.inflight.remove(req)  # at most max_in_flight long
        return r

    def n_actors(self) -> int:
        return sum(len(c.actors) for c in self.chains)

    def has_work(self, c: _Chain) -> bool:
        return bool(c.expect) or bool(self._probes.get(c.index))

    def busy(self) -> bool:
        """Whether the phase still has anything in flight or waiting."""
        return bool(self.requests) or bool(self.delayed) or any(
            c.ready or self._probes.get(c.index) for c in self.chains)

    def next_due(self) -> float | None:
        return self.delayed[0][0] if self.delayed else None

    def decide(self, now: float = 0.0) -> list[Action]:
        """Everything to do now, in order: retire idle pools, then fill actors downstream first."""
        while self.delayed and self.delayed[0][0] <= now:
            _, _, ci, shard = heapq.heappop(self.delayed)
            self.chains[ci].ready.append(shard)
        for c in self.chains:
            if not self.has_work(c) and c.actors and not any(a.inflight for a in c.actors):
                for a in c.actors:
                    self.out.append(StopActor(c.index, a.aid))
                    a.dead = True
                c.actors = []
        for c in reversed(self.chains):
            self._fill(c)
        out, self.out = self.out, []
        return out

    def _next_item(self, c: _Chain) -> tuple[Kind, str, int, tuple[str, ...], str] | None:
        probes = self._probes.get(c.index)
        if probes:
            kind, shard, start, samples = probes.popleft()
            return kind, shard, start, samples, ""
        while c.ready:
            shard = c.ready.popleft()
            if shard not in c.expect:
                continue
            st = self.shard_states.get((c.index, shard))
            poison, detail = st.quarantine if st is not None else ((), "")
            return Kind.RUN, shard, self._first_open(c, shard), poison, detail
        return None

    def _pick_actor(self, c: _Chain) -> _Actor | None:
        live = [a for a in c.actors if not a.dead]
        if live:
            best = min(live, key=lambda a: len(a.inflight))
            if len(best.inflight) < self.limits.max_in_flight:
                return best
        if len(live) < c.plan.maximum and (self.n_actors() < self.budget or not live):
            a = _Actor(next(self._ids), c.index)
            c.actors.append(a)
            self.actors[a.aid] = a
            self.out.append(StartActor(c.index, a.aid))
            return a
        return None

    def _fill(self, c: _Chain) -> None:
        while True:
            item = self._next_item(c)
            if item is None:
                return
            actor = self._pick_actor(c)
            kind, shard, start, samples, detail = item
            if actor is None:  # put it back where it came from
                if kind == Kind.RUN:
                    c.ready.appendleft(shard)
                else:
                    self._probes[c.index].appendleft((kind, shard, start, samples))
                return
            r = Request(next(self._ids), kind, c.index, actor.aid, shard, start, samples, detail)
            self.requests[r.req] = r
            actor.inflight.append(r.req)
            self.out.append(r)

    def start(self) -> list[Action]:
        """The phase's first actions: the initial pools, then the first requests."""
        for c in self.chains:
            if not self.has_work(c):
                continue
            for _ in range(c.plan.initial):
                a = _Actor(next(self._ids), c.index)
                c.actors.append(a)
                self.actors[a.aid] = a
                self.out.append(StartActor(c.index, a.aid))
        return self.decide()
