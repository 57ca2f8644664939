"""Training reads its data from S3 and writes its run directory to S3 (real moto server)."""

from __future__ import annotations

import json

import pytest
from helpers import write_dataset

from visiontune.config import TrainConfig, build_config
from visiontune.train import train

pytestmark = pytest.mark.integration


def test_train_from_s3_data_to_s3_output(s3_env, tmp_path, cli, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint_url)
    local = write_dataset(tmp_path / "pets", classes=("cat", "dog"), per_class=6)
    fs.mkdir("train-bucket")
    fs.put(str(local) + "/", "train-bucket/pets/", recursive=True)
    cfg = build_config(
        TrainConfig,
        None,
        {
            "data": "s3://train-bucket/pets",
            "endpoint_url": s3_env.endpoint_url,
            "output": "s3://train-bucket/runs/first",
            "model": "tiny_cnn",
            "weights": "none",
            "trainable": "all",
            "epochs": 2,
            "batch_size": 4,
            "lr": 0.01,
            "workers": 2,
            "progress": False,
        },
    )
    result = train(cfg)
    assert result.test_metrics["count"] == 12
    fs.invalidate_cache()
    listed = {p.split("runs/first/", 1)[1] for p in fs.find("train-bucket/runs/first")}
    assert {"config.yaml", "metrics.jsonl", "checkpoints/last.pt", "model/model.json",
            "model/model.safetensors", "evaluation.json"} <= listed  # fmt: skip
    meta = json.loads(fs.cat_file("train-bucket/runs/first/model/model.json"))
    assert meta["class_ids"] == ["cat", "dog"]

    # A new machine resumes from S3 alone: the local staging copy is gone.
    import shutil

    shutil.rmtree(result.run_dir)
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "other-machine"))
    code, _out, err = cli("train", "--resume", "s3://train-bucket/runs/first",
                         "--endpoint-url", s3_env.endpoint_url, "--set", "epochs=3")  # fmt: skip
    assert code == 0, err
    fs.invalidate_cache()
    lines = fs.cat_file("train-bucket/runs/first/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["epoch"] for x in lines if '"valid"' in x] == [1, 2, 3]


def test_a_fresh_run_into_an_s3_output_holding_a_run_is_refused(s3_env, tmp_path, monkeypatch):
    import s3fs

    from visiontune.errors import UserError

    fs = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint_url)
    fs.mkdir("guard-bucket")
    data = write_dataset(tmp_path / "pets", classes=("cat", "dog"), per_class=4)
    values = {
        "data": str(data), "endpoint_url": s3_env.endpoint_url,
        "output": "s3://guard-bucket/runs/first", "model": "tiny_cnn", "weights": "none",
        "trainable": "all", "epochs": 1, "batch_size": 4, "workers": 0, "progress": False,
    }  # fmt: skip
    train(build_config(TrainConfig, None, values))
    fs.invalidate_cache()
    weights = fs.cat_file("guard-bucket/runs/first/model/model.safetensors")

    # Another machine (no local staging copy) starts a run into the same prefix. Before, it
    # trained and uploaded its files over the first run's.
    monkeypatch.setenv("VISIONTUNE_HOME", str(tmp_path / "other-machine"))
    with pytest.raises(UserError, match=r"s3://guard-bucket/runs/first already holds a training"):
        train(build_config(TrainConfig, None, {**values, "lr": 0.5}))
    fs.invalidate_cache()
    assert fs.cat_file("guard-bucket/runs/first/model/model.safetensors") == weights
    assert "lr: 0.5" not in fs.cat_file("guard-bucket/runs/first/config.yaml").decode()
    # A prefix beside it whose name starts the same is another run.
    train(build_config(TrainConfig, None, {**values, "output": "s3://guard-bucket/runs/first-b"}))
