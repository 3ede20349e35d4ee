"""The streaming scheduler's decisions, fed made-up events: no Ray, no storage."""

from __future__ import annotations

import pytest

from pipeline.engine.cluster import ActorPlan, ClusterFitError, plan_actors
from pipeline.engine.scheduler import (
    Kind,
    Limits,
    Request,
    Scheduler,
    SetupFailed,
    ShardFailed,
    StageInfo,
    StartActor,
    StopActor,
    chain_resources,
    fuse_chains,
)
from stages.base import Resources

SHARDS = [f"{i:06d}" for i in range(6)]


def _plan(initial: int = 1, maximum: int = 2) -> ActorPlan:
    return ActorPlan(initial=initial, maximum=maximum, num_cpus=0.5, num_gpus=0.0, memory=None)


def _sched(chains: list[list[str]], *, budget: int = 4, committed: dict[str, set[str]] | None = None,
           plans: list[ActorPlan] | None = None, limits: Limits | None = None, shards: list[str] = SHARDS,
           upstream: str | None = None) -> Scheduler:
    stages = [s for c in chains for s in c]
    done = {s: set() for s in stages} | (committed or {})
    if upstream is not None:
        done.setdefault(upstream, set(shards))
    return Scheduler(chains, plans or [_plan() for _ in chains], budget, shards, done, upstream=upstream,
                     source=upstream is None, limits=limits or Limits())


def _requests(actions: list) -> list[Request]:
    return [a for a in actions if isinstance(a, Request)]


def _complete(s: Scheduler, r: Request) -> None:
    s.done(r.req, committed=s.chains[r.chain].stages[r.start:] if r.kind == Kind.RUN else ())


def _drain(s: Scheduler, actions: list, *, now: float = 0.0, on_request=None) -> list:  # type: ignore[no-untyped-def]
    """Run the phase to its end, completing requests oldest first; returns every action taken."""
    seen = list(actions)
    inflight = _requests(actions)
    steps = 0
    while s.busy():
        steps += 1
        assert steps < 10_000, "the scheduler does not converge"
        assert s.n_actors() <= s.budget
        if not inflight:
            now += 100.0  # only backoff delays left
        else:
            r = inflight.pop(0)
            if on_request is None or not on_request(s, r):
                _complete(s, r)
        new = s.decide(now)
        seen += new
        inflight += _requests(new)
    return seen


# ---------------------------------------------------------------- actor planning


def test_two_cpu_stages_on_two_cores_fit_together_and_never_ask_for_more_than_the_cluster() -> None:
    plans, budget = plan_actors([("a", Resources(cpus=1), None), ("b", Resources(cpus=1), None)], 2.0, 0.0)
    assert budget == 4
    assert all(p.maximum == 2 for p in plans.values())
    # Every actor at its maximum together asks for at most the cluster's CPUs: no deadlock.
    assert sum(p.maximum * p.num_cpus for p in plans.values()) <= 2.0 + 1e-9


def test_a_gpu_stage_gets_one_actor_per_gpu_and_a_gpu_less_cluster_is_refused() -> None:
    plans, _ = plan_actors([("g", Resources(cpus=1, gpus=0.5), None)], 8.0, 2.0)
    assert plans["g"].initial == plans["g"].maximum == 4
    with pytest.raises(ClusterFitError, match="gpus"):
        plan_actors([("g", Resources(gpus=1), None)], 8.0, 0.0)


def test_a_workers_cap_bounds_the_pool() -> None:
    plans, _ = plan_actors([("m", Resources(cpus=0.1), 1)], 16.0, 0.0)
    assert plans["m"].maximum == 1


# ---------------------------------------------------------------- fusion


def test_cpu_stages_fuse_and_a_gpu_stage_or_a_workers_cap_starts_a_new_chain() -> None:
    cpu = Resources(cpus=0.5)
    stages = [StageInfo("src", cpu, source=True), StageInfo("detect", Resources(cpus=1)),
              StageInfo("embed", Resources(cpus=1, gpus=1)), StageInfo("clip", Resources(cpus=1, gpus=1)),
              StageInfo("mllm", cpu, workers=1), StageInfo("label", cpu)]
    chains = [[s.stage_id for s in c] for c in fuse_chains(stages)]
    assert chains == [["src", "detect"], ["embed", "clip"], ["mllm"], ["label"]]
    assert [len(c) for c in fuse_chains(stages, enabled=False)] == [1] * 6
    merged = chain_resources(fuse_chains(stages)[0])
    assert merged.cpus == 1 and merged.gpus == 0


