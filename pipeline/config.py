"""Config: YAML -> pydantic, `--set` overrides, errors that name the key path, frozen hash.

Everything is validated before any work starts, including each stage's own params model, so a typo
in the last stage fails in a second rather than after an hour of generation.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from facekit.common import Strict
from facekit.userconfig import ConfigError as ConfigError
from facekit.userconfig import clip, format_errors, load_yaml, load_yaml_file
from pipeline.export import ExportConfig
from stages.base import Params, Resources, Stage, StageKind, stable_hash
from stages.registry import UnknownStageError, resolve_stage


class RunSettings(Strict):
    seed: int = Field(
        0, description=
        "run seed: every sample's seed derives from it and the sample id, so a re-run gives the same bytes")
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

    sigmas: tuple[float, ...] = Field(
        (0.3, 0.5, 0.7), description=
        "perturbation strengths (sigma of the Gaussian noise added to the unit identity vector)")
    fractions: tuple[float, ...] = Field(
        (0.4, 0.4, 0.2), description="share of each identity's images drawn at each sigma; sums to 1")

    @model_validator(mode="after")
    def _same_length(self) -> PerturbationConfig:
        if len(self.sigmas) != len(self.fractions):
            raise ValueError("sigmas and fractions must have the same length")
        if abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1 (got {sum(self.fractions)})")
        return self


class SiblingsConfig(Strict):
    fraction: float = Field(ge=0.0, le=1.0, description=
                            "share of identities made into look-alike pairs (floor(fraction * count / 2) pairs)")
    cosine: float = Field(gt=-1.0, lt=1.0, description=
                          "identity-vector cosine of each look-alike pair (above max_cosine: near-siblings)")


class IdentitiesConfig(Strict):
    sampler: Literal["gaussian", "pca"] = Field(
        "gaussian", description=
        "gaussian: unit-norm Gaussian vectors kept below max_cosine; pca: a Gaussian in the PCA space of a reference"
        " embedding file")
    count: int = Field(64, ge=1, description="identities to sample")
    dim: int = Field(512, ge=2, description="identity vector size (512 for Arc2Face's ArcFace space)")
    max_cosine: float = Field(0.35, gt=-1.0, le=1.0, description="Vec2Face keeps identities below 0.3-0.4")
    images_per_identity: int = Field(8, ge=1, description="images generated per identity")
    perturbation: PerturbationConfig = Field(
        PerturbationConfig(), description="per-image perturbation of the identity vector")
    reference: str | None = Field(None, description="embedding file for the pca sampler")
    # Left out of the dump when unset, so the identities and fingerprints of configs without it stay as they are.
    siblings: SiblingsConfig | None = Field(
        None, exclude_if=lambda v: v is None, description=
        "look-alike identity pairs at a chosen cosine (grouping and separation tests); null: none")
    max_candidates: int = Field(
        1_000_000, ge=1, description="candidates the sampler may draw before it gives up reaching count")


class RefillConfig(Strict):
    """Identities that end under the target after every stage's decision get more variants, in rounds."""

    target_images: int | None = Field(
        None, ge=1, description="kept images each identity should reach; default: export.identities.target_images")
    max_rounds: int = Field(3, ge=0, description="refill rounds at most (0: none); each round is new shards")
    max_factor: float = Field(
        4.0, ge=1.0, le=100.0, description="an identity short by d images gets ceil(d x f) new variants, f the "
        "inverse of the run's observed pass rate, capped at this")


class StageConfig(Strict):
    stage: str = Field(description="a registered stage name or module.path:ClassName")
    id: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$", description="unique name in this run")
    params: dict[str, Any] = Field(default_factory=dict, description="the stage's own params (see the stage reference)")
    resources: Resources | None = Field(
        None, description="what one worker declares (cpus, gpus, memory_gb); default: the stage's own")
    batch_size: int | None = Field(None, ge=1, description="samples per process() call; default: the stage's own")
    workers: int | None = Field(None, ge=1, description="upper bound on actors for this stage")
    prune: bool = Field(False, description="do not send samples this stage drops to later stages")

    @property
    def stage_id(self) -> str:
        return self.id or self.stage.rsplit(":", 1)[-1].lower()


