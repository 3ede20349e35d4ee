"""Catalog, status, query and lineage at scale: the code on git main ("before") against this tree
("after"), measured side by side on the same synthetic manifests (pyarrow-written, small rows).

1. connect: ``status`` and ``query`` with --fragments committed fragments (two stages);
2. lineage: one ``lineage RUN SAMPLE_ID`` at --samples samples (two stages, one fragment per
   --shard-size samples), before compaction, after it, and with main's code; plus compaction's cost;
3. object store: one export-like query over --s3-fragments fragments on an S3-protocol server
   (moto, 127.0.0.1): files opened and bytes read through fsspec, against the bytes on the store.

Every measurement runs in a fresh child process, so each peak RSS is its own. Prints one JSON line.

    python bench/bench_catalog.py [--fragments 20000] [--samples 5000000] [--shard-size 2000]
                                  [--s3-fragments 70] [--skip-old-lineage] [--dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from manifests.commit import encode_manifest  # noqa: E402
from manifests.layout import RUN_FILE, manifest_path  # noqa: E402
from manifests.schema import COMMON_FIELDS, manifest_schema  # noqa: E402
from manifests.storage import RunStorage  # noqa: E402
from pipeline.engine.rundir import read_plan, write_plan  # noqa: E402

STAGES = ["src", "emb"]
OWN = {"src": [pa.field("variant", pa.int64())],
       "emb": [pa.field("score", pa.float32()), pa.field("vec", pa.list_(pa.float32(), 8))]}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- synthetic runs


def fragment(stage: str, shard: int, n: int) -> pa.Table:
    """One fragment, built column-wise (no Python rows): ids are 16 hex digits of a seeded hash."""
    rng = np.random.default_rng(shard)
    ids = pa.array(np.char.mod("%016x", rng.integers(0, 2**63, n, dtype=np.int64)).astype(object), pa.string())
    name = f"{shard:06d}"

    types_ = {f.name: f.type for f in COMMON_FIELDS}

    def const(name: str, v: Any) -> pa.Array:
        return pa.array([v] * n, types_[name])

    cols: dict[str, Any] = {}
    for f in COMMON_FIELDS:
        cols[f.name] = pa.nulls(n, f.type)
    cols.update(sample_id=ids, key=ids, identity_id=pa.array(np.char.mod("id%d", rng.integers(0, n // 50 + 1, n))
                                                              .astype(object), pa.string()),
                stage=const("stage", stage), stage_name=const("stage_name", stage),
                stage_version=const("stage_version", "1"), shard=const("shard", name),
                status=const("status", "ok"), keep=pa.array(rng.random(n) > 0.2),
                params_hash=const("params_hash", "p"), fingerprint=const("fingerprint", "f"),
                worker=const("worker", "w"), duration_ms=pa.array(rng.random(n)),
                processed_at=pa.array(np.full(n, 1_767_225_600_000 + shard, dtype="datetime64[ms]"))
                .cast(pa.timestamp("ms", tz="UTC")))
    if stage == "src":
        cols["variant"] = pa.array(rng.integers(0, 5, n))
    else:
        cols["score"] = pa.array(rng.random(n, dtype=np.float32))
        cols["vec"] = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 8, dtype=np.float32)), 8)
    return pa.Table.from_pydict(cols, schema=manifest_schema(OWN[stage]))


def build(url: str, shards: int, per_shard: int, storage_options: dict[str, Any] | None = None) -> str:
    """Write the run (kept when --dir already holds it: a rerun measures the same files)."""
    store = RunStorage(url, storage_options)
    probe = str(fragment("emb", shards // 2, per_shard).column("sample_id")[per_shard // 3])
    plan = read_plan(store)
    if plan is not None and len(plan["shards"]) == shards:
        return probe
    for stage in STAGES:
        for shard in range(shards):  # committed as the engine commits (the footer's commit record)
            blob = encode_manifest(fragment(stage, shard, per_shard))
            store.write_atomic(blob, *manifest_path(stage, f"{shard:06d}"))
    run = {"config": {"stages": [{"stage": f"x:{s}", "id": s} for s in STAGES]}}
    store.write_atomic(json.dumps(run).encode(), RUN_FILE)
    write_plan(store, {"fingerprint": "bench", "source": "bench", "shards": [{"name": f"{i:06d}", "spec": {}}
                                                                           for i in range(shards)]})
    return probe


# ---------------------------------------------------------------- main's code, loaded beside ours


def _git_show(path: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "show", f"main:{path}"], check=True, capture_output=True,
                          text=True).stdout


def old_modules() -> types.SimpleNamespace:
    """main's catalog, lineage and status as modules of their own (they import each other)."""
    mods = {}
    for name, path in (("ff_old_catalog", "manifests/catalog.py"), ("ff_old_lineage", "manifests/lineage.py"),
                       ("ff_old_status", "pipeline/status.py")):
        src = _git_show(path).replace("from manifests.catalog import", "from ff_old_catalog import")
        spec = importlib.util.spec_from_loader(name, loader=None)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        exec(compile(src, f"main:{path}", "exec"), mod.__dict__)
        mods[name] = mod
    return types.SimpleNamespace(catalog=mods["ff_old_catalog"], lineage=mods["ff_old_lineage"],
                                 status=mods["ff_old_status"])


