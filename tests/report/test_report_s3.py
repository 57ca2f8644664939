"""``visiontune report s3://...``: the report of a run kept on S3, against a real S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import SECTIONS, synthetic_long_run

pytestmark = pytest.mark.integration


def test_report_of_a_run_on_s3_is_written_locally(tmp_path, s3_env):
    import boto3

    env = {**os.environ, **s3_env.env()}
    s3_endpoint = s3_env.endpoint_url
    run = synthetic_long_run(tmp_path / "exp1", steps=200, samples=400)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"\0" * 1024)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name=s3_env.region)
    s3.create_bucket(Bucket="runs")
    for p in run.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), "runs", f"team/exp1/{p.relative_to(run).as_posix()}")

    cwd = tmp_path / "here"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "visiontune", "report", "s3://runs/team/exp1"]
    out = subprocess.run(
        [*cmd, "--endpoint-url", s3_endpoint], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    report = Path(out.stdout.strip())
    assert report == cwd / "exp1-report.html"
    html = report.read_text()
    for sid in SECTIONS:
        assert f'id="{sid}"' in html
    assert "GPU 0 utilisation" in html

    missing = subprocess.run(
        [*cmd[:-1], "s3://runs/team/nothing-here", "--endpoint-url", s3_endpoint],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0
    assert missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
