"""Space files: SageMaker's ranges, and every mistake caught in one line before a trial."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.tuning.baseline import baseline_params
from visiontune.tuning.space import load_space, parse_space

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dogbreed-tuning.yaml"


def test_example_has_the_seed_ranges():
    space = load_space(EXAMPLE)
    d = space.to_dict()
    assert d["lr"] == {"type": "continuous", "min": 0.001, "max": 0.1, "scaling": "linear"}
    assert d["batch_size"] == {"type": "categorical", "values": [32, 64, 128, 256, 512]}
    assert d["epochs"] == {"type": "integer", "min": 1, "max": 100}
    space.validate({"data": "x"})  # every corner is a valid TrainConfig


def test_dash_and_underscore_keys_and_log_scaling():
    space = parse_space(
        {
            "label-smoothing": {"type": "continuous", "min": 0.0, "max": 0.2},
            "weight_decay": {"type": "continuous", "min": 1e-6, "max": 1e-2, "scaling": "log"},
            "optimizer": {"type": "categorical", "values": ["sgd", "adamw"]},
        }
    )
    assert space.names == ["label_smoothing", "weight_decay", "optimizer"]
    assert space.distributions()["weight_decay"].log is True


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"lr": {"type": "continuous", "min": 0.1, "max": 0.01}}, "min 0.1 > max 0.01"),
        ({"lr": {"type": "continuous", "min": 0, "max": 0.1, "scaling": "log"}}, "min must be > 0"),
        ({"batch-size": {"type": "categorical", "values": []}}, "non-empty list"),
        (
            {"learning_rate": {"type": "continuous", "min": 0.1, "max": 1}},
            "unknown training option",
        ),
        ({"batch_sise": {"type": "integer", "min": 1, "max": 2}}, "did you mean batch_size"),
        ({"epochs": {"type": "integer", "min": 1.5, "max": 3}}, "whole number"),
        ({"lr": {"type": "uniform", "min": 0.1, "max": 1}}, "continuous, integer or categorical"),
        ({"output": {"type": "categorical", "values": ["a", "b"]}}, "set by the tuner"),
        ({}, "non-empty mapping"),
        (
            {"lr": {"type": "continuous", "min": 1e-3, "max": float("inf"), "scaling": "log"}},
            "finite",
        ),
        ({"lr": {"type": "continuous", "min": float("-inf"), "max": 0.1}}, "finite"),
        ({"lr": {"type": "continuous", "min": float("nan"), "max": 0.1}}, "finite"),
        ({"epochs": {"type": "integer", "min": 1, "max": float("inf")}}, "finite"),
        ({"dropout": {"type": "categorical", "values": [0.1, float("nan")]}}, "finite"),
        # Accepted and drawn linearly before: refused, as script mode refuses it.
        (
            {"epochs": {"type": "integer", "min": 1, "max": 100, "scaling": "log"}},
            "epochs is an integer range: log scaling is not supported; use linear",
        ),
    ],
)
def test_bad_spaces_fail_in_one_line(spec, message):
    with pytest.raises(UserError) as e:
        parse_space(spec)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_every_corner_is_checked_against_train_config():
    # dropout must be < 1: the max of this range is not a valid training option.
    space = parse_space({"dropout": {"type": "continuous", "min": 0.0, "max": 1.0}})
    with pytest.raises(UserError, match=r"dropout=1.0 is not a valid value"):
        space.validate({"data": "x"})
    bad_choice = parse_space({"trainable": {"type": "categorical", "values": ["head", "some"]}})
    with pytest.raises(UserError, match="trainable='some'"):
        bad_choice.validate({"data": "x"})


def test_grid_needs_categorical_space():
    space = parse_space({"lr": {"type": "continuous", "min": 0.01, "max": 0.1}})
    with pytest.raises(UserError, match="categorical parameters only"):
        space.grid()


@pytest.mark.parametrize(
    "line",
    [
        "lr: {type: continuous, min: 0.001, max: .inf, scaling: log}",
        "epochs: {type: integer, min: 1, max: .inf}",
        "lr: {type: continuous, min: .nan, max: 0.1}",
    ],
)
def test_unbounded_ranges_are_one_line_from_the_command(tiny_data, tmp_path, vt_env, line):
    space = tmp_path / "space.yaml"
    space.write_text(line + "\n")
    cmd = [sys.executable, "-m", "visiontune", "tune", "--data", str(tiny_data)]
    out = subprocess.run(
        [*cmd, "--space", str(space), "--batch-size", "4", "--max-trials", "1"],
        cwd=tmp_path,
        env=vt_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: space: {line.split(':')[0]}.{'min' if 'nan' in line else 'max'} "
        f"must be a finite number, got {'nan' if 'nan' in line else 'inf'}"
    ]
    assert not (tmp_path / "studies").exists()  # nothing was created


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as text: the range was refused as "not a number", and
    # categorical values became strings the default lr could never equal.
    path = tmp_path / "space.yaml"
    path.write_text(
        "weight_decay: {type: continuous, min: 1e-6, max: 1E-2, scaling: log}\n"
        "lr: {type: categorical, values: [1e-4, 1e-3, 1e-2]}\n"
    )
    space = load_space(path)
    assert space.to_dict()["weight_decay"]["min"] == 1e-6
    assert space.to_dict()["lr"]["values"] == [1e-4, 1e-3, 1e-2]
    fixed = build_config(TrainConfig, None, {"data": "x", "lr": 0.001, "weight_decay": 1e-4})
    params, why = baseline_params(fixed, space)
    assert params == {"weight_decay": 1e-4, "lr": 0.001}, why
