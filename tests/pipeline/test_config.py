"""Config errors fail before any work and name the key path and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, apply_overrides, config_hash, load_config
from pipeline.engine.runner import Runner


def _load(raw: dict, overrides: list[str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(raw=raw, overrides=overrides)


def test_unknown_top_level_key_is_named(engine_config: dict) -> None:
    engine_config["exprot"] = {}
    with pytest.raises(ConfigError, match=r"exprot: Extra inputs are not permitted"):
        _load(engine_config)


def test_wrong_type_names_the_path_and_the_value(engine_config: dict) -> None:
    engine_config["run"]["shard_size"] = "big"
    with pytest.raises(ConfigError, match=r"run\.shard_size: Input should be a valid integer.*'big'"):
        _load(engine_config)


def test_stage_params_are_validated_by_the_stage_model(engine_config: dict) -> None:
    engine_config["stages"][1]["params"] = {"min_mean": "bright", "colour": 1}
    with pytest.raises(ConfigError) as err:
        _load(engine_config)
    text = str(err.value)
    assert "stages[1] (meanf).params.min_mean: Input should be a valid number" in text
    assert "stages[1] (meanf).params.colour: Extra inputs are not permitted" in text


def test_unknown_stage_lists_the_known_ones(engine_config: dict) -> None:
    engine_config["stages"][1]["stage"] = "detekt"
    expected = r"stages\[1\] \(meanf\)\.stage: unknown stage 'detekt'; known stages: .*image_stats"
    with pytest.raises(ConfigError, match=expected):
        _load(engine_config)


def test_source_must_come_first(engine_config: dict) -> None:
    engine_config["stages"].reverse()
    with pytest.raises(ConfigError, match=r"stages\[0\] \(meanf\): the first stage must be a source"):
        _load(engine_config)


def test_missing_identities_block_is_reported(engine_config: dict) -> None:
    del engine_config["identities"]
    with pytest.raises(ConfigError, match=r"identities: stage 'pattern' generates from identities"):
        _load(engine_config)


def test_duplicate_stage_ids_are_refused(engine_config: dict) -> None:
    engine_config["stages"].append(dict(engine_config["stages"][1]))
    with pytest.raises(ConfigError, match=r"duplicate stage id 'meanf'"):
        _load(engine_config)


def test_export_threshold_on_a_missing_column_fails_before_any_work(engine_config: dict, tmp_path: Path) -> None:
    engine_config["export"]["thresholds"] = {"meanf.brightness": {"min": 3}}
    cfg, stages = _load(engine_config)
    out = tmp_path / "run"
    expected = r"export\.thresholds\.meanf\.brightness: stage 'meanf' has no column 'brightness'"
    with pytest.raises(ConfigError, match=expected):
        Runner(cfg, stages, str(out), show_progress=False)
    assert not out.exists()


def test_an_extra_export_member_that_is_not_image_bytes_fails_before_any_work(engine_config: dict,
                                                                             tmp_path: Path) -> None:
    engine_config["export"]["extra_members"] = {"mean.txt": "meanf.mean"}
    cfg, stages = _load(engine_config)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"export\.extra_members\.mean\.txt: meanf\.mean is float, not image bytes"):
        Runner(cfg, stages, str(out), show_progress=False)
    assert not out.exists()


def test_set_overrides_by_index_and_by_stage_id(engine_config: dict) -> None:
    cfg, stages = _load(engine_config, ["run.shard_size=4", "stages.meanf.params.min_mean=12.5",
                                        "stages.0.params.size=16", "identities.perturbation.sigmas=[0.2, 0.4, 0.6]"])
    assert cfg.run.shard_size == 4
    assert stages[1].params.min_mean == 12.5  # type: ignore[attr-defined]
    assert stages[0].params.size == 16  # type: ignore[attr-defined]
    assert cfg.identities is not None and cfg.identities.perturbation.sigmas == (0.2, 0.4, 0.6)


def test_set_without_equals_or_through_a_scalar_is_an_error(engine_config: dict) -> None:
    with pytest.raises(ConfigError, match=r"expected path\.to\.key=value"):
        apply_overrides(engine_config, ["run.seed"])
    with pytest.raises(ConfigError, match=r"run\.seed is not a mapping"):
        apply_overrides(engine_config, ["run.seed.x=1"])


def test_config_hash_is_stable_and_sensitive(engine_config: dict, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(engine_config))
    a, _ = load_config(path)
    b, _ = load_config(path)
    c, _ = load_config(path, ["run.seed=4"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("stages: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_run_py_modules_make_a_package_next_to_the_config_importable_and_a_missing_one_is_named(
        engine_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # the user's folder is added for this test only
    package = tmp_path / "user" / "nearby_stages"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from tests.fixtures.engine_stages import MeanFilter as Mine\n")
    raw = {**engine_config, "run": {**engine_config["run"], "py_modules": ["user/nearby_stages"]}}
    raw["stages"] = [engine_config["stages"][0], {"stage": "nearby_stages:Mine", "id": "mine"}]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg, stages = load_config(config)
    assert cfg.run.py_modules == [str(package)] and stages[1].cls.__name__ == "MeanFilter"
    moved = {**raw, "run": {**raw["run"], "py_modules": [str(package)]}}
    assert config_hash(load_config(raw=moved)[0]) == config_hash(cfg)  # where the code lives is not hashed
    config.write_text(yaml.safe_dump({**raw, "run": {**raw["run"], "py_modules": ["user/missing"]}}))
    with pytest.raises(ConfigError, match=r"run\.py_modules\[0\]: .*user/missing.* is not a folder"):
        load_config(config)
