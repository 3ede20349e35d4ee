"""Config errors fail before any work and name the key path and what was expected."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from facekit.userconfig import MAX_YAML_BYTES, NOT_FINITE
from pipeline.config import ConfigError, apply_overrides, config_hash, load_config
from pipeline.engine.runner import Runner
from tests.fixtures.float_fields import float_paths, nested, shown_path


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


def test_refill_without_a_generator_source_or_a_target_is_refused(engine_config: dict) -> None:
    engine_config["refill"] = {"max_rounds": 2}
    with pytest.raises(ConfigError, match=r"refill\.target_images: expected a number of images per identity"):
        _load(engine_config)
    engine_config["refill"]["target_images"] = 8
    assert _load(engine_config)[0].refill is not None
    engine_config["stages"][0] = {"stage": "ingest", "params": {"root": "/data"}}
    with pytest.raises(ConfigError, match=r"refill: stage 'ingest' does not generate from identities"):
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


@pytest.mark.parametrize(("key", "block"), [
    ("export.identities.prefer.score", {"identities": {"prefer": {"score": "meanf.meen"}}}),
    ("export.identities.balance.column", {"identities": {"balance": {"column": "meanf.meen", "shares": {"a": 1.0}}}}),
    ("export.splits.stratify", {"splits": {"stratify": "meanf.meen"}}),
])
def test_a_misspelled_column_of_the_identity_selection_or_the_split_exits_2_naming_its_key_before_any_work(
        engine_config: dict, tmp_path: Path, key: str, block: dict) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    engine_config["export"].update(block)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(engine_config))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(config), "--output", str(out)])
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert f"{key}: stage 'meanf' has no column 'meen' (columns: mean)" in res.stderr, res.stderr
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


def test_look_alike_siblings_out_of_range_name_their_key_and_a_config_without_them_hashes_as_before(
        engine_config: dict) -> None:
    cfg, _ = _load(engine_config)
    assert cfg.identities is not None and "siblings" not in cfg.identities.model_dump(mode="json")
    cfg, _ = _load(engine_config, ["identities.siblings={fraction: 0.5, cosine: 0.7}"])
    assert cfg.identities is not None and cfg.identities.model_dump(mode="json")["siblings"] == {
        "fraction": 0.5, "cosine": 0.7}
    with pytest.raises(ConfigError, match=r"identities\.siblings\.cosine"):
        _load(engine_config, ["identities.siblings={fraction: 0.5, cosine: 1.0}"])


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


# ---------------------------------------------------------------- YAML that expands past every bound

def _laughs(levels: int, fan: int) -> str:
    """The classic billion laughs: each level a list of `fan` aliases of the one before."""
    text = "l0: &l0 [lol]\n"
    for i in range(1, levels + 1):
        text += f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]\n"
    return text


BOMBS = {
    "nested lists, 9 x 9": (_laughs(9, 9), "expand to more than 100,000 nodes"),
    "nested lists, 20 x 2": (_laughs(20, 2), "expand to more than 100,000 nodes"),
    "nested mappings": ("m0: &m0 {a: lol, b: lol}\n" + "".join(
        f"m{i}: &m{i} {{a: *m{i - 1}, b: *m{i - 1}, c: *m{i - 1}, d: *m{i - 1}}}\n" for i in range(1, 12)),
        "expand to more than 100,000 nodes"),
    "anchors inside storage_options": (
        "stages:\n- stage: ingest\n  params:\n    root: /data\n    storage_options:\n"
        "      k0: &k0 [xxxxxxxx, xxxxxxxx, xxxxxxxx, xxxxxxxx]\n"
        + "".join(f"      k{i}: &k{i} [*k{i - 1}, *k{i - 1}, *k{i - 1}, *k{i - 1}]\n" for i in range(1, 12)),
        "expand to more than 100,000 nodes"),
    "merge keys": ("a0: &a0 {x: 1, y: 2}\n" + "".join(
        f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}, *a{i - 1}]}}\n" for i in range(1, 16)),
        "expand to more than 100,000 nodes"),
    "one long string repeated": ("s: &s " + "x" * 100_000 + "\nl: [" + ", ".join(["*s"] * 50) + "]\n",
                                 "expand to more than 4,194,304 characters"),
    "a recursive alias": ("a: &a [1, *a]\n", "refers to a node that contains it"),
    "deep nesting": ("a: " + "[" * 100 + "]" * 100 + "\n", "nested more than 64 levels deep"),
    "deep nesting through aliases": ("a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n",
                                     "aliases nest more than 64 levels deep"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_yaml_bomb_is_refused_naming_the_file_and_the_limit(name: str, tmp_path: Path) -> None:
    text, limit = BOMBS[name]
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(limit)) as err:
        load_config(path)
    assert str(err.value).startswith(str(path))
    assert len(str(err.value)) < 300


def test_a_bomb_in_a_set_value_is_refused(engine_config: dict) -> None:
    with pytest.raises(ConfigError, match=r"--set run\.seed: its aliases expand to more than 100,000 nodes"):
        _load(engine_config, ["run.seed=" + _laughs(9, 9).replace("\n", ", ").join("{}")])


def test_a_config_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "#" * MAX_YAML_BYTES)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: more than 4,194,304 bytes"):
        load_config(path)


def test_small_shared_anchors_and_merge_keys_still_load(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "identities: {count: 6, images_per_identity: 4, dim: 64, max_cosine: 0.5}\n"
        "stages:\n"
        "  - {stage: 'tests.fixtures.engine_stages:PatternSource', id: pattern}\n"
        "  - {stage: 'tests.fixtures.engine_stages:MeanFilter', id: a, params: &p {min_mean: 60}}\n"
        "  - {stage: 'tests.fixtures.engine_stages:MeanFilter', id: b, params: *p}\n"
        "  - {stage: 'tests.fixtures.engine_stages:MeanFilter', id: c, params: {<<: *p, min_mean: 70}}\n")
    _, stages = load_config(path)
    assert [s.params.min_mean for s in stages[1:]] == [60, 60, 70]  # type: ignore[attr-defined]


def test_an_error_shows_a_huge_value_clipped(engine_config: dict, tmp_path: Path) -> None:
    engine_config["run"]["shard_size"] = "x" * 1_000_000
    with pytest.raises(ConfigError) as err:
        _load(engine_config)
    text = str(err.value)
    assert "run.shard_size: Input should be a valid integer" in text
    assert f"(got '{'x' * 199}… (1000002 chars))" in text
    assert len(text) < 600
    engine_config["run"]["shard_size"] = 8
    engine_config["export"]["thresholds"] = {"meanf." + "y" * 1_000_000: {"min": 3}}
    cfg, stages = _load(engine_config)
    with pytest.raises(ConfigError, match=r"stage 'meanf' has no column 'y{199}… \(1000002 chars\)") as err:
        Runner(cfg, stages, str(tmp_path / "run"), show_progress=False)
    assert len(str(err.value)) < 800


# ---------------------------------------------------------------- floats are finite numbers

def _float_cases() -> list[tuple[str, dict, str]]:
    """(what, raw config, the error line's key path) for every float of every config model."""
    from facekit.backends.base import BACKEND_CLASSES, backend_class
    from facekit.labelers.base import LABELERS, labeler_class
    from pipeline.config import PipelineConfig
    from stages.registry import BUILTIN_STAGES, resolve_stage

    cases = [(shown_path(p), {"stages": []} | nested(p, None), shown_path(p)) for p in float_paths(PipelineConfig)]
    for name in BUILTIN_STAGES:
        for p in float_paths(resolve_stage(name).params_model):
            cases.append((f"{name}.{shown_path(p)}", {"stages": [{"stage": name, "params": nested(p, None)}]},
                          f"stages[0] ({name}).params.{shown_path(p)}"))
    for kind in LABELERS:
        for p in float_paths(labeler_class(kind).params_model):
            params = {"labelers": [{"kind": kind, "params": nested(p, None)}]}
            cases.append((f"labeler {kind}.{shown_path(p)}", {"stages": [{"stage": "labels", "params": params}]},
                          f"stages[0] (labels).params.labelers[0].params.{shown_path(p)}"))
    for backend, roles in BACKEND_CLASSES.items():
        stage = "detect" if "detector" in roles else "embed"
        for p in float_paths(backend_class(backend, "spec")):
            params = {"backend": backend, "options": nested(p, None)}
            cases.append((f"backend {backend}.{shown_path(p)}", {"stages": [{"stage": stage, "params": params}]},
                          f"stages[0] ({stage}).params.options.{shown_path(p)}"))
    return cases


def _with(raw: Any, value: float) -> Any:
    if isinstance(raw, dict):
        return {k: _with(v, value) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_with(v, value) for v in raw]
    return value if raw is None else raw


def test_every_float_of_every_config_model_refuses_nan_and_infinity() -> None:
    cases = _float_cases()
    assert len(cases) > 40  # the walk reaches the stage, labeler and backend models
    missed = []
    for what, raw, path in cases:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError) as err:
                load_config(raw=_with(raw, value))
            if f"  {path}: {NOT_FINITE} (got {value!r})" not in str(err.value):
                missed.append(f"{what}={value}: {err.value}")
    assert not missed, "\n".join(missed)


