"""An ``s3://`` channel from the loopback S3 server: copied once into the cache, as File mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiontune.script.job import ScriptJob, run_job
from visiontune.script.metrics import parse_metric_options

pytestmark = pytest.mark.integration


def test_s3_channel_is_copied_once_and_again_when_it_changes(s3_env, scripts, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint_url, region_name=s3_env.region)
    s3.create_bucket(Bucket="script-data")
    for key in ("train/ants/1.jpg", "train/bees/1.jpg", "train/bees/2.jpg"):
        s3.put_object(Bucket="script-data", Key=key, Body=b"x")

    def run(name: str) -> dict:
        job = ScriptJob(
            entry_point=str(scripts / "train.py"),
            output=tmp_path / name,
            hyperparameters={"epochs": 1},
            channels={"training": "s3://script-data/train"},
            metric_definitions=parse_metric_options(["loss=Average loss: ([0-9.]+)"]),
            endpoint_url=s3_env.endpoint_url,
            echo=False,
        )
        result = run_job(job)
        assert result.ok, result.failure_reason
        return json.loads((tmp_path / name / "job.json").read_text())

    first = run("a")
    local = first["channels"]["training"]["path"]
    assert "Training on 3 files" in (tmp_path / "a" / "logs" / "stdout.log").read_text()
    (Path(local) / "ants" / "1.jpg").touch()  # a second job must not copy again
    stamp = (Path(local) / "ants" / "1.jpg").stat().st_mtime_ns
    second = run("b")
    assert second["channels"]["training"]["path"] == local
    assert (Path(local) / "ants" / "1.jpg").stat().st_mtime_ns == stamp

    s3.put_object(Bucket="script-data", Key="train/ants/2.jpg", Body=b"y")
    run("c")
    assert "Training on 4 files" in (tmp_path / "c" / "logs" / "stdout.log").read_text()


def test_a_missing_bucket_is_one_line(vt, s3_env, scripts, tmp_path):
    proc = vt(
        "run", scripts / "train.py", "--channel", "training=s3://no-such-bucket/x",
        "--endpoint-url", s3_env.endpoint_url, "-o", tmp_path / "run",
        env=s3_env.env(),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "no-such-bucket" in proc.stderr
    assert "Traceback" not in proc.stderr
