"""Every command shown to users, in the code blocks of README.md and of the documentation (docs/) and
in the examples' headers, parses against the real CLI, and what it names (configs, --set overrides,
make targets, infra/ files) exists and validates. The commands on the quickstart's run directory
really run, on a small quickstart run, so their SQL and options are checked too. A renamed option or
config key cannot leave a stale example.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from pipeline.cli import app
from tests.fixtures import EXAMPLES, REPO

try:  # typer 0.2x ships its own copy of click; older ones use click itself
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

CLI = get_command(app)


def _join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in lines:
        text = line.strip()
        if pending:
            text = pending + " " + text
            pending = ""
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        out.append(text)
    return out


def markdown_commands(path: Path) -> list[str]:
    text = path.read_text()
    blocks = re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S)
    lines = [ln for b in blocks for ln in _join_continuations(b.splitlines())]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def readme_commands() -> list[str]:
    return markdown_commands(REPO / "README.md")


def docs_commands() -> list[tuple[str, str]]:
    return [(str(p.relative_to(REPO)), c) for p in sorted((REPO / "docs").rglob("*.md")) for c in markdown_commands(p)]


def example_commands() -> list[tuple[str, str]]:
    """Commands in each example's leading comment block: lines that start with a program name."""
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line[1:])
        for cmd in _join_continuations(header):
            if re.match(r"(facefoundry|python -m|make) ", cmd):
                found.append((path.name, cmd))
    return found


ALL = [("README.md", c) for c in readme_commands()] + docs_commands() + example_commands()
# Programs of the cluster tutorial that cannot run here: the files they name must exist.
EXTERNAL = {"kubectl", "docker"}


def test_the_extractor_finds_the_commands_users_see() -> None:
    cmds = [shlex.join(shlex.split(c, comments=True)) for _, c in ALL]
    assert "make demo" in cmds and "make test" in cmds
    assert any(c.startswith("facefoundry run examples/arc2face-10k.yaml --output s3://") for c in cmds)
    assert any(c.startswith("facefoundry lineage runs/quickstart") for c in cmds)
    assert any(c.startswith("kubectl apply -f infra/k8s/") for c in cmds)
    assert {f for f, _ in ALL} >= {"README.md", "docs/get-started.md", "docs/tutorials/curate-folder.md",
                                   "docs/tutorials/arc2face-kuberay.md", "docs/tutorials/train-evaluate.md",
                                   "arc2face-10k.yaml", "curate-folder.yaml", "quickstart.yaml",
                                   "quickstart-dataset.yaml", "docs/building-the-dataset.md", "docs/identities.md",
                                   "train-recognition.yaml", "train-enhancement.yaml",
                                   "eval-verification.yaml"}