class PipelineConfig(Strict):
    name: str = Field("run", description="the run's name (dataset card, report)")
    run: RunSettings = Field(RunSettings(), description="how the run is cut into work and scheduled")
    identities: IdentitiesConfig | None = Field(
        None, description="the synthetic identities a generator source renders (needed by render and arc2face)")
    stages: tuple[StageConfig, ...] = Field(
        min_length=1, description="the stages in order: a source first, then mappers, filters and global stages")
    export: ExportConfig = Field(
        ExportConfig(), description="what is exported as training shards, and the dataset card")
    refill: RefillConfig | None = Field(
        None, description="generate more variants for identities under the target after the filters (a generator "
        "source only)")

    @model_validator(mode="after")
    def _unique_ids(self) -> PipelineConfig:
        seen: set[str] = set()
        for i, s in enumerate(self.stages):
            if s.stage_id in seen:
                raise ValueError(f"stages[{i}]: duplicate stage id {s.stage_id!r}; give it an 'id'")
            seen.add(s.stage_id)
        return self


QUOTED_KEY_HINT = ("a key that contains dots is quoted: "
                   """--set 'export.thresholds."quality.yaw".max_abs=10'""")


@dataclass(frozen=True)
class _Segment:
    text: str
    quoted: bool


def _split_override(item: str) -> tuple[list[_Segment], str]:
    """``path=value`` -> the path's keys and the value's text. A key in single or double quotes is one
    key whatever it holds (dots, ``=``); an unquoted path ends at the first ``=``."""
    if "=" not in item:
        raise ConfigError(f"--set {clip(repr(item))}: expected path.to.key=value")
    segs: list[_Segment] = []
    i, n = 0, len(item)
    while True:
        while i < n and item[i] == " ":
            i += 1
        if i < n and item[i] in "'\"":
            end = item.find(item[i], i + 1)
            if end < 0:
                raise ConfigError(f"--set {clip(item)}: a quote in the path is not closed; {QUOTED_KEY_HINT}")
            segs.append(_Segment(item[i + 1:end], True))
            i = end + 1
        else:
            j = i
            while j < n and item[j] not in ".=":
                j += 1
            text = item[i:j].strip()
            if not text:
                raise ConfigError(f"--set {clip(item)}: an empty key in the path; {QUOTED_KEY_HINT}")
            segs.append(_Segment(text, False))
            i = j
        if i < n and item[i] == "=":
            return segs, item[i + 1:]
        if i < n and item[i] == ".":
            i += 1
            continue
        raise ConfigError(f"--set {clip(item)}: a quoted key must be followed by '.' or '='; {QUOTED_KEY_HINT}")


def _render(keys: list[str | int]) -> str:
    """Keys as ``--set`` takes them back: a key with a dot, quote or ``=`` in double quotes."""
    out = [str(k) if isinstance(k, int) or not set(k) & set(".='\" ") else f'"{k}"' for k in keys]
    return ".".join(out) or "<root>"