# ---------------------------------------------------------------- readiness and the submit policy


def test_a_downstream_chain_gets_a_shard_only_when_its_upstream_commits_it() -> None:
    s = _sched([["a"], ["b"]], plans=[_plan(1, 1), _plan(1, 1)])
    first = _requests(s.start())
    assert {r.chain for r in first} == {0}
    assert len(first) == 2  # one actor, two in flight
    _complete(s, first[0])
    nxt = _requests(s.decide())
    assert [(r.chain, r.shard) for r in nxt if r.chain == 1] == [(1, first[0].shard)]


def test_in_flight_requests_per_actor_are_bounded() -> None:
    s = _sched([["a"]], plans=[_plan(2, 2)], limits=Limits(max_in_flight=3))
    reqs = _requests(s.start())
    per_actor: dict[int, int] = {}
    for r in reqs:
        per_actor[r.actor] = per_actor.get(r.actor, 0) + 1
    assert sorted(per_actor.values()) == [3, 3]
    assert _requests(s.decide()) == []


def test_the_pool_grows_towards_the_backlog_and_retires_when_its_chain_has_no_work_left() -> None:
    s = _sched([["a"], ["b"]], budget=3, plans=[_plan(1, 2), _plan(1, 2)], limits=Limits(max_in_flight=1))
    actions = s.start()
    starts = [a for a in actions if isinstance(a, StartActor)]
    assert [a.chain for a in starts].count(0) == 2  # chain 0 has ready work: it grew to its maximum
    seen = _drain(s, actions)
    stops = [a for a in seen if isinstance(a, StopActor)]
    stopped_chain0 = [i for i, a in enumerate(seen) if isinstance(a, StopActor) and a.chain == 0]
    last_chain0_request = max(i for i, a in enumerate(seen) if isinstance(a, Request) and a.chain == 0)
    assert stopped_chain0 and min(stopped_chain0) > last_chain0_request
    assert {a.chain for a in stops} == {0, 1}
    assert all(sh in s.committed["b"] for sh in SHARDS)


def test_downstream_shards_are_sent_before_new_upstream_ones() -> None:
    s = _sched([["a"], ["b"]], budget=2, plans=[_plan(1, 1), _plan(1, 1)], limits=Limits(max_in_flight=1))
    r0 = _requests(s.start())
    assert [r.chain for r in r0] == [0]
    _complete(s, r0[0])
    order = [r.chain for r in _requests(s.decide())]
    assert order == [1, 0]


def test_three_chains_that_could_grow_to_six_actors_finish_every_shard_within_a_budget_of_four() -> None:
    s = _sched([["a"], ["b"], ["c"]], budget=4, plans=[_plan(1, 2)] * 3)
    _drain(s, s.start())
    assert all(s.committed[st] == set(SHARDS) for st in "abc")


def test_a_fused_chain_resumes_a_shard_from_its_first_uncommitted_stage() -> None:
    s = _sched([["a", "b", "c"]], committed={"a": {SHARDS[0], SHARDS[1]}, "b": {SHARDS[0]}})
    reqs = {r.shard: r for r in _drain(s, s.start()) if isinstance(r, Request)}
    assert reqs[SHARDS[0]].start == 2 and reqs[SHARDS[1]].start == 1 and reqs[SHARDS[2]].start == 0


def test_shards_the_stage_before_the_phase_did_not_commit_are_not_waited_for() -> None:
    s = _sched([["a"]], upstream="g", committed={"g": {SHARDS[0]}})
    seen = _drain(s, s.start())
    assert {r.shard for r in seen if isinstance(r, Request)} == {SHARDS[0]}
    assert not s.busy()


# ---------------------------------------------------------------- faults


