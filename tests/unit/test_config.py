"""The training config: YAML + overrides, and one clear line for every mistake."""

import pytest

from visiontune.config import TrainConfig, build_config, parse_overrides
from visiontune.errors import UserError


def test_flags_win_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: /x\nlr: 0.5\nbatch-size: 16\nepochs: 3\n")
    cfg = build_config(TrainConfig, f, {"lr": 0.01, "epochs": None})
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (0.01, 16, 3)


def test_overrides_are_yaml_typed():
    assert parse_overrides(["lr=1e-3", "channels_last=false", "image_size=96"]) == {
        "lr": 1e-3,
        "channels_last": False,
        "image_size": 96,
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"data": "x", "lerning_rate": 0.1}, "unknown config key 'lerning_rate'"),
        ({"data": "x", "lr": 0}, "lr must be > 0"),
        ({"data": "x", "lr": -1}, "lr must be > 0"),
        ({"data": "x", "trainable": "last:0"}, "trainable must be head, all or last:N"),
        ({"data": "x", "optimizer": "rmsprop"}, "'optimizer'"),
        ({"data": "x", "split_ratios": [0.5, 0.2, 0.2]}, "adding up to 1"),
    ],
)
def test_bad_values_fail_in_one_line(values, message):
    with pytest.raises(UserError) as e:
        build_config(TrainConfig, None, values)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_suggests_close_match():
    with pytest.raises(UserError, match="did you mean batch_size"):
        build_config(TrainConfig, None, {"data": "x", "batchsize": 4})


def test_monitor_mode_follows_metric():
    assert build_config(TrainConfig, None, {"data": "x"}).monitor_mode == "min"
    cfg = build_config(TrainConfig, None, {"data": "x", "monitor": "valid_accuracy"})
    assert cfg.monitor_mode == "max"


def test_dotted_override_sets_a_key_inside_a_section(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("data: x\nprofiler:\n  sample_interval_ms: 1000\n")
    from visiontune.config import parse_overrides

    cfg = build_config(TrainConfig, conf, parse_overrides(["profiler.enabled=false"]))
    assert cfg.profiler.enabled is False
    assert cfg.profiler.sample_interval_ms == 1000  # the rest of the section is kept
    with pytest.raises(UserError, match=r"profiler\.nope"):
        build_config(TrainConfig, conf, parse_overrides(["profiler.nope=1"]))
