"""The run directory: frozen config, stage fingerprints, the shard plan, the lock, and what is done.

A stage's fingerprint hashes everything that defines its outputs: its class, version and params, and
the fingerprint of the stage before it. On a re-run, stages whose fingerprints match keep their
committed shards; a changed stage with committed shards is refused unless ``--force`` (recompute it
and everything after it) or ``--new`` (start over). The export has its own fingerprint, so changing
an export threshold re-runs only the export.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import yaml

from facekit.userconfig import ConfigError, load_yaml
from manifests.commit import BadFragment, scan_fragments
from manifests.layout import LEGACY_PLAN_FILE, PLAN_FILE, RUN_FILE, RUN_OUTPUTS
from manifests.storage import TMP_PREFIX, RunStorage
from pipeline.config import PipelineConfig, ResolvedStage, config_hash
from pipeline.engine.runlock import RunLockedError as RunLockedError  # the lock lives in runlock.py
from pipeline.engine.runlock import run_lock as run_lock
from stages.base import stable_hash


class RunConflictError(RuntimeError):
    pass


class NotARunError(ValueError):
    """The folder holds no run this code can read: no run.yaml, or one that is not what a run writes."""


class RunOutputError(RuntimeError):
    """The run directory cannot be made or written (a file, a read-only or pseudo filesystem)."""


def check_output(store: RunStorage) -> None:
    """Make the run directory and write (then remove) a probe file in it, before any work: only the
    filesystem knows whether a path is writable (root ignores permission bits, /proc refuses anyway),
    so it is asked rather than guessed from the path or its mode."""
    if store.fs.exists(store.root) and not store.fs.isdir(store.root):
        raise RunOutputError(f"the run directory {store.url} exists and is not a folder")
    try:
        store.fs.makedirs(store.root, exist_ok=True)
    except OSError as exc:
        raise RunOutputError(f"cannot create the run directory {store.url}: {_reason(exc)}") from None
    probe = store.path(f"{TMP_PREFIX}probe-{uuid.uuid4().hex}")
    try:
        store.fs.pipe_file(probe, b"")
        store.fs.rm(probe)
    except OSError as exc:
        raise RunOutputError(f"cannot write in the run directory {store.url}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror}{where}" if exc.strerror else str(exc) or type(exc).__name__


def stage_fingerprints(cfg: PipelineConfig, stages: list[ResolvedStage]) -> dict[str, str]:
    prev = stable_hash({"seed": cfg.run.seed, "shard_size": cfg.run.shard_size,
                        "identities": cfg.identities.model_dump(mode="json") if cfg.identities else None})
    out: dict[str, str] = {}
    for s in stages:
        # The registered name and version, never the module path: moving a file must not invalidate runs.
        prev = stable_hash([prev, s.cls.name, s.cls.version,
                            s.params.model_dump(mode="json"), s.prune])
        out[s.stage_id] = prev
    return out


def export_fingerprint(cfg: PipelineConfig, fingerprints: dict[str, str]) -> str:
    return stable_hash([fingerprints, cfg.export.model_dump(mode="json")])


@dataclass
class RunState:
    config_hash: str
    fingerprints: dict[str, str]
    config: dict[str, Any]


def read_run_file(store: RunStorage) -> RunState | None:
    """The run's frozen state; None where no run was started. A run.yaml that is not what
    ``write_run_file`` writes (not YAML, empty, a missing key) is refused, naming the file: read as an
    empty run it would make status call a run of no stages complete."""
    if not store.exists(RUN_FILE):
        return None
    name = f"{store.url.rstrip('/')}/{RUN_FILE}"
    try:
        doc = load_yaml(store.read_bytes(RUN_FILE), name)
    except ConfigError as exc:
        detail = " ".join(str(exc).split())
        raise NotARunError(f"{name} is not a facefoundry run file: {detail}") from None
    problem = _run_doc_problem(doc)
    if problem:
        raise NotARunError(f"{name} is not a facefoundry run file: {problem}")
    return RunState(doc.get("config_hash", ""), doc.get("fingerprints", {}), doc["config"])


def _run_doc_problem(doc: Any) -> str | None:
    if doc is None:
        return "it is empty"
    if not isinstance(doc, dict):
        return f"expected a mapping, found {type(doc).__name__}"
    if "config" not in doc:
        return "no 'config' key"
    for key, kind in (("config_hash", str), ("fingerprints", dict), ("config", dict)):  # the first two: resume's
        if key in doc and not isinstance(doc[key], kind):
            return f"{key!r} is {type(doc[key]).__name__}, expected {'a mapping' if kind is dict else 'text'}"
    stages = doc["config"].get("stages")
    if not isinstance(stages, list) or not stages:
        return "'config.stages' is not a non-empty list"
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or not isinstance(st.get("stage"), str):
            return f"'config.stages[{i}]' has no 'stage' name"
    return None


def write_run_file(store: RunStorage, cfg: PipelineConfig, fingerprints: dict[str, str]) -> None:
    doc = {"config_hash": config_hash(cfg), "fingerprints": fingerprints, "config": cfg.model_dump(mode="json")}
    store.write_atomic(yaml.safe_dump(doc, sort_keys=False).encode(), RUN_FILE)


def committed_shards(store: RunStorage, stage_id: str) -> set[str]:
    """Shards whose fragment is verified (manifests/commit.py): one listing per folder plus one footer
    read per fragment, so the resume scan stays cheap at 10,000s of shards. A truncated fragment or
    tar is not committed and gets recomputed."""
    return scan_fragments(store, stage_id).shards


def scan_committed(store: RunStorage, stage_ids: list[str]) -> tuple[dict[str, set[str]], list[BadFragment]]:
    """The resume scan: committed shards per stage, and the fragments that failed verification."""
    committed: dict[str, set[str]] = {}
    bad: list[BadFragment] = []
    for sid in stage_ids:
        scan = scan_fragments(store, sid)
        committed[sid] = scan.shards
        bad.extend(scan.bad)
    return committed, bad


def check_compatible(store: RunStorage, new: dict[str, str], order: list[str]) -> tuple[list[str], str | None]:
    """Which stages must be wiped before this config may run here; the message if that needs --force."""
    old = read_run_file(store)
    if old is None:
        return [], None
    changed = next((sid for sid in order if old.fingerprints.get(sid) not in (None, new[sid])), None)
    if changed is None:
        # Stages added at the end, or removed, do not invalidate anything that stays.
        changed = next((sid for sid in order if sid not in old.fingerprints and committed_shards(store, sid)), None)
    if changed is None:
        return [], None
    after = order[order.index(changed):]
    committed = [sid for sid in after if committed_shards(store, sid)]
    if not committed:
        return after, None
    msg = (
        f"{store.url} holds a run made with a different config: stage {changed!r} changed "
        f"(fingerprint {old.fingerprints.get(changed, '-')} -> {new[changed]}) and {len(committed)} stage(s) from it "
        f"on have committed shards ({', '.join(committed)}).\n"
        f"  --force  recompute {changed!r} and the stages after it, keeping the stages before it\n"
        f"  --new    delete this run and start over\n"
        f"  or choose another --output"
    )
    return after, msg


def wipe_stages(store: RunStorage, stage_ids: list[str]) -> None:
    for sid in stage_ids:
        store.remove("manifests", sid, recursive=True)
        store.remove("shards", sid, recursive=True)
    store.remove("export", recursive=True)


def wipe_run(store: RunStorage) -> None:
    for part in RUN_OUTPUTS:
        store.remove(part, recursive=True)


PLAN_KEYS = ("fingerprint", "source", "refill")  # the plan's own keys, beside its shards


def read_plan(store: RunStorage) -> dict[str, Any] | None:
    """The frozen shard plan: ``{"fingerprint", "source", "shards": [{"name", "spec"}]}`` (and
    ``"refill"``, the settings digest, once refill rounds are in it).

    Stored as Parquet (one row per shard, the spec as a JSON string: zstd keeps a folder ingest's
    millions of paths small); a plan.json of an older run is still read."""
    if store.exists(PLAN_FILE):
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(store.read_bytes(PLAN_FILE)))
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        names = table.column("name").to_pylist()
        specs = table.column("spec").to_pylist()
        plan: dict[str, Any] = {"fingerprint": meta.get("fingerprint"), "source": meta.get("source")}
        plan.update({k: meta[k] for k in PLAN_KEYS[2:] if k in meta})
        plan["shards"] = [{"name": n, "spec": json.loads(sp)} for n, sp in zip(names, specs, strict=True)]
        return plan
    if store.exists(LEGACY_PLAN_FILE):
        return json.loads(store.read_bytes(LEGACY_PLAN_FILE))
    return None


def plan_size(store: RunStorage) -> int:
    """How many shards the plan has, from the Parquet footer alone: ``status`` needs the count, and
    decoding every shard's spec (millions of paths for a folder ingest) cost it a quarter second at
    10,000 shards."""
    if store.exists(PLAN_FILE):
        import pyarrow.parquet as pq

        with store.fs.open(store.path(PLAN_FILE), "rb") as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    plan = read_plan(store)
    return len(plan["shards"]) if plan else 0


def write_plan(store: RunStorage, plan: dict[str, Any]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = plan["shards"]
    table = pa.table({"name": pa.array([s["name"] for s in shards], pa.string()),
                      "spec": pa.array([json.dumps(s["spec"], sort_keys=True) for s in shards], pa.string())})
    table = table.replace_schema_metadata({"fingerprint": str(plan.get("fingerprint", "")),
                                           "source": str(plan.get("source", "")),
                                           **{k: str(plan[k]) for k in PLAN_KEYS[2:] if plan.get(k) is not None}})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.write_atomic(buf.getvalue(), PLAN_FILE)
    store.remove(LEGACY_PLAN_FILE)
