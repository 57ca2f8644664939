"""Small data sets: the defaults train and tune change, said in one line, never over a user's
choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from helpers import write_dataset

from visiontune import smalldata
from visiontune.config import TrainConfig, build_config
from visiontune.tuning.space import parse_space


def _cfg(**overrides):
    return build_config(TrainConfig, None, {"data": "x", **overrides})


def test_small_data_changes_only_what_the_user_left_at_default():
    changes = smalldata.small_data_changes(_cfg(), n_train=18, num_classes=2)
    # 9 images a class: batches of 8 (several steps an epoch), 8 cached views of a frozen
    # backbone, label smoothing, and epochs enough for ~150 steps on the cached features.
    assert changes == {"batch_size": 8, "augment_views": 8, "label_smoothing": 0.1, "epochs": 50}
    chosen = _cfg(batch_size=4, label_smoothing=0.0, epochs=3, augment_views=0)
    assert smalldata.small_data_changes(chosen, n_train=18, num_classes=2) == {}
    # options a search space tunes are the study's, not the defaults'
    assert "epochs" not in smalldata.small_data_changes(_cfg(), 18, 2, tuned=["epochs"])
    # a full fine-tune pays per epoch for images: no views, no extra epochs
    full = smalldata.small_data_changes(_cfg(trainable="all"), 18, 2)
    assert full == {"batch_size": 8, "label_smoothing": 0.1}
    assert smalldata.small_data_changes(_cfg(small_data_defaults=False), 18, 2) == {}


def test_enough_images_per_class_is_not_small():
    assert smalldata.small_data_changes(_cfg(), n_train=40 * 3, num_classes=3) == {}
    assert smalldata.small_data_changes(_cfg(), n_train=19 * 3, num_classes=3) != {}


def test_small_space_adds_the_probe_head_for_cached_trials_only():
    space = parse_space({"lr": {"type": "continuous", "min": 0.001, "max": 0.1}})
    fixed = _cfg(augment="none")
    grown, line = smalldata.small_space(space, fixed, n_train=18, num_classes=2)
    assert grown.names == ["lr", "head"] and "head [linear, probe]" in line
    assert smalldata.small_space(space, _cfg(augment="none"), 400, 2) == (space, None)
    images = _cfg(augment="light", trainable="all")  # trials on images: no probe possible
    assert smalldata.small_space(space, images, 18, 2) == (space, None)
    chosen = _cfg(augment="none", head="linear")
    assert smalldata.small_space(space, chosen, 18, 2) == (space, None)


def test_train_on_small_data_says_what_it_changed_and_records_it(tmp_path):
    data = write_dataset(tmp_path / "data", per_class={"train": 6, "valid": 2, "test": 2})
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "visiontune", "train", "--data", str(data), "--output", str(run),
        "--model", "tiny_cnn", "--weights", "none", "--augment", "none", "--workers", "0",
        "--label-smoothing", "0", "--set", "progress=false",
    ]  # fmt: skip
    proc = subprocess.run(args, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("small data")]
    assert lines == [
        "small data (6.0 training images per class): batch_size 4, epochs 50 "
        "(set any of them to choose otherwise)"
    ]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["batch_size"], saved["epochs"], saved["label_smoothing"]) == (4, 50, 0.0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "train" for r in rows) == 50  # one train row an epoch
