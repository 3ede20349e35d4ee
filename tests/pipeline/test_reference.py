"""The config's JSON Schema is what editors validate configs with: it accepts every example config,
refuses a misspelled key at the top level and inside a stage's params, and the committed copy the
examples point at is the one `facefoundry schema` writes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.reference import SCHEMA_PATH, config_schema, model_fields, schema_text
from tests.fixtures import EXAMPLES, REPO

PIPELINE_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if "stages" in yaml.safe_load(p.read_text()))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: jsonschema.Draft202012Validator, doc: dict[str, Any]) -> list[str]:
    return [e.message for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("path", PIPELINE_EXAMPLES, ids=[p.name for p in PIPELINE_EXAMPLES])
def test_the_schema_accepts_every_example_config(validator: jsonschema.Draft202012Validator, path: Path) -> None:
    assert _errors(validator, yaml.safe_load(path.read_text())) == []


def test_the_schema_refuses_a_misspelled_key_at_the_top_and_in_a_stage_s_params(
        validator: jsonschema.Draft202012Validator) -> None:
    doc = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    top = copy.deepcopy(doc)
    top["stage"] = top.pop("stages")
    assert any("'stage' was unexpected" in e for e in _errors(validator, top))
    inner = copy.deepcopy(doc)
    detect = next(s for s in inner["stages"] if s["stage"] == "detect")
    detect["params"]["polcy"] = detect["params"].pop("policy")
    assert _errors(validator, inner)
    detect["params"]["policy"] = detect["params"].pop("polcy")
    assert _errors(validator, inner) == []


def test_the_schema_completes_a_stage_s_params_from_its_own_model(validator: jsonschema.Draft202012Validator) -> None:
    from stages.mappers.detect import DetectParams

    variants = config_schema()["$defs"]["StageConfig"]["oneOf"]
    detect = next(v for v in variants if v["properties"]["stage"].get("const") == "detect")
    ref = detect["properties"]["params"]["$ref"].rsplit("/", 1)[-1]
    assert set(config_schema()["$defs"][ref]["properties"]) == set(DetectParams.model_fields)


def test_the_committed_schema_is_the_one_the_command_writes(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    res = CliRunner().invoke(app, ["schema", "--out", str(out)])
    assert res.exit_code == 0
    assert out.read_text() == schema_text()
    assert (REPO / SCHEMA_PATH).read_text() == schema_text(), (
        f"{SCHEMA_PATH} is stale: run `facefoundry schema --out {SCHEMA_PATH}`")
    assert json.loads(out.read_text())["$defs"]


@pytest.mark.parametrize("path", PIPELINE_EXAMPLES, ids=[p.name for p in PIPELINE_EXAMPLES])
def test_each_example_config_points_editors_at_the_committed_schema(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, f"{path.name} does not start with the schema comment"
    assert (path.parent / match.group(1)).resolve() == (REPO / SCHEMA_PATH).resolve()


def test_every_param_of_every_stage_and_every_config_key_has_a_description() -> None:
    from pipeline.config import PipelineConfig
    from stages.registry import BUILTIN_STAGES, resolve_stage

    missing = [f"{n}.params.{f.path}" for n in BUILTIN_STAGES
               for f in model_fields(resolve_stage(n).params_model) if not f.description]
    missing += [f"config.{f.path}" for f in model_fields(PipelineConfig) if not f.description]
    assert missing == []
