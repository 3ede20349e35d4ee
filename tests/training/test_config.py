"""Training configs are read like pipeline configs: bounded YAML, finite floats, errors naming the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from facekit.userconfig import NOT_FINITE, ConfigError
from tests.fixtures.float_fields import float_paths, nested, shown_path
from training.config import (
    EnhancementTrainConfig,
    RecognitionTrainConfig,
    TrainConfigError,
    VerificationEvalConfig,
    load_train_config,
)

MODELS = (RecognitionTrainConfig, EnhancementTrainConfig, VerificationEvalConfig)


def test_every_float_of_every_training_config_refuses_nan_and_infinity() -> None:
    cases = [(model, path) for model in MODELS for path in float_paths(model)]
    assert len(cases) > 20  # the walk reaches the nested models (optimizer, loss, degradation ranges)
    missed = []
    for model, path in cases:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(TrainConfigError) as err:
                load_train_config(nested(path, value), model)
            if f"  {shown_path(path)}: {NOT_FINITE} (got {value!r})" not in str(err.value):
                missed.append(f"{shown_path(path)}={value}: {err.value}")
    assert not missed, "\n".join(missed)


def test_a_training_config_bomb_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("data:\n  export: /x\n  storage_options:\n    k0: &k0 [a, a, a, a, a, a, a, a]\n" + "".join(
        f"    k{i}: &k{i} [*k{i - 1}, *k{i - 1}, *k{i - 1}, *k{i - 1}, *k{i - 1}, *k{i - 1}, *k{i - 1}, *k{i - 1}]\n"
        for i in range(1, 10)) + "epochs: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: its aliases expand to more than 100,000 nodes"):
        load_train_config(path, RecognitionTrainConfig)
