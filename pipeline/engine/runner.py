"""The runner: the one place where scheduling happens.

A run is a list of phases. Consecutive per-shard stages form one streaming phase: each stage has a
pool of long-lived Ray actors (set up once: models load once per actor), and shard i of stage k is
submitted as soon as shard i of stage k-1 is committed, with a bounded number of shards in flight
per actor. A global stage is a phase of its own, a barrier run as distributed Ray tasks (global_exec).
The export is the last phase. The driver only ever holds shard names and small per-shard summaries.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import ray
from rich.console import Console

from facekit.userconfig import clip, shown
from manifests.layout import IDENTITIES_FILE, LEGACY_PLAN_FILE, PLAN_FILE, history_path
from manifests.storage import RunStorage
from pipeline.config import ConfigError, PipelineConfig, ResolvedStage, config_hash
from pipeline.engine import cluster
from pipeline.engine.execution import StageSpec, UpstreamInfo, is_committed, member_columns
from pipeline.engine.executor import Event, Outcome, RayExecutor
from pipeline.engine.fused import StageSetupError
from pipeline.engine.global_exec import GlobalStageError, run_global_distributed
from pipeline.engine.progress import Progress, StageProgress
from pipeline.engine.rundir import (
    RunConflictError,
    check_compatible,
    check_output,
    export_fingerprint,
    read_plan,
    run_lock,
    scan_committed,
    stage_fingerprints,
    wipe_run,
    wipe_stages,
    write_plan,
    write_run_file,
)
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
from pipeline.engine.warm import WarmWorkers
from pipeline.refill import Refill
from pipeline.terminal import console as make_console
from pipeline.terminal import styled
from stages.base import InputError, SourceStage, Stage, StageContext, StageKind

MAX_SHARD_ATTEMPTS = 3
# What a failed global phase may raise: its own error, a bad input it could not use, or any Ray failure.
GLOBAL_FAILURES: tuple[type[BaseException], ...] = (GlobalStageError, ValueError, TypeError, ray.exceptions.RayError)


@dataclass
class RunResult:
    run_dir: str
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    export_ran: bool = False
    export: dict[str, Any] | None = None
    complete: bool = False
    failures: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    nothing_to_do: bool = False  # complete already for this config: nothing was started or rewritten


def _shard_name(i: int) -> str:
    return f"{i:06d}"


class Runner:
    def __init__(self, cfg: PipelineConfig, stages: list[ResolvedStage], output: str, *,
                 storage_options: dict[str, Any] | None = None, console: Console | None = None,
                 show_progress: bool = True) -> None:
        self.cfg = cfg
        self.stages = stages
        self.store = RunStorage(output, storage_options)
        self.console = console or make_console(stderr=True)
        self.show_progress = show_progress
        self.fingerprints = stage_fingerprints(cfg, stages)
        self.order = [s.stage_id for s in stages]
        ids = cfg.identities.model_dump(mode="json") if cfg.identities else None
        self.contexts = {
            s.stage_id: StageContext(run_dir=output, stage_id=s.stage_id, seed=cfg.run.seed,
                                     storage_options=dict(storage_options or {}), identities=ids)
            for s in stages
        }
        self.refill = Refill(cfg, stages, self.store)
        # Instances in the driver are never set up: they only answer schema questions.
        self.instances: dict[str, Stage[Any]] = {s.stage_id: s.cls(s.params, self.contexts[s.stage_id]) for s in stages}
        self._check_columns()

    # ------------------------------------------------------------ validation before work

    def _check_columns(self) -> None:
        from manifests.schema import CARRIED

        available: dict[str, str] = {c: "every stage" for c in CARRIED}
        for s in self.stages:
            inst = self.instances[s.stage_id]
            wanted = list(inst.input_columns())
            missing = [c for c in wanted if c not in available]
            if missing:
                written = ", ".join(f"{c} ({w})" for c, w in sorted(available.items()) if w != "every stage")
                raise ConfigError(
                    f"invalid config:\n  stages[{s.index}] ({s.stage_id}): reads column(s) {', '.join(missing)} "
                    f"that no earlier stage writes; earlier stages write: {written or 'nothing'}"
                )
            available.update({f.name: s.stage_id for f in inst.output_fields()})
        exp = self.cfg.export
        for where, target in exp.column_refs():
            stage, _, column = target.partition(".")
            if stage not in self.instances:
                raise ConfigError(f"invalid config:\n  {clip(where)}: no stage {shown(stage)} in this run "
                                  f"(stages: {', '.join(self.order)})")
            fields = {f.name: f for f in self.instances[stage].output_fields()}
            if column not in fields:
                raise ConfigError(f"invalid config:\n  {clip(where)}: stage {shown(stage)} has no column "
                                  f"{shown(column)} (columns: {', '.join(sorted(fields))})")
            kind = fields[column].type
            if where.startswith("export.extra_members.") and not (
                    column in member_columns(self.instances[stage]) or pa.types.is_binary(kind)
                    or pa.types.is_large_binary(kind)):
                raise ConfigError(f"invalid config:\n  {where}: {target} is {kind}, not image bytes (a pixel "
                                  f"member or a binary column)")
        if not exp.where:  # the where check needs duckdb and pyarrow.dataset: seconds of imports saved
            return
        from manifests.tables import StageColumns, samples_schema
        from pipeline.export.plan import where_error

        schema = samples_schema([StageColumns(s.stage_id, self.instances[s.stage_id].output_fields(),
                                              s.cls.writes_pixels) for s in self.stages])
        problem = where_error(exp, self.order, schema)
        if problem:
            raise ConfigError(f"invalid config:\n  export.where: {problem} (columns are those of tables/samples: "
                              f"stage__column, e.g. {schema.names[-1]})")

    # ------------------------------------------------------------ specs and plans

    def spec(self, s: ResolvedStage) -> StageSpec:
        upstream = tuple(
            UpstreamInfo(u.stage_id, u.cls.writes_pixels, u.prune,
                         tuple(f.name for f in self.instances[u.stage_id].output_fields()),
                         tuple(member_columns(self.instances[u.stage_id])))
            for u in self.stages[: self.order.index(s.stage_id)]
        )
        return StageSpec(stage_id=s.stage_id, cls=s.cls, params=s.params, batch_size=s.batch_size,
                         fingerprint=self.fingerprints[s.stage_id], params_hash=s.params_hash,
                         upstream=upstream, context=self.contexts[s.stage_id])

    def check_source(self) -> None:
        """Refuse a source input that cannot give a sample (a missing folder) before any work."""
        self._source_step(lambda inst: inst.check_input())

    def prepare_source(self) -> None:
        """Let the source create its run-level inputs (a generator's identities table) before planning."""
        self._source_step(lambda inst: inst.prepare(self.store))

    def _source_step(self, step: Callable[[SourceStage[Any]], None]) -> None:
        source = self.stages[0]
        inst = self.instances[source.stage_id]
        assert isinstance(inst, SourceStage)
        try:
            step(inst)
        except InputError as exc:
            raise ConfigError(f"invalid config: stages[{source.index}] ({source.stage_id}).{exc.key}: {exc}") from None

    def shard_plan(self) -> list[dict[str, Any]]:
        source = self.stages[0]
        fp = self.fingerprints[source.stage_id]
        plan = read_plan(self.store)
        if plan is None or plan.get("fingerprint") != fp:
            inst = self.instances[source.stage_id]
            assert hasattr(inst, "plan")
            specs = inst.plan(self.cfg.run.shard_size)
            plan = {"fingerprint": fp, "source": source.stage_id,
                    "shards": [{"name": _shard_name(i), "spec": sp} for i, sp in enumerate(specs)]}
            write_plan(self.store, plan)
        return self.refill.reconcile(plan)["shards"]

    def _next_round(self, plan: list[dict[str, Any]], prog: Progress
                    ) -> tuple[list[str], dict[str, Any], dict[str, set[str]]]:
        """Shards, specs and commits of the plan a refill round extended; progress counts the new totals
        (a stage the round removed starts again from zero)."""
        shards = [p["name"] for p in plan]
        committed, _ = scan_committed(self.store, self.order)
        for sid, p in prog.stages.items():
            p.total, p.done = len(shards), len(committed[sid])
            if not committed[sid]:
                p.rows = 0
                p.clear()
        prog.export_note = f"refill: round {max(int(x['spec'].get('round', 0)) for x in plan)}"
        return shards, {p["name"]: p["spec"] for p in plan}, committed

    # ------------------------------------------------------------ the run

    def stages_to_wipe(self, force: bool, new: bool) -> list[str]:
        """Refuse a changed config before anything starts; otherwise the stages a re-run recomputes."""
        if new:
            return []
        to_wipe, message = check_compatible(self.store, self.fingerprints, self.order)
        if message and not force:
            raise RunConflictError(message)
        return to_wipe

    def prepare(self, force: bool, new: bool, to_wipe: list[str] | None = None) -> None:
        if new:
            wipe_run(self.store)
        else:
            to_wipe = self.stages_to_wipe(force, new) if to_wipe is None else to_wipe
            if to_wipe:
                wipe_stages(self.store, to_wipe)
                if self.order[0] in to_wipe:
                    self.store.remove(PLAN_FILE)
                    self.store.remove(LEGACY_PLAN_FILE)
                    self.store.remove(*IDENTITIES_FILE)
        write_run_file(self.store, self.cfg, self.fingerprints)
        for sid in self.order:
            self.store.clear_tmp("manifests", sid)
            self.store.clear_tmp("shards", sid)

    def phases(self) -> list[list[ResolvedStage]]:
        out: list[list[ResolvedStage]] = []
        for s in self.stages:
            if s.cls.kind == StageKind.GLOBAL:
                out.append([s])
            elif out and out[-1][0].cls.kind != StageKind.GLOBAL:
                out[-1].append(s)
            else:
                out.append([s])
        return out

    def run(self, *, force: bool = False, new: bool = False, address: str | None = None,
            num_cpus: int | None = None) -> RunResult:
        """Prepare (lock, plan, scan what is committed), run the phases, then close (tables, export,
        report, history). A run whose every output is current starts no Ray at all."""
        t0 = time.monotonic()
        result = RunResult(run_dir=self.store.url)
        self.check_source()
        check_output(self.store)
        with run_lock(self.store, force=force):
            to_wipe = self.stages_to_wipe(force, new)
            if not new and not to_wipe and self._finished(result):
                result.seconds = time.monotonic() - t0
                return result
            owns_ray = cluster.connect(address, num_cpus, self.cfg.run.py_modules)
            warm = WarmWorkers()
            try:
                shards, specs, committed = self._prepare_run(force, new, to_wipe)
                warm = self._run_phases(result, shards, specs, committed)
            except BaseException:  # a failed or interrupted run: no report, Ray stopped, the error raised
                warm.close()
                if owns_ray:
                    cluster.shutdown()
                raise
            warm.close()
            self._close(result, owns_ray, t0)
        return result

    def _check_gpus(self) -> None:
        """Before any work: a GPU stage on a cluster without GPUs."""
        _, gpus = cluster.cluster_totals()
        for s in self.stages:
            if s.resources.gpus > gpus:
                raise cluster.ClusterFitError(
                    f"stage {s.stage_id!r} declares gpus={s.resources.gpus:g} but the cluster has "
                    f"{gpus:g} GPU(s); run it on a GPU cluster (--address) or set "
                    f"--set stages.{s.stage_id}.resources.gpus=0")

    def _prepare_run(self, force: bool, new: bool, to_wipe: list[str]
                     ) -> tuple[list[str], dict[str, Any], dict[str, set[str]]]:
        """Run-level inputs, the frozen shard plan and what is committed already: the shards, each
        shard's source spec, and the committed shards per stage."""
        self._check_gpus()
        self.prepare(force, new, to_wipe)
        self.prepare_source()
        for s in self.stages[1:]:  # run-level inputs of later stages (a gallery index), once per run
            self.instances[s.stage_id].prepare(self.store)
        plan = self.shard_plan()
        committed, bad = scan_committed(self.store, self.order)
        for b in bad:  # verified commit: these are recomputed like shards never written
            self.console.print(styled(("not committed:", "yellow"), f" {b.message()}"))
        return [p["name"] for p in plan], {p["name"]: p["spec"] for p in plan}, committed

    def _run_phases(self, result: RunResult, shards: list[str], specs: dict[str, Any],
                    committed: dict[str, set[str]]) -> WarmWorkers:
        """Every phase, then the stages' run-level summaries, the tables and the export; fills ``result``
        and returns the workers parked for the closing steps (to be closed by the caller)."""
        prog = Progress(
            [StageProgress(s.stage_id, s.cls.kind.value, len(shards), done=len(committed[s.stage_id]),
                           skipped=len(committed[s.stage_id])) for s in self.stages],
            enabled=self.show_progress, console=self.console,
        )
        failures: dict[tuple[str, str], str] = {}
        with prog:
            while True:  # one pass per refill round (pipeline/refill.py); one in all without refill
                complete, warm = self._one_pass(shards, specs, committed, failures, prog)
                if not (complete and self.refill.next_round()):
                    break
                warm.close()
                shards, specs, committed = self._next_round(self.shard_plan(), prog)
            warm.close()
            if complete and self.cfg.export.enabled:
                prog.export_note = "export: running"
                prog.update()
                result.export, result.export_ran = self._run_export(failures)
                prog.export_note = "export: " + ("failed" if result.export is None else
                                                 "written" if result.export_ran else "up to date")
                prog.update()
        for s in self.stages:
            p = prog.stages[s.stage_id]
            result.stages[s.stage_id] = {"computed": p.computed, "resumed": p.skipped, "failed": p.failed,
                                         "kept": p.kept, "dropped": p.dropped, "errors": p.errors}
        result.failures = [{"stage": k[0], "shard": k[1], "error": v} for k, v in failures.items()]
        result.complete = complete and (result.export is not None or not self.cfg.export.enabled)
        return warm

    def _one_pass(self, shards: list[str], specs: dict[str, Any], committed: dict[str, set[str]],
                  failures: dict[tuple[str, str], str], prog: Progress) -> tuple[bool, WarmWorkers]:
        """Every phase over the plan's shards, the stages' run-level summaries and the tables: whether the
        run is complete, and the workers parked for the closing steps."""
        warm = WarmWorkers()
        compactions: list[Any] = []
        phases = self.phases()
        for i, phase in enumerate(phases):
            if phase[0].cls.kind == StageKind.GLOBAL:
                self._run_global(phase[0], shards, committed, failures, prog)
            else:
                warm = WarmWorkers(self._run_streaming(phase, shards, specs, committed, failures,
                                                       prog, park=i == len(phases) - 1))
            compactions += self._compact(phase, shards, committed, warm)
        for s in self.stages[1:]:  # run-level summaries from the committed manifests
            self.instances[s.stage_id].finish(self.store)
        self._await_compactions(compactions)
        complete = not failures and all(len(committed[s]) == len(shards) for s in self.order)
        if complete:
            prog.export_note = "tables: writing"
            prog.update()
            complete = self._write_tables(shards, failures, warm)
        return complete, warm

    def _close(self, result: RunResult, owns_ray: bool, t0: float) -> None:
        """The report (drawn from the committed manifests while Ray's processes stop, rather than after
        them), Ray stopped if this run started it, and the run's history row."""
        report = ReportWriter(self.store)
        try:
            if owns_ray:
                cluster.shutdown()
        finally:  # even on a Ctrl-C here: a thread left inside matplotlib aborts the interpreter's exit
            problem = report.wait()
        result.seconds = time.monotonic() - t0
        self._write_history(result)
        if problem:  # a report problem must never fail a finished run
            self.console.print(styled(("report not written:", "yellow"), f" {problem}"))

    def _finished(self, result: RunResult) -> bool:
        """Whether the run directory holds this config's complete run: same config, every stage's
        every shard committed, tables and export (where enabled) current, report written. Then the run
        starts no Ray and rewrites nothing (``result`` says so); anything missing runs the full path,
        which redoes only what is missing."""
        from manifests.layout import REPORT_FILE
        from manifests.tables import StageColumns
        from pipeline.engine.rundir import read_run_file
        from pipeline.export.task import read_committed
        from pipeline.run_tables import tables_stamp, tables_up_to_date

        state = read_run_file(self.store)
        plan = read_plan(self.store)
        source_fp = self.fingerprints[self.order[0]]
        if (state is None or plan is None or state.config_hash != config_hash(self.cfg)
                or state.fingerprints != self.fingerprints or plan.get("fingerprint") != source_fp
                or not self.store.exists(*REPORT_FILE)):
            return False
        shards = [p["name"] for p in plan["shards"]]
        committed, bad = scan_committed(self.store, self.order)
        if bad or not shards or any(committed[sid] != set(shards) for sid in self.order):
            return False
        cols = [StageColumns(s.stage_id, self.instances[s.stage_id].output_fields(), s.cls.writes_pixels)
                for s in self.stages]
        if not tables_up_to_date(self.store, tables_stamp(self.store, cols, self.fingerprints, shards)[2], shards):
            return False
        export = read_committed(self.store) if self.cfg.export.enabled else None
        if self.cfg.export.enabled and (export is None or export.get("fingerprint") != export_fingerprint(
                self.cfg, self.fingerprints)):
            return False
        result.stages = {sid: {"computed": 0, "resumed": len(shards), "failed": 0} for sid in self.order}
        result.export, result.complete, result.nothing_to_do = export, True, True
        return True

    def _run_streaming(self, phase: list[ResolvedStage], shards: list[str], specs: dict[str, Any],
                       committed: dict[str, set[str]], failures: dict[tuple[str, str], str], prog: Progress,
                       park: bool = False) -> list[Any]:
        """Stream shards through the phase's stages: a thin loop feeding the scheduler's decisions to the
        Ray executor and the executor's events back to the scheduler (pipeline/engine/scheduler.py).
        With ``park`` (the run's last phase), returns the last chain's idle actors for the closing steps."""
        if all(len(committed[s.stage_id]) == len(shards) for s in phase):
            return []
        infos = [StageInfo(s.stage_id, s.resources, s.workers, s.cls.kind == StageKind.SOURCE) for s in phase]
        chains = fuse_chains(infos, enabled=self.cfg.run.fuse)
        cpus, gpus = cluster.cluster_totals()
        plans_by, budget = cluster.plan_actors(
            [(str(i), chain_resources(c), c[0].workers) for i, c in enumerate(chains)], cpus, gpus)
        plans = [plans_by[str(i)] for i in range(len(chains))]
        by_id = {s.stage_id: s for s in phase}
        first = self.order.index(phase[0].stage_id)
        run = self.cfg.run
        sched = Scheduler([[s.stage_id for s in c] for c in chains], plans, budget, shards, committed,
                          upstream=self.order[first - 1] if first else None, source=infos[0].source,
                          limits=Limits(max_in_flight=run.max_in_flight_per_worker, max_attempts=MAX_SHARD_ATTEMPTS,
                                        max_shard_deaths=run.max_shard_deaths))
        ex = RayExecutor([[self.spec(by_id[s.stage_id]) for s in c] for c in chains], plans, specs,
                         source_chain=0 if infos[0].source else None,
                         park_chain=len(chains) - 1 if park else None)
        actions = sched.start()
        try:
            while True:
                self._apply(actions, ex, failures, prog)
                if not sched.busy():
                    break
                due = sched.next_due()
                timeout = 0.5 if due is None else max(0.0, min(0.5, due - time.monotonic()))
                for ev in ex.wait(timeout):
                    self._event(ev, sched, prog)
                actions = sched.decide(time.monotonic())
                prog.update()
        finally:
            ex.close()
        return ex.parked

    def _apply(self, actions: list[Any], ex: RayExecutor, failures: dict[tuple[str, str], str],
               prog: Progress) -> None:
        """Carry out the scheduler's decisions on the executor; a shard given up on is recorded."""
        for act in actions:
            if isinstance(act, StartActor):
                ex.start_actor(act.chain, act.actor)
            elif isinstance(act, StopActor):
                ex.stop_actor(act.actor)
            elif isinstance(act, Request):
                ex.send(act)
            elif isinstance(act, ShardFailed):
                failures[(act.stage_id, act.shard)] = act.error[:2000]
                prog.stages[act.stage_id].failed += 1
                last = (act.error.splitlines() or [""])[-1]
                self.console.print(styled((f"shard {act.shard} of {act.stage_id} failed:", "red"), f" {last}"))

    def _event(self, ev: Event, sched: Scheduler, prog: Progress) -> None:
        """Hand one executor event to the scheduler; a stage that cannot set up ends the run."""
        req = sched.requests[ev.req]
        found = [] if ev.outcome == Outcome.DONE or req.kind != Kind.RUN else [
            sid for sid in sched.chains[req.chain].stages if is_committed(self.store, sid, req.shard)]
        if ev.outcome == Outcome.DONE:
            for res in ev.results:
                prog.update(res)
            sched.done(ev.req, committed=[r.stage_id for r in ev.results], samples=ev.samples)
        elif ev.outcome == Outcome.DIED:
            try:
                sched.died(ev.req, ev.error, committed=found)
            except SetupFailed as exc:
                raise StageSetupError(str(exc)) from None
        elif ev.outcome == Outcome.SETUP:
            raise StageSetupError(ev.error)
        else:
            sched.failed(ev.req, ev.error, transient=ev.outcome == Outcome.TRANSIENT, now=time.monotonic(),
                         committed=found)

    def _run_global(self, s: ResolvedStage, shards: list[str], committed: dict[str, set[str]],
                    failures: dict[tuple[str, str], str], prog: Progress) -> None:
        sid = s.stage_id
        if len(committed[sid]) == len(shards):
            return
        up = self.order[self.order.index(sid) - 1]
        if len(committed[up]) != len(shards):
            failures[(sid, "*")] = f"blocked: {len(shards) - len(committed[up])} shard(s) of {up!r} are not committed"
            return
        try:  # distributed tasks, retried on any Ray failure; the driver only coordinates
            results = run_global_distributed(self.spec(s), shards, [sh for sh in shards if sh not in committed[sid]])
        except GLOBAL_FAILURES as exc:
            failures[(sid, "*")] = str(exc)[:4000]
            prog.stages[sid].failed = len(shards) - len(committed[sid])
            self.console.print(styled((f"global stage {sid} failed:", "red"),
                                      f" {(str(exc).splitlines() or [''])[-1]}"))
            return
        prog.stages[sid].done = len(committed[sid])
        committed[sid] = set(shards)
        for r in results:
            prog.update(r)

    def _compact(self, phase: list[ResolvedStage], shards: list[str], committed: dict[str, set[str]],
                 warm: WarmWorkers) -> list[Any]:
        """Start the sorted copy of every stage of the phase whose shards are all committed (it runs
        beside the next phase, or on the last phase's parked actors; a stage already compacted returns
        at once)."""
        from manifests.compaction import compact_stages

        ready = [s.stage_id for s in phase if shards and len(committed[s.stage_id]) == len(shards)]
        if not ready:
            return []
        return [(ready, warm.submit(compact_stages, self.store.url, ready, options={"num_cpus": 0.25},
                                    storage_options=self.store.storage_options))]

    def _await_compactions(self, pending: list[Any]) -> None:
        # The compacted copy is derived data: the catalog reads the fragments without it.
        for ids, ref in pending:
            try:
                errors = ray.get(ref)
            except ray.exceptions.RayError as exc:
                errors = dict.fromkeys(ids, str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)
            for sid, note in errors.items():
                if note is not None:
                    self.console.print(styled((f"stage {sid}: manifests not compacted:", "yellow"), f" {note}"))

    def _write_tables(self, shards: list[str], failures: dict[tuple[str, str], str], warm: WarmWorkers) -> bool:
        """The run's one-row-per-sample tables: part of the run's commit, before the export."""
        from manifests.tables import StageColumns
        from pipeline.run_tables import write_run_tables

        cols = [StageColumns(s.stage_id, self.instances[s.stage_id].output_fields(), s.cls.writes_pixels)
                for s in self.stages]
        try:
            write_run_tables(self.store, cols, self.fingerprints, shards, workers=warm)
        except (ray.exceptions.RayError, RuntimeError, OSError, TypeError) as exc:
            failures[("tables", "*")] = str(exc)[:4000]
            self.console.print(styled(("run tables not written:", "red"),
                                      f" {str(exc).splitlines()[-1] if str(exc) else exc}"))
            return False
        return True

    def _run_export(self, failures: dict[tuple[str, str], str]) -> tuple[dict[str, Any] | None, bool]:
        from pipeline.export.task import ExportFailed, run_export

        fp = export_fingerprint(self.cfg, self.fingerprints)
        stages = [{"id": s.stage_id, "name": s.cls.name} for s in self.stages]
        try:
            return run_export(self.store, stages, self.cfg.export, fp, config_hash(self.cfg),
                              rows_per_file=self.cfg.run.shard_size)
        except (ExportFailed, ray.exceptions.RayError) as exc:
            failures[("export", "*")] = str(exc)[:4000]
            self.console.print(styled(("export failed (the previous export is intact):", "red"),
                                      f" {str(exc).splitlines()[-1] if str(exc) else exc}"))
            return None, False

    def _write_history(self, result: RunResult) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.store.write_atomic(json.dumps(asdict(result), indent=2, default=str).encode(), *history_path(stamp))


class ReportWriter:
    """``write_report`` on a thread of its own, started at once; ``wait`` returns its error, if any."""

    def __init__(self, store: RunStorage) -> None:
        self.store = store
        self.error: str | None = None
        self.thread = threading.Thread(target=self._write, name="facefoundry-report", daemon=True)
        self.thread.start()

    def _write(self) -> None:
        try:
            from pipeline.report import write_report

            write_report(self.store)
        except Exception as exc:  # reported by wait(): the run's result does not depend on it
            self.error = str(exc) or type(exc).__name__

    def wait(self) -> str | None:
        self.thread.join()
        return self.error


def run_pipeline(cfg: PipelineConfig, stages: list[ResolvedStage], output: str, *, force: bool = False,
                 new: bool = False, address: str | None = None, num_cpus: int | None = None,
                 storage_options: dict[str, Any] | None = None, show_progress: bool = True,
                 console: Console | None = None) -> RunResult:
    runner = Runner(cfg, stages, output, storage_options=storage_options, console=console,
                    show_progress=show_progress)
    return runner.run(force=force, new=new, address=address, num_cpus=num_cpus)
