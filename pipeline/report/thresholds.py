"""The thresholds drawn over the score histograms: each filter's own (``FilterStage.thresholds()``)
and the export's (``export.thresholds`` in run.yaml), which replace the stage's decision at export."""

from __future__ import annotations

from typing import Any

from stages.base import FilterStage, StageContext, StageKind


def stage_kinds_and_thresholds(config: dict[str, Any], run_url: str) -> tuple[dict[str, StageKind],
                                                                             dict[tuple[str, str], list[Any]]]:
    """Per stage id its kind, and per (stage, column) the threshold lines as (x, label).

    The frozen config is re-resolved to ask each filter; a stage class that no longer imports or
    cannot be built only loses its own lines (the report must never fail a run)."""
    kinds: dict[str, StageKind] = {}
    lines: dict[tuple[str, str], list[tuple[float, str]]] = {}
    try:
        from pipeline.config import load_config

        cfg, resolved = load_config(raw=config)
    except Exception:  # an unresolvable config still gets the export's lines
        resolved, seed = [], 0
    else:
        seed = cfg.run.seed
    for rs in resolved:
        kinds[rs.stage_id] = rs.cls.kind
        if not issubclass(rs.cls, FilterStage):
            continue
        try:
            stage = rs.cls(rs.params, StageContext(run_dir=run_url, stage_id=rs.stage_id, seed=seed))
            own = stage.thresholds()
        except Exception:  # a stage whose constructor needs more than params: no own lines
            continue
        for column, bounds in own.items():
            for bound, x in bounds.items():
                lines.setdefault((rs.stage_id, column), []).append((float(x), f"{bound} {x:g}"))
    for target, bounds in ((config.get("export") or {}).get("thresholds") or {}).items():
        stage_id, _, column = str(target).partition(".")
        for bound, x in (bounds or {}).items():
            if x is None:
                continue
            key = (stage_id, column)
            if bound == "max_abs":
                lines.setdefault(key, []).extend([(-float(x), f"export |x| ≤ {x:g}"), (float(x), "")])
            else:
                lines.setdefault(key, []).append((float(x), f"export {bound} {x:g}"))
    return kinds, lines
