"""The documentation site builds with warnings as errors, its reference names every stage and every param
the code has, its benchmarks page shows what bench/ wrote, and the folder-curation tutorial's commands
run as written on a small folder."""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.reference import model_fields
from stages.registry import BUILTIN_STAGES, resolve_stage
from tests.fixtures import REPO, png_bytes
from tests.pipeline.test_examples import markdown_commands


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _sections(page: str) -> dict[str, str]:
    """The text of each h2 section of a built page, by its anchor id."""
    parts = re.split(r'<h2 id="([^"]+)"', page)
    return {parts[i]: html.unescape(parts[i + 1]) for i in range(1, len(parts) - 1, 2)}


def test_the_reference_names_every_stage_and_every_param_with_its_default(site: Path) -> None:
    sections = _sections((site / "reference" / "stages" / "index.html").read_text())
    for name in BUILTIN_STAGES:
        assert name in sections, f"no section for stage {name}"
        for field in model_fields(resolve_stage(name).params_model):
            row = re.search(rf"<td><code>{re.escape(field.path)}</code></td>(.*?)</tr>", sections[name], re.S)
            assert row, f"{name}: param {field.path} missing from the reference"
            assert html.escape(field.default, quote=False) in html.escape(row.group(1), quote=False) or \
                field.default in row.group(1)


def test_the_config_and_command_references_cover_every_key_and_command(site: Path) -> None:
    from typer.main import get_command

    from pipeline.config import PipelineConfig

    config = html.unescape((site / "reference" / "config" / "index.html").read_text())
    for field in model_fields(PipelineConfig):
        assert f"<code>{field.path}</code>" in config, field.path
    commands = (site / "reference" / "commands" / "index.html").read_text()
    root = get_command(app)
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", {name: cmd})
        for sub in subs:
            anchor = name if sub == name else f"{name}-{sub}"
            assert f'id="{anchor}"' in commands, anchor


def test_the_benchmarks_page_shows_what_bench_wrote(site: Path) -> None:
    results = json.loads((REPO / "bench" / "results.json").read_text())["benchmarks"]
    page = html.unescape((site / "benchmarks" / "index.html").read_text())
    assert results
    for script, run in results.items():
        section = _sections(page)[script.replace(".", "")]
        for record in run["records"]:
            for value in record.values():
                assert str(value) in section or json.dumps(value) in section, (script, value)


@pytest.mark.slow
def test_the_curation_tutorial_runs_as_written(tmp_path: Path, ray_session: object) -> None:
    """Its run command through load_config and the runner (the test's Ray), then its status and query lines
    through the CLI on that run."""
    from facekit.renderer.render import render_sample
    from pipeline.config import load_config
    from pipeline.engine.runner import Runner
    from tests.pipeline.test_examples import parse

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        vec = rng.standard_normal(512).astype(np.float32)
        vec /= np.linalg.norm(vec)
        for j in range(3):
            rgb, _ = render_sample(vec, vec, seed=10 * i + j, size=192, perturbation_sigma=0.3, max_yaw=10)
            (photos / f"p{i}_{j}.png").write_bytes(png_bytes(rgb))
    (photos / "empty.jpg").write_bytes(b"")
    commands = markdown_commands(REPO / "docs" / "tutorials" / "curate-folder.md")
    run_dir = tmp_path / "curated"
    runs = [c for c in commands if c.startswith("facefoundry run ")]
    assert runs
    for command in runs:
        argv = [a.replace("/data/photos", str(photos)) for a in shlex.split(command)]
        _, params = parse(argv[1:])
        overrides = [*params["set_"], "run.shard_size=16", "export.min_images_per_identity=1"]
        cfg, stages = load_config(REPO / params["config"], overrides)
        assert Runner(cfg, stages, str(run_dir), show_progress=False).run().complete, command
    ran = 0
    for command in commands:
        argv = shlex.split(command)
        if argv[1] in {"status", "query"}:
            args = [str(run_dir) if a == "runs/curated" else a for a in argv[1:]]
            res = CliRunner().invoke(app, args)
            assert res.exit_code == 0, f"`{command}` -> {res.exit_code}\n{res.stdout}\n{res.stderr}"
            ran += 1
    assert ran >= 3
