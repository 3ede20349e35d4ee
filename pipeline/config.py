"""Config: YAML -> pydantic, `--set` overrides, errors that name the key path, frozen hash.

Everything is validated before any work starts, including each stage's own params model, so a typo
in the last stage fails in a second rather than after an hour of generation.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.export import ExportConfig
from stages.base import Params, Resources, Stage, StageKind, stable_hash
from stages.registry import UnknownStageError, resolve_stage


class ConfigError(ValueError):
    """A config problem, with the key path and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class RunSettings(Strict):
    seed: int = 0
    shard_size: int = Field(64, ge=1, description="samples per shard: the unit of work, commit and resume")
    max_in_flight_per_worker: int = Field(2, ge=1, description="shards queued per actor to keep it busy")
    max_shard_deaths: int = Field(3, ge=1, description="worker deaths one shard may cause before its samples are "
                                  "bisected and the ones that kill the worker quarantined")
    fuse: bool = Field(True, description="run consecutive per-shard stages that fit one actor in one actor")
    py_modules: list[str] = Field(default_factory=list, description=(
        "the user's own stage packages (folders, relative to the config file): importable here without "
        "PYTHONPATH, and uploaded to a cluster given with --address"))


class PerturbationConfig(Strict):
    """Per-image perturbation of the identity vector (Vec2Face): sigma drawn per image from a schedule."""

    sigmas: tuple[float, ...] = (0.3, 0.5, 0.7)
    fractions: tuple[float, ...] = (0.4, 0.4, 0.2)

    @model_validator(mode="after")
    def _same_length(self) -> PerturbationConfig:
        if len(self.sigmas) != len(self.fractions):
            raise ValueError("sigmas and fractions must have the same length")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1 (got {sum(self.fractions)})")
        return self


class IdentitiesConfig(Strict):
    sampler: Literal["gaussian", "pca"] = "gaussian"
    count: int = Field(64, ge=1)
    dim: int = Field(512, ge=2)
    max_cosine: float = Field(0.35, gt=-1.0, le=1.0, description="Vec2Face keeps identities below 0.3-0.4")
    images_per_identity: int = Field(8, ge=1)
    perturbation: PerturbationConfig = PerturbationConfig()
    reference: str | None = Field(None, description="embedding file for the pca sampler")
    max_candidates: int = Field(1_000_000, ge=1)


class StageConfig(Strict):
    stage: str = Field(description="a registered stage name or module.path:ClassName")
    id: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$", description="unique name in this run")
    params: dict[str, Any] = Field(default_factory=dict)
    resources: Resources | None = None
    batch_size: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=1, description="upper bound on actors for this stage")
    prune: bool = Field(False, description="do not send samples this stage drops to later stages")

    @property
    def stage_id(self) -> str:
        return self.id or self.stage.rsplit(":", 1)[-1].lower()


