"""Run every benchmark in bench/ at its default (2-core sized) settings, one after another, and write what
they report to bench/results.json: the documentation's benchmarks page is rendered from that file.

A benchmark reports a figure by printing a JSON object on a line of its own; every such line is kept,
in order, under the script's name, with the machine it ran on and the script's exit status.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"


def json_records(lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        text = line.strip()
        if text.startswith("{") and text.endswith("}"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                records.append(value)
    return records


def run_one(script: Path) -> dict[str, Any]:
    print(f"\n===== {script.name}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script)], cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    code = proc.wait()
    return {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1), "records": json_records(lines)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="script names (bench_engine.py ...); the others keep their results")
    args = ap.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.name in set(args.only)]
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"benchmarks": {}}
    benchmarks: dict[str, Any] = dict(previous.get("benchmarks", {})) if args.only else {}
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "processor": platform.processor() or platform.machine()}
    for script in scripts:
        result = run_one(script)
        result["machine"] = machine
        result["date"] = datetime.date.today().isoformat()
        benchmarks[script.name] = result
        RESULTS.write_text(json.dumps({"benchmarks": dict(sorted(benchmarks.items()))}, indent=1) + "\n")
    return sum(benchmarks[s.name]["exit_code"] != 0 for s in scripts)


if __name__ == "__main__":
    raise SystemExit(main())
