"""Peak memory of ``facefoundry query`` shown as a table with a limit, at several result sizes: a
streamed query reads only the rows it shows, so the peak is flat in the size of what it selects.

Each size runs the real CLI in a child of a fresh Python process, whose ``RUSAGE_CHILDREN`` peak is
that one command's. Prints one JSON line: {"sizes": [...], "peak_rss_mb": [...], "limit": N}.

    python bench/bench_query.py [RUN_DIR] [--sizes 1000000 10000000 100000000] [--limit 3]

Without RUN_DIR the queries run against a run directory that holds only the quickstart's frozen
config: ``range(N)`` reads no manifest, so what is measured is the query path itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs one command and prints its peak resident memory in KiB (Linux's ru_maxrss unit).
_MEASURE = ("import resource, subprocess, sys; "
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mb(run_dir: str, sql: str, limit: int) -> float:
    """Peak resident memory (MB) of one ``query RUN SQL --limit N`` in the table format."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pipeline.cli", "query", run_dir, sql, "--limit", str(limit)]
    res = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env,
                         cwd=REPO, check=True)
    rc, kib = res.stdout.split()
    if rc != "0":
        raise RuntimeError(f"query exited {rc}: {res.stderr.strip()}")
    return int(kib) / 1024


def empty_run() -> str:
    """A run directory with the quickstart's run.yaml and nothing computed."""
    sys.path.insert(0, str(REPO))
    from manifests.storage import RunStorage
    from pipeline.config import load_config
    from pipeline.engine.rundir import write_run_file

    folder = tempfile.mkdtemp(prefix="ffbench-query-")
    cfg, _ = load_config(REPO / "examples" / "quickstart.yaml")
    write_run_file(RunStorage(folder), cfg, {})
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", help="a run directory (default: an empty one made here)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--limit", type=int, default=3)
    args = ap.parse_args()
    run_dir = args.run_dir or empty_run()
    peaks = [round(peak_rss_mb(run_dir, f"SELECT * FROM range({n})", args.limit), 1) for n in args.sizes]
    print(json.dumps({"figure": "query with a limit: peak memory by result size", "sizes": args.sizes,
                      "peak_rss_mb": peaks, "limit": args.limit, "target": "flat in the size"}))


if __name__ == "__main__":
    main()