# ---------------------------------------------------------------- --set paths

def test_set_takes_quoted_keys_that_contain_dots(engine_config: dict) -> None:
    cfg, _ = _load(engine_config, [
        'export.thresholds."meanf.mean".min=3',
        "export.thresholds.'meanf.mean'.max=9",
        'export.thresholds."a.b.c".max_abs=1',
        "export.extra_members.'x.png'=meanf.img",
        'stages.meanf."params".min_mean=12.5',
        "stages.0.params.size=16",
    ])
    assert cfg.export.thresholds["meanf.mean"].min == 3 and cfg.export.thresholds["meanf.mean"].max == 9
    assert cfg.export.thresholds["a.b.c"].max_abs == 1
    assert cfg.export.extra_members == {"x.png": "meanf.img"}
    assert cfg.stages[1].params == {"min_mean": 12.5} and cfg.stages[0].params == {"size": 16}


def test_set_resolves_a_plain_dotted_key_against_the_mapping_and_the_model(engine_config: dict) -> None:
    engine_config["export"]["thresholds"] = {"meanf.mean": {"min": 3}}
    cfg, _ = _load(engine_config, [
        "export.thresholds.meanf.mean.max=9",  # a key the mapping holds
        "export.thresholds.quality.yaw.max_abs=10",  # a new key: Threshold's fields end the path
        "export.thresholds.labels.min.max=2",  # 'min' is a field too, but cannot be followed by 'max'
        "export.thresholds.a.b.c={min: 1}",  # the whole value
        "export.extra_members.degraded.png=degrade.degraded",  # a str value: the rest is the key
    ])
    t = cfg.export.thresholds
    assert (t["meanf.mean"].min, t["meanf.mean"].max) == (3, 9)
    assert t["quality.yaw"].max_abs == 10 and t["labels.min"].max == 2 and t["a.b.c"].min == 1
    assert cfg.export.extra_members == {"degraded.png": "degrade.degraded"}


def test_a_set_path_that_fails_shows_the_quoted_form(engine_config: dict) -> None:
    quoted = re.escape("""--set 'export.thresholds."quality.yaw".max_abs=10'""")
    with pytest.raises(ConfigError, match=rf"run\.seed is not a mapping or list; a key that contains dots is "
                                          rf"quoted: {quoted}"):
        _load(engine_config, ["run.seed.x=1"])
    with pytest.raises(ConfigError, match=rf"hint: --set makes a mapping at each dot \(here run\.x\); .*{quoted}"):
        _load(engine_config, ["run.x.y=1"])
    with pytest.raises(ConfigError, match=rf"a quote in the path is not closed; .*{quoted}"):
        _load(engine_config, ['export.thresholds."quality.yaw.max_abs=10'])
    with pytest.raises(ConfigError, match=r"stages has no item 'nosuch'"):
        _load(engine_config, ["stages.nosuch.params.x=1"])


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