def new_modules() -> types.SimpleNamespace:
    from manifests import catalog, lineage
    from pipeline import status

    return types.SimpleNamespace(catalog=catalog, lineage=lineage, status=status)


# ---------------------------------------------------------------- phases (each in its own process)


def phase_connect(run: str, which: str) -> dict[str, Any]:
    m = old_modules() if which == "old" else new_modules()
    store = RunStorage(run)
    sql = "SELECT count(*) AS n FROM emb WHERE keep"
    t0 = time.perf_counter()
    # What `facefoundry query` does before its query runs (main's catalog cannot be told the query).
    kw = {"sql": sql} if which == "new" else {}
    with m.catalog.Catalog(store, STAGES).connect(read_only=True, **kw) as con:
        connect_s = time.perf_counter() - t0
        con.execute("SELECT 1").fetchall()
    t0 = time.perf_counter()
    st = m.status.run_status(store)
    status_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = m.catalog.Catalog(store, STAGES).query(sql).column("n")[0].as_py()
    query_s = time.perf_counter() - t0
    return {"connect_s": connect_s, "status_s": status_s, "query_s": query_s, "rows": n,
            "shards": [s["shards_committed"] for s in st["stages"]], "peak_rss_mb": _rss_mb()}


def phase_lineage(run: str, which: str, sample_id: str) -> dict[str, Any]:
    m = old_modules() if which == "old" else new_modules()
    store = RunStorage(run)
    times = []
    rows: list[dict[str, Any]] = []
    for _ in range(3 if which == "new" else 1):
        t0 = time.perf_counter()
        rows = m.lineage.trace(store, STAGES, sample_id)
        times.append(time.perf_counter() - t0)
    return {"lineage_s": min(times), "first_s": times[0], "stages": [r["stage"] for r in rows],
            "peak_rss_mb": _rss_mb()}


def phase_compact(run: str) -> dict[str, Any]:
    from manifests.compaction import compact_stage

    store = RunStorage(run)
    t0 = time.perf_counter()
    files = 0
    for sid in STAGES:
        pointer = compact_stage(store, sid)
        files += len(pointer["files"]) if pointer else 0
    return {"compact_s": time.perf_counter() - t0, "files": files, "peak_rss_mb": _rss_mb()}