def test_losing_every_actor_with_two_requests_in_flight_aborts_nothing_and_blames_only_running_shards() -> None:
    s = _sched([["a"]], plans=[_plan(2, 2)], limits=Limits(max_shard_deaths=2))
    reqs = _requests(s.start())
    assert len(reqs) == 4
    for r in reqs:  # the node goes away: each actor's running and queued request both fail
        s.died(r.req, "node died")
    running = {reqs[0].shard, reqs[1].shard} if reqs[0].actor != reqs[1].actor else {reqs[0].shard, reqs[2].shard}
    assert {shard for (_, shard), st in s.shard_states.items() if st.deaths} == running
    seen = _drain(s, s.decide())
    assert not [a for a in seen if isinstance(a, ShardFailed)]
    assert s.committed["a"] == set(SHARDS)


def test_a_shard_that_keeps_killing_its_worker_is_bisected_and_only_its_poison_sample_is_quarantined() -> None:
    samples = tuple(f"s{i}" for i in range(8))
    poison = "s5"
    s = _sched([["a"]], plans=[_plan(1, 1)], limits=Limits(max_in_flight=1, max_shard_deaths=3), upstream="src")
    bad = SHARDS[2]
    probes: list[tuple[str, ...]] = []
    runs: list[Request] = []

    def behave(s: Scheduler, r: Request) -> bool:
        if r.kind == Kind.SAMPLES:
            s.done(r.req, samples=samples)
        elif r.kind == Kind.PROBE:
            probes.append(r.samples)
            if poison in r.samples:
                s.died(r.req, "worker crashed")
            else:
                s.done(r.req)
        elif r.shard == bad and poison not in r.samples:
            runs.append(r)
            s.died(r.req, "worker crashed")
        else:
            runs.append(r)
            _complete(s, r)
        return True

    seen = _drain(s, s.start(), on_request=behave)
    assert not [a for a in seen if isinstance(a, ShardFailed)]
    final = [r for r in runs if r.shard == bad][-1]
    assert final.samples == (poison,) and "killed the worker" in final.detail
    assert len([r for r in runs if r.shard == bad]) == 4  # three deaths, then the quarantined run
    assert all(poison not in p or len(p) > 1 or p == (poison,) for p in probes)
    assert len(probes) < 2 * len(samples)  # a bisection, not one probe per sample
    assert s.committed["a"] == set(SHARDS)


def test_a_source_shard_that_keeps_killing_its_worker_fails_alone_and_the_rest_completes() -> None:
    s = _sched([["src", "b"]], plans=[_plan(1, 1)], limits=Limits(max_in_flight=1, max_shard_deaths=2))
    bad = SHARDS[1]

    def behave(s: Scheduler, r: Request) -> bool:
        if r.shard == bad:
            s.died(r.req, "segfault")
            return True
        return False

    seen = _drain(s, s.start(), on_request=behave)
    failed = [a for a in seen if isinstance(a, ShardFailed)]
    assert [(f.stage_id, f.shard) for f in failed] == [("src", bad)]
    assert s.committed["b"] == set(SHARDS) - {bad}


def test_a_transient_failure_backs_off_exponentially_and_never_counts_as_a_failure() -> None:
    s = _sched([["a"]], shards=[SHARDS[0]], plans=[_plan(1, 1)],
               limits=Limits(max_attempts=1, max_transient=3, backoff_s=2.0))
    (r,) = _requests(s.start())
    s.failed(r.req, "server down", transient=True, now=10.0)
    assert _requests(s.decide(11.0)) == [] and s.next_due() == 12.0
    (r,) = _requests(s.decide(12.0))
    s.failed(r.req, "server down", transient=True, now=20.0)
    assert s.next_due() == 24.0
    (r,) = _requests(s.decide(24.0))
    _complete(s, r)
    assert s.committed["a"] == {SHARDS[0]} and not s.busy()


def test_transient_failures_beyond_the_bound_become_a_failure_of_the_shard() -> None:
    s = _sched([["a"]], shards=[SHARDS[0]], plans=[_plan(1, 1)],
               limits=Limits(max_attempts=1, max_transient=2, backoff_s=1.0))
    actions, now, failed = s.start(), 0.0, []
    while s.busy() or actions:
        failed += [a for a in actions if isinstance(a, ShardFailed)]
        for r in _requests(actions):
            s.failed(r.req, "still down", transient=True, now=now)
        now += 10.0
        actions = s.decide(now)
    assert [f.shard for f in failed] == [SHARDS[0]]


