"""Peak memory of ``facefoundry query`` shown as a table with a limit, at several result sizes: a
streamed query reads only the rows it shows, so the peak is flat in the size of what it selects.

Each size runs the real CLI in a child of a fresh Python process, whose ``RUSAGE_CHILDREN`` peak is
that one command's. Prints one JSON line: {"sizes": [...], "peak_rss_mb": [...], "limit": N}.

    python bench/bench_query.py RUN_DIR [--sizes 1000000 10000000 100000000] [--limit 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000, 100_000_000])
    ap.add_argument("--limit", type=int, default=3)
    args = ap.parse_args()
    peaks = [round(peak_rss_mb(args.run_dir, f"SELECT * FROM range({n})", args.limit), 1) for n in args.sizes]
    print(json.dumps({"sizes": args.sizes, "peak_rss_mb": peaks, "limit": args.limit}))


if __name__ == "__main__":
    main()
