"""The last phase's actors, parked, run the run's closing steps; anything else gets a fresh task."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from manifests.tables import StageColumns
from pipeline.config import load_config
from pipeline.engine.cluster import ActorPlan
from pipeline.engine.executor import RayExecutor
from pipeline.engine.runner import Runner
from pipeline.engine.warm import WarmWorkers
from pipeline.run_tables import write_run_tables

pytestmark = pytest.mark.usefixtures("ray_session")

PLAN = ActorPlan(initial=1, maximum=1, num_cpus=0.25, num_gpus=0.0, memory=None)


def _where() -> str | None:
    """The actor this call ran in (None in a plain task)."""
    return ray.get_runtime_context().get_actor_id()


def _is_dead(actor: Any) -> bool:
    """Whether calls to the actor fail as a dead actor's do. ``ray.kill`` is asynchronous: a call sent
    in the moment after it may still reach the live process, so a killed actor is waited for (60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.call.remote(_where, (), {}), timeout=60)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def _runner(engine_config: dict[str, Any], out: Path) -> Runner:
    cfg, stages = load_config(raw=engine_config)
    return Runner(cfg, stages, str(out), show_progress=False)


def test_only_the_parked_chains_stopped_actors_stay_alive_and_run_submitted_steps(
        engine_config: dict[str, Any], tmp_path: Path) -> None:
    runner = _runner(engine_config, tmp_path / "run")
    specs = [[runner.spec(s)] for s in runner.stages]
    ex = RayExecutor(specs, [PLAN, PLAN], {}, source_chain=0, park_chain=1)
    ex.start_actor(0, 0)
    ex.start_actor(1, 1)
    first, last = ex.actors[0], ex.actors[1]
    ex.stop_actor(0)
    ex.stop_actor(1)
    assert ex.parked == [last] and not ex.actors
    assert _is_dead(first)  # the other chain's actor is gone: its CPUs are free
    warm = WarmWorkers(ex.parked)
    assert ray.get(warm.submit(_where)) == last._actor_id.hex()
    assert ray.get(warm.submit(_where, fresh=True)) is None  # a retry never reuses the warm actor
    warm.close()
    assert len(warm) == 0
    assert _is_dead(last)
    assert ray.get(WarmWorkers().submit(_where, options={"num_cpus": 0.25})) is None


def test_tables_written_through_a_dead_parked_actor_are_retried_as_tasks_and_complete(
        engine_config: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner = _runner(engine_config, out)
    assert runner.run().complete
    written = sorted(p.relative_to(out) for p in (out / "tables").rglob("*.parquet"))
    assert written, "the run wrote its tables"
    shutil.rmtree(out / "tables")

    ex = RayExecutor([[runner.spec(runner.stages[-1])]], [PLAN], {}, source_chain=None, park_chain=0)
    ex.start_actor(0, 0)
    ex.stop_actor(0)
    dead = WarmWorkers(ex.parked)
    ray.kill(ex.parked[0])
    assert _is_dead(ex.parked[0])  # the tables' steps meet a dead actor, not one still dying
    cols = [StageColumns(s.stage_id, runner.instances[s.stage_id].output_fields(), s.cls.writes_pixels)
            for s in runner.stages]
    shards = sorted(p.stem for p in (out / "manifests" / runner.order[0]).glob("0*.parquet"))
    done = write_run_tables(runner.store, cols, runner.fingerprints, shards, workers=dead)
    assert done["written"] == len(shards) == 3
    assert sorted(p.relative_to(out) for p in (out / "tables").rglob("*.parquet")) == written