class PipelineConfig(Strict):
    name: str = "run"
    run: RunSettings = RunSettings()
    identities: IdentitiesConfig | None = None
    stages: tuple[StageConfig, ...] = Field(min_length=1)
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _unique_ids(self) -> PipelineConfig:
        seen: set[str] = set()
        for i, s in enumerate(self.stages):
            if s.stage_id in seen:
                raise ValueError(f"stages[{i}]: duplicate stage id {s.stage_id!r}; give it an 'id'")
            seen.add(s.stage_id)
        return self


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _format_errors(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        path = _loc(tuple(err["loc"]))
        if prefix:
            path = prefix + ("" if path == "<root>" else ("" if path.startswith("[") else ".") + path)
        got = err.get("input")
        got_text = "" if err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {path}: {err['msg']}{got_text}")
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """`--set a.b=1` values are YAML scalars, so numbers, booleans and lists need no quoting rules."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Hydra-style `path.to.key=value`; list items by index: `stages.1.params.upsample=2`."""
    data = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected path.to.key=value")
        path, _, value = item.partition("=")
        keys = path.strip().split(".")
        node: Any = data
        for i, k in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise ConfigError(f"--set {path}: {'.'.join(keys[:i]) or '<root>'} has no item {k!r}")
                if last:
                    node[int(k)] = parse_value(value)
                else:
                    node = node[int(k)]
            elif isinstance(node, dict):
                if last:
                    node[k] = parse_value(value)
                else:
                    node = node.setdefault(k, {})
            else:
                raise ConfigError(f"--set {path}: {'.'.join(keys[:i])} is not a mapping or list")
    return data


def _find_stage_index(raw: dict[str, Any], key: str) -> str | None:
    """Let overrides name a stage by id: `--set stages.mappers.detect.params.upsample=2`."""
    for i, s in enumerate(raw.get("stages") or []):
        if isinstance(s, dict) and (s.get("id") == key or (s.get("id") is None and s.get("stage") == key)):
            return str(i)
    return None


def _normalise_override(raw: dict[str, Any], item: str) -> str:
    path, sep, value = item.partition("=")
    keys = path.split(".")
    if len(keys) > 1 and keys[0] == "stages" and not keys[1].isdigit():
        idx = _find_stage_index(raw, keys[1])
        if idx is not None:
            keys[1] = idx
    return ".".join(keys) + sep + value


class ResolvedStage(BaseModel):
    """A stage config with its class resolved and params validated."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    index: int
    stage_id: str
    cls: type[Stage]  # type: ignore[type-arg]  # pydantic cannot subscript type[] with a generic
    params: Params
    resources: Resources
    batch_size: int
    workers: int | None
    prune: bool

    @property
    def params_hash(self) -> str:
        return stable_hash(self.params.model_dump(mode="json"))


def resolve_stages(cfg: PipelineConfig) -> list[ResolvedStage]:
    out: list[ResolvedStage] = []
    problems: list[str] = []
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}] ({s.stage_id})"
        try:
            cls = resolve_stage(s.stage)
        except UnknownStageError as exc:
            problems.append(f"  {where}.stage: {exc}")
            continue
        try:
            params = cls.params_model.model_validate(s.params)
        except ValidationError as exc:
            problems.append(_format_errors(exc, prefix=f"{where}.params"))
            continue
        out.append(
            ResolvedStage(
                index=i,
                stage_id=s.stage_id,
                cls=cls,
                params=params,
                resources=s.resources or cls.resources,
                batch_size=s.batch_size or cls.batch_size,
                workers=s.workers,
                prune=s.prune,
            )
        )
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))
    kinds = [r.cls.kind for r in out]
    if kinds[0] != StageKind.SOURCE:
        raise ConfigError(f"invalid config:\n  stages[0] ({out[0].stage_id}): the first stage must be a source")
    for r in out[1:]:
        if r.cls.kind == StageKind.SOURCE:
            raise ConfigError(
                f"invalid config:\n  stages[{r.index}] ({r.stage_id}): only the first stage may be a source")
    if cfg.identities is None and getattr(out[0].cls, "needs_identities", False):
        raise ConfigError(
            f"invalid config:\n  identities: stage {out[0].stage_id!r} generates from identities; "
            "add an 'identities' block"
        )
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None, py_modules: list[str] | None = None
                ) -> tuple[PipelineConfig, list[ResolvedStage]]:
    """The validated config and its resolved stages. ``run.py_modules`` (relative to the config file)
    and ``py_modules`` (the command line's, relative to the working directory) become absolute and
    importable before the stages resolve."""
    if raw is None:
        assert path is not None
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("invalid config:\n  <root>: expected a mapping of sections (run, identities, stages, export)")
    overrides = [_normalise_override(raw, o) for o in overrides or []]
    raw = apply_overrides(raw, overrides)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("invalid config:\n" + _format_errors(exc)) from None
    here = Path(path).resolve().parent if path is not None else Path.cwd()
    found = [*_package_dirs(cfg.run.py_modules, here, "run.py_modules"), *_package_dirs(py_modules or [], Path.cwd(),
                                                                                       "--py-module")]
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"py_modules": list(dict.fromkeys(found))})})
    use_py_modules(cfg.run.py_modules)
    return cfg, resolve_stages(cfg)


def _package_dirs(paths: list[str], base: Path, where: str) -> list[str]:
    out = []
    for i, p in enumerate(paths):
        full = (base / Path(p).expanduser()).resolve()
        if not full.is_dir():
            key = f"{where}[{i}]" if where.startswith("run.") else f"{where} {p}"
            raise ConfigError(f"invalid config:\n  {key}: {str(full)!r} is not a folder (a Python package of "
                              "stages, the folder holding its __init__.py)")
        out.append(str(full))
    return out


def code_paths(py_modules: list[str]) -> list[str]:
    """The folders that hold the user's stage packages: on the search path, each imports by its own name."""
    return list(dict.fromkeys(str(Path(p).resolve().parent) for p in py_modules))


def use_py_modules(py_modules: list[str]) -> None:
    """Make the user's stage packages importable in this process, where the config's stages resolve."""
    for path in reversed(code_paths(py_modules)):
        if path not in sys.path:
            sys.path.insert(0, path)


def config_hash(cfg: PipelineConfig) -> str:
    # Where the user's code lives is not what the run computes: moving it changes nothing.
    return stable_hash(cfg.model_dump(mode="json", exclude={"run": {"py_modules"}}))

