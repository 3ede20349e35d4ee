"""Stage names a config may use, mapped to where their class lives.

Imports are lazy so that a config using only CPU stages never imports torch or diffusers. A config
may also name any class directly as ``module.path:ClassName`` (a plugin stage outside this package).
"""

from __future__ import annotations

import importlib

from stages.base import Stage

BUILTIN_STAGES: dict[str, str] = {
    # sources
    "render": "stages.sources.render:RenderStage",
    "arc2face": "stages.sources.arc2face:Arc2FaceStage",
    "ingest": "stages.sources.ingest:IngestStage",
    # per-sample mappers and filters
    "image_stats": "stages.filters.image_stats:ImageStatsStage",
    "fingerprint": "stages.mappers.fingerprint:FingerprintStage",
    "detect": "stages.mappers.detect:DetectStage",
    "align": "stages.mappers.align:AlignStage",
    "embed": "stages.mappers.embed:EmbedStage",
    "quality": "stages.filters.quality:QualityStage",
    "labels": "stages.labelers.labels:LabelStage",
    "degrade": "stages.mappers.degrade:DegradeStage",
    "clip_filter": "stages.filters.clip_filter:ClipFilterStage",
    "mllm_filter": "stages.filters.mllm_filter:MLLMFilterStage",
    "leakage": "stages.filters.leakage:LeakageStage",
    # global stages
    "consistency": "stages.corpus.consistency:ConsistencyStage",
    "separation": "stages.corpus.separation:SeparationStage",
    "dedup": "stages.corpus.dedup:DedupStage",
    "grouping": "stages.corpus.grouping:GroupingStage",
}


class UnknownStageError(LookupError):
    pass


def resolve_stage(name: str) -> type[Stage]:
    target = BUILTIN_STAGES.get(name, name)
    if ":" not in target:
        known = ", ".join(sorted(BUILTIN_STAGES))
        raise UnknownStageError(f"unknown stage {name!r}; known stages: {known}, or 'module:Class'")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownStageError(f"stage {name!r}: cannot import {module_name} ({exc})") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise UnknownStageError(f"stage {name!r}: {target} is not a Stage subclass")
    return cls


def known_stage_names() -> list[str]:
    return sorted(BUILTIN_STAGES)
