"""A small quickstart run with something in every report section: detect errors (YuNet's score bar
raised above the faces of the more turned renders), drops by filters, consistency and separation
drops (strict thresholds) and export thresholds. Shared by the
report, CLI-manners and README-command tests; built once per session on the test Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import EXAMPLES

SMALL_QUICKSTART = [
    "identities.count=12", "identities.images_per_identity=5", "run.shard_size=30",
    "export.val_fraction=0.2", "export.min_images_per_identity=2",
    "stages.render.params.max_yaw=40", "stages.detect.params.options.score_threshold=0.9",
    "stages.consistency.params.threshold=0.85", "stages.consistency.params.keep_nearest=false",
    "stages.consistency.params.fit_far=null",
    "stages.separation.params.threshold=0.74", "stages.separation.params.fit_quantile=null",
]
EXPORT_THRESHOLDS = {"quality.yaw": {"max_abs": 25.0}, "detect.det_score": {"min": 0.5}}


@pytest.fixture(scope="session")
def small_quickstart_run(tmp_path_factory: pytest.TempPathFactory, ray_session: object) -> Path:
    import yaml

    from pipeline.config import load_config
    from pipeline.engine.runner import Runner

    raw = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    raw["export"]["thresholds"] = EXPORT_THRESHOLDS
    cfg, stages = load_config(raw=raw, overrides=SMALL_QUICKSTART)
    out = tmp_path_factory.mktemp("small-qs") / "run"
    result = Runner(cfg, stages, str(out), show_progress=False).run()
    assert result.complete, result
    return out


def rerun_copy(src: Path, dst: Path, overrides: list[str], *, force: bool = False) -> Path:
    """A copy of the small quickstart run, run again with more overrides (only what they change is
    recomputed): a second run to compare with the first."""
    import shutil

    import yaml

    from pipeline.config import load_config
    from pipeline.engine.runner import Runner

    shutil.copytree(src, dst)
    raw = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    raw["export"]["thresholds"] = EXPORT_THRESHOLDS
    cfg, stages = load_config(raw=raw, overrides=[*SMALL_QUICKSTART, *overrides])
    result = Runner(cfg, stages, str(dst), show_progress=False).run(force=force)
    assert result.complete, result
    return dst


# One combination of the whatif tests' grid, exported for real on the same tables.
REEXPORT = ["export.thresholds.quality.yaw.max_abs=40", "export.identities.max_images=3",
            "export.min_images_per_identity=3"]


@pytest.fixture(scope="session")
def small_quickstart_reexported(small_quickstart_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small quickstart run exported again with REEXPORT (no stage runs again)."""
    return rerun_copy(small_quickstart_run, tmp_path_factory.mktemp("small-qs-reexport") / "run", REEXPORT)


@pytest.fixture(scope="session")
def small_quickstart_stricter(small_quickstart_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small quickstart run with a stricter separation threshold (separation and what follows it run
    again): some samples it kept are dropped, and the export loses them."""
    return rerun_copy(small_quickstart_run, tmp_path_factory.mktemp("small-qs-stricter") / "run",
                      ["stages.separation.params.threshold=0.6"], force=True)
