"""``--config FILE`` mistakes: a file that is not text, a key given twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_image

from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_an_image_given_as_config_is_one_line(tmp_path):
    photo = tmp_path / "photo.jpg"
    make_image(0, 0).save(photo, "JPEG")

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "visiontune",
            "train",
            "--config",
            str(photo),
            "--data",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    # Before: a UnicodeDecodeError traceback.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: config file {photo} is not a YAML text file"


def test_a_key_given_twice_is_refused_not_the_last_one_kept(tmp_path):
    config = tmp_path / "train.yaml"
    # In a long file the first lr looks set; YAML loaders kept the second without a word.
    config.write_text("lr: 0.1\nepochs: 3\nmodel: tiny_cnn\nlr: 0.001\n")
    with pytest.raises(
        UserError, match=r"^config file .*train.yaml is not valid YAML: key 'lr' is given twice"
    ):
        build_config(TrainConfig, config, {"data": "d"})

    nested = tmp_path / "nested.yaml"
    nested.write_text("debugger:\n  enabled: true\n  enabled: false\n")
    with pytest.raises(UserError, match="key 'enabled' is given twice"):
        build_config(TrainConfig, nested, {"data": "d"})


def test_a_merge_key_may_still_be_overridden(tmp_path):
    config = tmp_path / "merged.yaml"
    config.write_text(
        "data: d\nprofiler:\n  <<: {enabled: true, sample_interval_ms: 2000}\n"
        "  sample_interval_ms: 500\n"
    )
    assert build_config(TrainConfig, config).profiler.sample_interval_ms == 500


def test_set_null_unsets_what_the_config_file_set(tmp_path):
    from visiontune.config import parse_overrides

    config = tmp_path / "train.yaml"
    config.write_text("data: d\nlimit_per_class: 3\nimage_size: 96\n")
    flags = {"image_size": None}  # a flag not given: the file's value stays

    cfg = build_config(TrainConfig, config, flags, parse_overrides(["limit_per_class=null"]))

    # Before, --set limit_per_class=null was dropped like a flag not given: the run used 3.
    assert cfg.limit_per_class is None
    assert cfg.image_size == 96
    with pytest.raises(UserError, match="invalid config value for 'lr'"):
        build_config(TrainConfig, config, {}, parse_overrides(["lr=null"]))


def test_train_set_null_reaches_the_run(tmp_path, cli):
    import yaml
    from helpers import TINY_TRAIN, write_dataset

    data = write_dataset(tmp_path / "data", per_class=4)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**TINY_TRAIN, "batch_size": 2, "limit_per_class": 2}))
    run = tmp_path / "run"

    code, _, err = cli(
        "train", "--config", config, "--data", data, "--output", run, "--epochs", "1",
        "--set", "limit_per_class=null",
    )  # fmt: skip

    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["limit_per_class"] is None
    assert json.loads((run / "evaluation.json").read_text())["count"] == 8  # all, not 2 a class