def _unwrap(tp: Any) -> Any:
    """The type a value must have, without Optional and Annotated; None where it is not one type."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return None
            tp = rest[0]
        else:
            return tp


def _child_type(tp: Any, key: str | int) -> Any:
    """The type of ``key`` inside a value of type ``tp``; None where unknown."""
    tp = _unwrap(tp)
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(key))
        return field.annotation if field is not None else None
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (tuple, list) and args:
        return args[0]
    return None


def _accepts(tp: Any, segs: list[_Segment]) -> bool:
    """Whether ``segs`` is a path into a value of type ``tp`` (True where the type is free-form)."""
    if not segs:
        return True
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(segs[0].text)
        return field is not None and _accepts(field.annotation, segs[1:])
    if origin in (tuple, list):
        return segs[0].text.isdigit() and _accepts(_child_type(tp, 0), segs[1:])
    return tp is None or tp is Any or origin is dict or tp is dict


def _mapping_key(node: dict[str, Any], segs: list[_Segment], tp: Any) -> tuple[str, int]:
    """The key of ``node`` that ``segs`` starts with, and how many segments it takes.

    A quoted segment is one key. Else the longest run of segments that joined with dots is a key the
    mapping holds; else, in a mapping of free keys whose values have a known shape
    (``export.thresholds``: 'stage.column' -> {min, max, max_abs}), the shortest key that leaves a path
    that shape accepts; else one segment."""
    if segs[0].quoted:
        return segs[0].text, 1
    run = next((j for j, s in enumerate(segs) if s.quoted), len(segs))
    for j in range(run, 1, -1):
        joined = ".".join(s.text for s in segs[:j])
        if joined in node:
            return joined, j
    tp = _unwrap(tp)
    if segs[0].text not in node and get_origin(tp) is dict and run > 1:
        value_type = _child_type(tp, "")
        for j in range(1, run + 1):
            if _accepts(value_type, segs[j:]):
                return ".".join(s.text for s in segs[:j]), j
    return segs[0].text, 1


def _list_index(node: list[Any], seg: _Segment) -> int | None:
    """An item by position, or a stage by its id (or its stage name when it has no id)."""
    if seg.text.isdigit():
        return int(seg.text) if int(seg.text) < len(node) else None
    for i, item in enumerate(node):
        if isinstance(item, dict) and (item.get("id") == seg.text
                                       or (item.get("id") is None and item.get("stage") == seg.text)):
            return i
    return None


def _apply_overrides(raw: dict[str, Any], overrides: list[str],
                     model: type[BaseModel] | None) -> tuple[dict[str, Any], list[str]]:
    """The overridden config, and the paths of the mappings the overrides created."""
    data = copy.deepcopy(raw)
    created: list[str] = []
    for item in overrides:
        segs, value_text = _split_override(item)
        value = parse_value(value_text, where=f"--set {_render([s.text for s in segs])}")
        node: Any = data
        tp: Any = model
        keys: list[str | int] = []
        i = 0
        while i < len(segs):
            key: str | int
            if isinstance(node, list):
                index = _list_index(node, segs[i])
                if index is None:
                    raise ConfigError(f"--set {clip(item)}: {_render(keys)} has no item {segs[i].text!r}")
                key, i = index, i + 1
            elif isinstance(node, dict):
                key, used = _mapping_key(node, segs[i:], tp)
                i += used
            else:
                raise ConfigError(f"--set {clip(item)}: {_render(keys)} is not a mapping or list; "
                                  f"{QUOTED_KEY_HINT}")
            keys.append(key)
            tp = _child_type(tp, key)
            if i == len(segs):
                node[key] = value
            else:
                if isinstance(node, dict) and key not in node:
                    node[key] = {}
                    created.append(_render(keys))
                node = node[key]
    return data, created


def parse_value(text: str, where: str = "--set") -> Any:
    """`--set a.b=1` values are YAML scalars, so numbers, booleans and lists need no quoting rules."""
    return load_yaml(text, where) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str],
                    model: type[BaseModel] | None = None) -> dict[str, Any]:
    """``path.to.key=value``. A list item by index (``stages.1.params.upsample=2``) or, for stages, by
    id (``stages.detect.params.upsample=2``). A key that contains dots is quoted
    (``export.thresholds."quality.yaw".max_abs=10``), or written plainly where that is unambiguous:
    the mapping holds that key, or ``model`` (the config's model) gives the shape of the mapping's
    values."""
    return _apply_overrides(raw, overrides, model)[0]


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
            problems.append(format_errors(exc, prefix=f"{where}.params"))
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
    if cfg.refill is not None and cfg.refill.max_rounds > 0:
        if not getattr(out[0].cls, "needs_identities", False):
            raise ConfigError(
                f"invalid config:\n  refill: stage {out[0].stage_id!r} does not generate from identities; refill "
                "needs a generator source (render, arc2face), or remove the 'refill' block")
        if refill_target(cfg) is None:
            raise ConfigError("invalid config:\n  refill.target_images: expected a number of images per identity "
                              "(or export.identities.target_images)")
    return out


def refill_target(cfg: PipelineConfig) -> int | None:
    """The kept images per identity that refill aims at: its own ``target_images``, else the export's
    identity target where the export config has one (read from its dump, so either may be absent)."""
    if cfg.refill is not None and cfg.refill.target_images is not None:
        return cfg.refill.target_images
    target = (cfg.export.model_dump(mode="json").get("identities") or {}).get("target_images")
    return int(target) if target is not None else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None, py_modules: list[str] | None = None
                ) -> tuple[PipelineConfig, list[ResolvedStage]]:
    """The validated config and its resolved stages. ``run.py_modules`` (relative to the config file)
    and ``py_modules`` (the command line's, relative to the working directory) become absolute and
    importable before the stages resolve."""
    if raw is None:
        assert path is not None
        raw = load_yaml_file(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError("invalid config:\n  <root>: expected a mapping of sections (run, identities, stages, export)")
    raw, created = _apply_overrides(raw, overrides or [], PipelineConfig)
    try:
        try:
            cfg = PipelineConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError("invalid config:\n" + format_errors(exc)) from None
        here = Path(path).resolve().parent if path is not None else Path.cwd()
        found = [*_package_dirs(cfg.run.py_modules, here, "run.py_modules"),
                 *_package_dirs(py_modules or [], Path.cwd(), "--py-module")]
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"py_modules": list(dict.fromkeys(found))})})
        use_py_modules(cfg.run.py_modules)
        return cfg, resolve_stages(cfg)
    except ConfigError as exc:
        if created and "Extra inputs are not permitted" in str(exc):
            raise ConfigError(f"{exc}\n  hint: --set makes a mapping at each dot (here {created[-1]}); "
                              f"{QUOTED_KEY_HINT}") from None
        raise


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

