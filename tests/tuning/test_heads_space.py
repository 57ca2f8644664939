"""The heads of issue #16 in a search space: the probe and weight averaging are tunable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.tuning.space import parse_space
from visiontune.tuning.study import TuneSettings, tune

# A frozen random tiny_cnn without augmentation: heads train on cached features in a second.
CACHED = {"model": "tiny_cnn", "weights": "none", "trainable": "head", "augment": "none",
          "workers": 0, "progress": False, "report": False, "epochs": 2, "batch_size": 4}  # fmt: skip


def test_head_and_averaging_are_tuned_as_training_options(tiny_data):
    from visiontune.tuning.storage import load_study

    space = parse_space(
        {
            "head": {"type": "categorical", "values": ["linear", "probe"]},
            "weight-averaging": {"type": "categorical", "values": ["none", "swa"]},
        }
    )
    fixed = build_config(TrainConfig, None, {"data": str(tiny_data), **CACHED})
    result = tune(TuneSettings(study="heads", strategy="grid", max_trials=10, heartbeat=1, report=False), fixed, space)  # fmt: skip
    trials = load_study(result.study, result.storage).get_trials()
    points = sorted((t.params["head"], t.params["weight_averaging"]) for t in trials)
    assert points == [("linear", "none"), ("linear", "swa"), ("probe", "none"), ("probe", "swa")]
    for t in trials:
        assert t.state.name == "COMPLETE", t.user_attrs
        # (the tiny set cross-validates: the trial's model is its first fold's)
        meta = json.loads((Path(t.user_attrs["model_dir"]) / "model.json").read_text())
        assert meta["head"]["type"] == t.params["head"]
        assert meta["config"]["weight_averaging"] == t.params["weight_averaging"]


def test_probe_in_a_space_without_cached_features_fails_before_any_trial():
    space = parse_space({"head": {"type": "categorical", "values": ["linear", "probe"]}})
    space.validate({"data": "x", **CACHED})  # cached features: fine
    with pytest.raises(UserError, match=r"head='probe' is not a valid value.*augment=light"):
        space.validate({"data": "x", **CACHED, "augment": "light"})
