"""The reference users read, rendered from the code that the runs use: the stage registry, each stage's
params model and declarations, the typer app and the config models.

`facefoundry stages`, `facefoundry schema` and the documentation site's reference pages all render
from this module, so the three cannot disagree with each other or with what a config is validated
against.
"""

from __future__ import annotations

import difflib
import enum
import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticUndefined

from stages.base import Stage
from stages.registry import BUILTIN_STAGES, known_stage_names, resolve_stage

SCHEMA_ID = "https://facefoundry.dev/schema/pipeline.schema.json"
# Where the committed schema lies (the examples' `yaml-language-server` comments point at it).
SCHEMA_PATH = "docs/schema/pipeline.schema.json"
PLUGIN_STAGE_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


@dataclass(frozen=True)
class FieldDoc:
    """One key of a params or config model; nested models give dotted paths (``server.base_url``),
    items of a list ``pairs[].name`` and values of a mapping ``thresholds.*.min``."""

    path: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class StageDoc:
    name: str
    kind: str
    version: str
    summary: str
    params: tuple[FieldDoc, ...]
    reads: tuple[str, ...]
    optional_reads: tuple[str, ...]
    columns: tuple[str, ...]
    columns_depend_on_params: bool
    resources: str
    batch_size: int
    writes_pixels: bool


class UnknownStageNameError(LookupError):
    """A stage name that is not registered; the message names the close matches."""


# ---------------------------------------------------------------------------------------------- models


def type_text(tp: Any) -> str:
    """A type as a config author reads it: ``"a" or "b"`` for literals, ``float or null`` for optionals."""
    if tp is type(None):
        return "null"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return type_text(args[0])
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else type_text(a) for a in args)
        return f"{name}[{inner}]" if inner else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True) if info.default is PydanticUndefined else info.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, default=str)


