"""Real servers on loopback for integration tests: an S3-compatible moto server (a separate
process, with IAM authentication switched on so wrong credentials are really rejected)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_tcp_port() -> int:
    """A port nothing listens on (for "server unreachable" tests)."""
    return free_port()


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self, **overrides: str) -> dict[str, str]:
        """The AWS environment a user would set for this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            **overrides,
        }


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """``python -m moto.server`` on a free port, as its own process, for the whole session.

    moto accepts any credentials unless IAM auth is on; ``INITIAL_NO_AUTH_ACTION_COUNT=3`` lets
    exactly the three IAM calls below through unauthenticated (create a user, give it S3 rights,
    make its access key), after which every request must be signed with that key.
    """
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="visiontune-test")
        iam.put_user_policy(
            UserName="visiontune-test",
            PolicyName="s3-all",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="visiontune-test")["AccessKey"]
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's credentials in this test's environment only (and fresh s3fs clients)."""
    import boto3
    import s3fs

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    # fsspec caches filesystems by their arguments, not by the environment they read; boto3's
    # default session keeps the credentials it resolved first (another test's server).
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.DEFAULT_SESSION = None
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.DEFAULT_SESSION = None