def test_a_failing_shard_is_retried_at_the_back_then_given_up_and_downstream_does_not_wait_for_it() -> None:
    s = _sched([["a"], ["b"]], plans=[_plan(1, 1), _plan(1, 1)], limits=Limits(max_attempts=2, max_in_flight=1))
    bad = SHARDS[0]
    order: list[str] = []

    def behave(s: Scheduler, r: Request) -> bool:
        if r.chain == 0:
            order.append(r.shard)
        if r.chain == 0 and r.shard == bad:
            s.failed(r.req, "ValueError: broken")
            return True
        return False

    seen = _drain(s, s.start(), on_request=behave)
    assert order[0] == bad and order[1] != bad  # not retried at the front
    assert [(a.stage_id, a.shard) for a in seen if isinstance(a, ShardFailed)] == [("a", bad)]
    assert s.committed["b"] == set(SHARDS) - {bad}
    assert not s.busy()


def test_workers_that_die_in_a_row_without_finishing_anything_stop_the_run() -> None:
    s = _sched([["a"]], plans=[_plan(1, 1)], limits=Limits(max_in_flight=1, max_shard_deaths=2))
    actions = s.start()
    with pytest.raises(SetupFailed, match="died in a row"):
        for _ in range(100):
            for r in _requests(actions):
                s.died(r.req, "import error")
            actions = s.decide()


def test_during_a_bisection_a_raising_probe_clears_its_samples_and_probes_queued_behind_a_crash_go_again() -> None:
    samples = tuple(f"s{i}" for i in range(8))
    poison, raises = "s5", "s1"
    s = _sched([["a"]], plans=[_plan(1, 1)], limits=Limits(max_in_flight=2, max_shard_deaths=2), upstream="src")
    bad = SHARDS[3]
    requeued: list[tuple[str, ...]] = []
    probed: list[tuple[str, ...]] = []
    runs: list[Request] = []

    def behave(s: Scheduler, r: Request) -> bool:
        if r.kind == Kind.PROBE:
            probed.append(r.samples)
        if s.actors[r.actor].dead:  # queued behind the request that killed the actor: Ray fails it too
            if r.kind == Kind.PROBE:
                requeued.append(r.samples)
            s.died(r.req, "actor gone")
        elif r.kind == Kind.SAMPLES:
            s.done(r.req, samples=samples)
        elif r.kind == Kind.PROBE and poison in r.samples:
            s.died(r.req, "worker crashed")
        elif r.kind == Kind.PROBE and raises in r.samples:
            s.failed(r.req, "ValueError: a stage raised")  # not a crash: these samples are not poison
        elif r.kind == Kind.PROBE:
            s.done(r.req)
        else:
            runs.append(r)
            if r.shard == bad and poison not in r.samples:
                s.died(r.req, "worker crashed")
            else:
                _complete(s, r)
        return True

    seen = _drain(s, s.start(), on_request=behave)
    assert not [a for a in seen if isinstance(a, ShardFailed)]
    assert requeued and all(probed.count(q) >= 2 for q in requeued)  # queued behind a crash: sent again
    assert [r for r in runs if r.shard == bad][-1].samples == (poison,)  # the raising samples are not quarantined
    assert s.committed["a"] == set(SHARDS)


def test_a_shard_whose_sample_listing_kills_the_worker_or_finds_no_samples_fails_alone() -> None:
    s = _sched([["a"]], plans=[_plan(1, 1)], limits=Limits(max_in_flight=1, max_shard_deaths=2), upstream="src")
    kills_listing, empty = SHARDS[1], SHARDS[4]

    def behave(s: Scheduler, r: Request) -> bool:
        if r.shard not in (kills_listing, empty):
            return False
        if r.kind == Kind.SAMPLES and r.shard == empty:
            s.done(r.req, samples=())
        else:
            s.died(r.req, "worker crashed")
        return True

    seen = _drain(s, s.start(), on_request=behave)
    failed = {a.shard: a.error for a in seen if isinstance(a, ShardFailed)}
    assert set(failed) == {kills_listing, empty}
    assert "listing the samples" in failed[kills_listing] and "no samples to bisect" in failed[empty]
    assert s.committed["a"] == set(SHARDS) - {kills_listing, empty}
