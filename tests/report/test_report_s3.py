"""``visiontune report s3://...``: the report of a run kept on S3, against a real S3 server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_report import SECTIONS, synthetic_long_run

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_endpoint():
    """``python -m moto.server`` on a free loopback port for this test."""
    pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_report_of_a_run_on_s3_is_written_locally(tmp_path, s3_endpoint):
    import boto3

    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    run = synthetic_long_run(tmp_path / "exp1", steps=200, samples=400)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"\0" * 1024)
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
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
