"""Stage names a config may use, mapped to where their class lives.

Imports are lazy so that a config using only CPU stages never imports torch or diffusers. A config
may also name any class directly as ``module.path:ClassName`` (a plugin stage outside this package).
"""

from __future__ import annotations

import importlib

from stages.base import Stage

BUILTIN_STAGES: dict[str, str] = {
    # sources
    "render": "stages.render:RenderStage",
    "arc2face": "stages.arc2face_stage:Arc2FaceStage",
    "ingest": "stages.ingest:IngestStage",
    # per-sample mappers and filters
    "image_stats": "stages.image_stats:ImageStatsStage",
    "fingerprint": "stages.fingerprint:FingerprintStage",
    "detect": "stages.detect:DetectStage",
    "align": "stages.align:AlignStage",
    "embed": "stages.embed:EmbedStage",
    "quality": "stages.quality:QualityStage",
    "labels": "stages.labels:LabelStage",
    "degrade": "stages.degrade:DegradeStage",
    "clip_filter": "stages.clip_filter:ClipFilterStage",
    "mllm_filter": "stages.mllm_filter:MLLMFilterStage",
    # global stages
    "consistency": "stages.consistency:ConsistencyStage",
    "separation": "stages.separation:SeparationStage",
    "dedup": "stages.dedup:DedupStage",
    "grouping": "stages.grouping:GroupingStage",
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
