"""``--config FILE`` mistakes: a file that is not text, a key given twice."""

from __future__ import annotations

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