def _nested_models(tp: Any, suffix: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    """Models reachable from an annotation, with how their keys are addressed below the field."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp, suffix
        return
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, tuple, set, frozenset):
        for a in args:
            yield from _nested_models(a, suffix + "[]")
    elif origin is dict and len(args) == 2:
        yield from _nested_models(args[1], suffix + ".*")
    elif origin in (Union, types.UnionType, Annotated):
        for a in args:
            yield from _nested_models(a, suffix)


def model_fields(model: type[BaseModel], prefix: str = "") -> list[FieldDoc]:
    """Every key of ``model`` and of the models nested in it, in declaration order."""
    docs: list[FieldDoc] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        docs.append(FieldDoc(path, type_text(info.annotation), default_text(info), info.description or ""))
        for nested, suffix in _nested_models(info.annotation):
            docs.extend(model_fields(nested, f"{path}{suffix}."))
    return docs


# ---------------------------------------------------------------------------------------------- stages


def _summary(cls: type[Stage]) -> str:  # type: ignore[type-arg]
    """The stage's one-line doc: its class docstring, else its module's, without a leading ``name:``."""
    doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    head, sep, rest = paragraph.partition(": ")
    if sep and len(head.split()) <= 3:
        paragraph = rest[:1].upper() + rest[1:]
    sentence = paragraph.split(". ")[0].rstrip(".")
    return sentence + "." if sentence else ""


def stage_doc(name: str) -> StageDoc:
    if name not in BUILTIN_STAGES:
        close = difflib.get_close_matches(name, known_stage_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `facefoundry stages` lists them"
        raise UnknownStageNameError(f"unknown stage {name!r}{hint}")
    cls = resolve_stage(name)
    res = cls.resources
    return StageDoc(
        name=name,
        kind=str(cls.kind),
        version=cls.version,
        summary=_summary(cls),
        params=tuple(model_fields(cls.params_model)),
        reads=tuple(cls.reads),
        optional_reads=tuple(cls.optional_reads),
        columns=tuple(f"{f.name}: {f.type}" for f in cls.columns),
        columns_depend_on_params="output_fields" in cls.__dict__,
        resources=f"cpus={res.cpus:g}, gpus={res.gpus:g}, memory_gb={res.memory_gb:g}",
        batch_size=cls.batch_size,
        writes_pixels=cls.writes_pixels,
    )


def stage_docs() -> list[StageDoc]:
    return [stage_doc(n) for n in BUILTIN_STAGES]


def stage_lines() -> list[str]:
    """``facefoundry stages``: one line per registered stage."""
    docs = stage_docs()
    width = max(len(d.name) for d in docs)
    return [f"{d.name.ljust(width)}  {d.kind.ljust(6)}  {d.summary}" for d in docs]


def stage_text(doc: StageDoc) -> str:
    """``facefoundry stages NAME``: what the reference page says about one stage, as plain text."""
    lines = [f"{doc.name} ({doc.kind}, version {doc.version}): {doc.summary}", "", "params:"]
    if not doc.params:
        lines.append("  (none)")
    for p in doc.params:
        lines.append(f"  {p.path}: {p.type} = {p.default}")
        if p.description:
            lines.append(f"      {p.description}")
    lines += ["", f"reads: {', '.join(doc.reads) or '(nothing beyond the image and ids)'}"]
    if doc.optional_reads:
        lines.append(f"reads when present: {', '.join(doc.optional_reads)}")
    lines.append("columns:" + (" (depend on the params; the defaults' shown)" if doc.columns_depend_on_params else ""))
    lines += [f"  {c}" for c in doc.columns] or ["  (none)"]
    lines += [f"resources: {doc.resources}; batch_size={doc.batch_size}"
              + ("; writes pixels (its own shard tars)" if doc.writes_pixels else "")]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fields_table(fields: list[FieldDoc] | tuple[FieldDoc, ...]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    rows += [f"| `{p.path}` | `{_cell(p.type)}` | `{_cell(p.default)}` | {_cell(p.description)} |" for p in fields]
    return rows


def stages_markdown() -> str:
    out = ["# Stages", "",
           "Every registered stage: what it does, its params (a config's `params:` block), the columns it reads "
           "from earlier stages and the ones it writes, and what one worker of it declares. "
           "`facefoundry stages` and `facefoundry stages NAME` print the same.", ""]
    out += ["| stage | kind | what it does |", "|---|---|---|"]
    out += [f"| [`{d.name}`](#{d.name}) | {d.kind} | {_cell(d.summary)} |" for d in stage_docs()]
    for d in stage_docs():
        out += ["", f"## {d.name}", "", d.summary, "",
                f"Kind **{d.kind}**, version `{d.version}`; resources `{d.resources}`, batch size {d.batch_size}"
                + ("; writes pixels (its own shard tars)." if d.writes_pixels else "."), ""]
        out += ["**Params**", ""] + (_fields_table(d.params) if d.params else ["None."])
        out += ["", "**Reads** " + (", ".join(f"`{c}`" for c in d.reads) or "nothing beyond the image and ids")
                + (" (and, when present, " + ", ".join(f"`{c}`" for c in d.optional_reads) + ")"
                   if d.optional_reads else "") + "."]
        cols = ", ".join(f"`{_cell(c)}`" for c in d.columns) or "none of its own"
        note = " The exact columns depend on the params; the defaults' are shown." if d.columns_depend_on_params else ""
        out += ["", f"**Columns written** {cols}.{note}"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- config


def config_models() -> list[tuple[str, type[BaseModel]]]:
    from pipeline.config import PipelineConfig

    return [("pipeline config", PipelineConfig)]


def config_markdown() -> str:
    from pipeline.config import PipelineConfig

    out = ["# Config file", "",
           "The keys of a pipeline config (`facefoundry run CONFIG`), with their types and defaults. "
           "Unknown keys are refused before any work starts. A stage block's `params` are the stage's own: "
           "see [Stages](stages.md). `--set path.to.key=value` overrides any key; `stages.<id>.…` names a "
           "stage by its id. `facefoundry schema` writes the same as a JSON Schema that editors validate "
           "and complete configs with.", ""]
    out += _fields_table(model_fields(PipelineConfig))
    return "\n".join(out) + "\n"


def config_schema() -> dict[str, Any]:
    """The pipeline config's JSON Schema, each stage block's ``params`` checked against its stage's model
    (``oneOf`` on the ``stage`` key), so an editor completes and validates params as it does the rest."""
    from pipeline.config import PipelineConfig, StageConfig

    params_models = [(n, resolve_stage(n).params_model) for n in BUILTIN_STAGES]
    models: list[type[BaseModel]] = [PipelineConfig, *(m for _, m in params_models)]
    keyed: list[tuple[type[BaseModel], Literal["validation"]]] = [(m, "validation") for m in models]
    refs, top = models_json_schema(keyed, ref_template="#/$defs/{model}")
    defs: dict[str, Any] = top.get("$defs", {})
    stage_def = defs[StageConfig.__name__]
    variants: list[dict[str, Any]] = []
    for name, model in params_models:
        variant = json.loads(json.dumps(stage_def))
        variant["title"] = f"stage: {name}"
        variant["properties"]["stage"] = {"const": name, "description": _summary(resolve_stage(name))}
        variant["properties"]["params"] = refs[(model, "validation")]
        variant["required"] = ["stage"]
        variants.append(variant)
    plugin = json.loads(json.dumps(stage_def))
    plugin["title"] = "stage: module.path:ClassName"
    plugin["properties"]["stage"] = {"type": "string", "pattern": PLUGIN_STAGE_PATTERN,
                                     "description": "a stage class outside the registry"}
    plugin["required"] = ["stage"]
    variants.append(plugin)
    defs[StageConfig.__name__] = {"title": "StageConfig", "oneOf": variants}
    root = {k: v for k, v in defs.pop(PipelineConfig.__name__).items()}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **root, "$defs": defs}


def schema_text() -> str:
    return json.dumps(config_schema(), indent=1, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------- CLI


def _walk_commands(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    subs = getattr(command, "commands", None)
    if subs is None:
        yield path, command
        return
    for name in sorted(subs):
        yield from _walk_commands(subs[name], [*path, name])


def _param_type(param: Any) -> str:
    """A command parameter's type: typer keeps the annotation; plain click parameters name their type."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        return str(getattr(getattr(param, "type", None), "name", ""))
    annotation = descriptor.annotation
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(str(m.value) for m in annotation)
    return type_text(annotation)


def cli_markdown(app: Any) -> str:
    """The command reference of ``app`` (the typer app of pipeline.cli, passed in: the CLI imports this
    module for its own ``stages`` and ``schema`` commands)."""
    from typer.main import get_command

    root = get_command(app)
    out = ["# Commands", "",
           "Every `facefoundry` command and its arguments and options, from the command line's own "
           "definitions (`facefoundry COMMAND -h` prints the same). A user error exits with code 2 and one "
           "line `error: ...`; a run that did not complete exits 1.", ""]
    for path, cmd in _walk_commands(root, []):
        name = " ".join(path)
        usage = " ".join(["facefoundry", *path, *((p.name or "").upper() for p in cmd.params
                                                   if p.param_type_name == "argument")])
        out += [f"## {name}", "", " ".join((cmd.help or "").split()), "", "```text", usage + " [OPTIONS]", "```", "",
                "| argument / option | type | default | description |", "|---|---|---|---|"]
        for p in cmd.params:
            if p.param_type_name == "argument":
                label = (p.name or "").upper()
            else:
                label = ", ".join([*p.opts, *p.secondary_opts])
            if label in ("-h, --help", "--help, -h"):
                continue
            default = "required" if p.required else ("" if p.default is None else json.dumps(p.default, default=str))
            if getattr(p, "is_flag", False) and not p.secondary_opts:
                default = "off" if not p.default else "on"
            helptext = getattr(p, "help", "") or ""
            out.append(f"| `{_cell(label)}` | {_cell(_param_type(p))} | {_cell(default)} | {_cell(helptext)} |")
        out.append("")
    return "\n".join(out)