def parse(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The command path and parameters click parses from ``args``; raises UsageError."""
    ctx = CLI.make_context("facefoundry", list(args))
    path: list[str] = []
    command: Any = CLI
    rest = [*ctx._protected_args, *ctx.args]
    while hasattr(command, "resolve_command"):  # a group: the next word names its subcommand
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        path.append(name)
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    return path, ctx.params


def _check_config(path: list[str], params: dict[str, Any]) -> None:
    sets = list(params.get("set_") or [])
    if path[0] in {"run", "doctor"} and params.get("config") is not None:
        from pipeline.config import load_config

        load_config(REPO / params["config"], sets)
    if path[0] in {"train", "eval"}:
        from pipeline.config import apply_overrides
        from training.config import (
            EnhancementTrainConfig,
            RecognitionTrainConfig,
            VerificationEvalConfig,
            load_train_config,
        )

        model = {"recognition": RecognitionTrainConfig, "enhancement": EnhancementTrainConfig,
                 "verification": VerificationEvalConfig}[path[1]]
        raw = yaml.safe_load((REPO / params["config"]).read_text())
        load_train_config(apply_overrides(raw, sets), model)


@pytest.mark.parametrize(("where", "command"), ALL, ids=[f"{w}: {c[:60]}" for w, c in ALL])
def test_command_parses_and_what_it_names_exists(where: str, command: str, tmp_path: Path) -> None:
    argv = shlex.split(command, comments=True)
    if argv[0] == "make":
        targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
        assert set(argv[1:]) <= targets, f"{where}: make target(s) {argv[1:]} not in the Makefile"
        return
    if argv[:2] == ["python", "-m"]:
        _run_module(argv[2], argv[3:], tmp_path)
        return
    if argv[0] in EXTERNAL:
        named = [a for a in argv[1:] if re.match(r"(infra|examples|docs)/", a)]
        assert named, f"{where}: `{command}` names no file of this repository"
        for a in named:
            assert (REPO / a).is_file(), f"{where}: {a} does not exist"
            if a.endswith(".yaml"):
                assert list(yaml.safe_load_all((REPO / a).read_text()))
        return
    assert argv[0] == "facefoundry", f"{where}: unknown program in {command!r}"
    args = [a.replace("<sample_id>", "0" * 24) for a in argv[1:]]
    try:
        path, params = parse(args)
    except UsageError as exc:
        pytest.fail(f"{where}: `{command}` does not parse: {exc.format_message()}")
    _check_config(path, params)
    if path[0] in {"stages", "schema"}:  # cheap and side-effect free: they run for real
        args = [str(tmp_path / "schema.json") if a.endswith(".schema.json") else a for a in args]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, f"{where}: `{command}` -> {res.exit_code}\n{res.stderr}"


def _run_module(module: str, args: list[str], tmp_path: Path) -> None:
    """The arc2face converter, for real, on a tiny pickled state dict standing in for the release file."""
    assert module == "facekit.backends.arc2face", f"no check written for python -m {module}"
    import torch

    from facekit.backends import arc2face

    folder = tmp_path / "encoder"
    folder.mkdir()
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, folder / "pytorch_model.bin")
    assert arc2face.main([a if not a.startswith("/models/") else str(folder) for a in args]) == 0
    assert list(folder.glob("*.safetensors"))


@pytest.mark.slow
def test_quickstart_run_commands_run_for_real(small_quickstart_run: Path) -> None:
    """README's status / query / lineage / whatif lines, on a real (small) quickstart run."""
    import pyarrow.parquet as pq

    sample = pq.read_table(small_quickstart_run / "export" / "manifest.parquet").column("sample_id")[0].as_py()
    ran = 0
    for where, command in ALL:
        argv = shlex.split(command, comments=True)
        if argv[0] != "facefoundry" or "runs/quickstart" not in argv or argv[1] not in {"status", "query",
                                                                                      "lineage", "whatif"}:
            continue
        args = [str(small_quickstart_run) if a == "runs/quickstart" else a.replace("<sample_id>", sample)
                for a in argv[1:]]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, f"{where}: `{command}` -> {res.exit_code}\n{res.stdout}\n{res.stderr}"
        ran += 1
    assert ran >= 4


def test_inline_set_overrides_in_the_readme_apply_to_the_quickstart_config() -> None:
    from pipeline.config import load_config

    text = (REPO / "README.md").read_text()
    inline = re.findall(r"`--set ([^`]+)`", text)
    assert inline, "README shows no --set example"
    for item in inline:
        if "path.to.key" in item:
            continue
        load_config(EXAMPLES / "quickstart.yaml", [item])


def test_the_dataset_example_asks_for_quotas_splits_and_refill_and_its_columns_exist(tmp_path: Path) -> None:
    """examples/quickstart-dataset.yaml is the recipe the docs build on: it loads, sets each part of the
    dataset it shows, and every column its selection and split name passes the runner's checks."""
    from pipeline.config import load_config
    from pipeline.engine.runner import Runner

    cfg, stages = load_config(EXAMPLES / "quickstart-dataset.yaml")
    ids, splits = cfg.export.identities, cfg.export.splits
    assert (ids.target_images, ids.max_images, cfg.export.min_images) == (8, 8, 4)
    assert (ids.prefer.score, ids.prefer.diversity) == ("quality.sharpness", "labels.pose_bin")
    assert (splits.stratify, splits.lookalikes) == ("labels.pose_bin", "together")
    assert cfg.refill is not None and cfg.refill.max_rounds == 2
    Runner(cfg, stages, str(tmp_path / "run"), show_progress=False)  # raises ConfigError on a missing column
    assert not (tmp_path / "run").exists()