def phase_s3(fragments: int) -> dict[str, Any]:
    """Files opened and bytes read through fsspec for one query, main's catalog against ours."""
    import fsspec.spec

    from tests.fixtures.s3_server import s3_server

    with s3_server() as opts:
        bucket = opts.pop("bucket")
        url = f"s3://{bucket}/run"
        build(url, max(fragments // 2, 1), 4000, opts)
        store = RunStorage(url, opts)
        stored = sum(e["size"] for sid in STAGES for e in store.fs.ls(store.path("manifests", sid), detail=True))
        counts = {"opens": 0, "bytes": 0}
        real_open = store.fs.open
        real_read = fsspec.spec.AbstractBufferedFile._fetch_range

        def counting_open(path: str, mode: str = "rb", **kw: Any) -> Any:
            counts["opens"] += 1
            return real_open(path, mode, **kw)

        def counting_fetch(self: Any, start: int, end: int) -> bytes:
            data = real_read(self, start, end)
            counts["bytes"] += len(data)
            return data

        store.fs.open = counting_open  # type: ignore[method-assign]
        cls = type(real_open(store.path(RUN_FILE), "rb"))
        cls._fetch_range = counting_fetch  # type: ignore[method-assign]
        sql = ("SELECT sample_id, key, identity_id, src.output_shard, emb.score FROM samples "
               "WHERE emb.keep AND src.keep")
        out: dict[str, Any] = {"fragments": 2 * max(fragments // 2, 1), "stored_mib": stored / 2**20}
        for which in ("old", "new"):
            m = old_modules() if which == "old" else new_modules()
            counts.update(opens=0, bytes=0)
            t0 = time.perf_counter()
            rows = m.catalog.Catalog(store, STAGES).query(sql).num_rows
            out[which] = {"seconds": time.perf_counter() - t0, "opens": counts["opens"],
                          "read_mib": counts["bytes"] / 2**20, "read_x": counts["bytes"] / stored, "rows": rows}
        cls._fetch_range = real_read  # type: ignore[method-assign]
        return out


def child(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fragments", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=5_000_000)
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--s3-fragments", type=int, default=70)
    ap.add_argument("--skip-old-lineage", action="store_true")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--which", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sample", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        res = {"connect": lambda: phase_connect(a.run, a.which),
               "lineage": lambda: phase_lineage(a.run, a.which, a.sample),
               "compact": lambda: phase_compact(a.run),
               "s3": lambda: phase_s3(a.s3_fragments)}[a.phase]()
        print(json.dumps(res))
        return
    root = Path(a.dir or tempfile.mkdtemp(prefix="ff-bench-catalog-"))
    out: dict[str, Any] = {"bench": "catalog"}
    # 1. connect with many fragments (two stages, fragments / 2 shards of 5 rows)
    frags = str(root / "fragments")
    t0 = time.perf_counter()
    build(frags, a.fragments // 2, 5)
    out["connect"] = {"fragments": a.fragments, "build_s": time.perf_counter() - t0,
                      "before": child(["--phase", "connect", "--run", frags, "--which", "old"]),
                      "after": child(["--phase", "connect", "--run", frags, "--which", "new"])}
    # ... and once the runner has compacted the two stages (what a finished stage looks like)
    out["connect"]["compaction"] = child(["--phase", "compact", "--run", frags])
    out["connect"]["after_compacted"] = child(["--phase", "connect", "--run", frags, "--which", "new"])
    # 2. lineage at --samples samples
    big = str(root / "samples")
    shards = max(a.samples // a.shard_size, 1)
    t0 = time.perf_counter()
    sid = build(big, shards, a.shard_size)
    lin: dict[str, Any] = {"samples": shards * a.shard_size, "fragments": 2 * shards,
                           "build_s": time.perf_counter() - t0}
    lin["after_uncompacted"] = child(["--phase", "lineage", "--run", big, "--which", "new", "--sample", sid])
    if not a.skip_old_lineage:
        lin["before"] = child(["--phase", "lineage", "--run", big, "--which", "old", "--sample", sid])
    lin["compaction"] = child(["--phase", "compact", "--run", big])
    lin["after"] = child(["--phase", "lineage", "--run", big, "--which", "new", "--sample", sid])
    after_connect = child(["--phase", "connect", "--run", big, "--which", "new"])
    lin["after_status_s"], lin["after_query_s"] = after_connect.get("status_s"), after_connect.get("query_s")
    out["lineage"] = lin
    # 3. an object store
    if a.s3_fragments:
        out["s3"] = child(["--phase", "s3", "--s3-fragments", str(a.s3_fragments)])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
