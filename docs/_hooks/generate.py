"""MkDocs hook: the pages rendered from code and from bench output, generated at build time and never
committed (so they cannot go stale): the stage, config and command reference from pipeline.reference,
and the benchmarks page from bench/results.json, which `make bench` writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def benchmarks_markdown(results_file: Path, scripts: list[str]) -> str:
    data: dict[str, Any] = json.loads(results_file.read_text()) if results_file.exists() else {"benchmarks": {}}
    runs: dict[str, Any] = data.get("benchmarks", {})
    out = ["# Benchmarks", "",
           "`bench/` measures FaceFoundry against the plain way of doing the same job, side by side in one "
           "run; no test asserts a speed. `make bench` runs every script at its default (2-core sized) settings "
           "and writes what each one reports to `bench/results.json`; this page is rendered from that file "
           "(`python bench/run_all.py --only bench_engine.py` refreshes one script's results). Each table is "
           "one JSON record a script printed.", ""]
    for script in scripts:
        out += [f"## {script}", ""]
        run = runs.get(script)
        if run is None:
            out += ["No results in `bench/results.json`: run `make bench`.", ""]
            continue
        m = run.get("machine", {})
        out += [f"Ran {run.get('date', '?')} on {m.get('cpus', '?')} CPUs ({m.get('platform', '?')}, Python "
                f"{m.get('python', '?')}) in {run.get('seconds', '?')} s, exit code {run.get('exit_code', '?')}.", ""]
        records = run.get("records", [])
        if not records:
            out += ["The script printed no JSON record.", ""]
        for rec in records:
            out += ["| figure | value |", "|---|---|"]
            for key, value in rec.items():
                text = json.dumps(value) if isinstance(value, dict | list) else str(value)
                cell = text.replace("|", "\\|")
                out.append(f"| {key} | {cell} |")
            out.append("")
    return "\n".join(out)


def on_files(files: Files, config: Any) -> Files:
    from pipeline.cli import app
    from pipeline.reference import cli_markdown, config_markdown, stages_markdown

    pages = {
        "reference/stages.md": stages_markdown(),
        "reference/config.md": config_markdown(),
        "reference/commands.md": cli_markdown(app),
        "benchmarks.md": benchmarks_markdown(REPO / "bench" / "results.json",
                                             sorted(p.name for p in (REPO / "bench").glob("bench_*.py"))),
    }
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    return files
