"""Helpers for tests: small synthetic image datasets that a model can actually learn.

Each class has its own colour and stripe pattern plus per-image noise, so a tiny network
separates classes within a few steps while the images are still varied real files on disk.
Import as ``from helpers import write_dataset`` (``tests/`` is on pytest's pythonpath).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera"

# The training settings of most tests: a tiny CNN from scratch, no loader workers, small batches
# (a run of a few steps takes a second or two). Tests add data, output, epochs and their own keys.
TINY_TRAIN = {
    "model": "tiny_cnn",
    "weights": "none",
    "trainable": "all",
    "batch_size": 8,
    "lr": 0.01,
    "workers": 0,
    "progress": False,
}


_PALETTE = [
    (220, 40, 40),
    (40, 200, 60),
    (40, 80, 220),
    (230, 200, 30),
    (200, 40, 200),
    (30, 200, 200),
]


REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real ``visiontune`` console entry point in a subprocess (where a traceback would
    show), from the repository root, one thread, the environment (and VISIONTUNE_HOME) kept."""
    return subprocess.run(
        [sys.executable, "-m", "visiontune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def make_image(label: int, index: int, size: int = 64, mode: str = "RGB") -> Image.Image:
    """One learnable image of class ``label`` (colour + stripe orientation) with noise."""
    rng = np.random.default_rng(label * 100_003 + index)
    base = np.array(_PALETTE[label % len(_PALETTE)], dtype=np.float32)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = base
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx if label % 2 == 0 else yy) // 6) % 2 == 0
    img[stripes] *= 0.55
    img += rng.normal(0, 18, size=img.shape)
    arr = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def write_dataset(
    root: Path,
    classes: list[str] | tuple[str, ...] = ("cat", "dog"),
    per_class: dict[str, int] | int = 8,
    splits: tuple[str, ...] | None = ("train", "valid", "test"),
    size: int = 64,
    fmt: str = "JPEG",
) -> Path:
    """Write a folder dataset. ``splits=None`` writes class folders directly under ``root``.

    ``per_class`` is an int for every split, or a dict ``{split: n}``.
    """
    root.mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": ".jpg", "PNG": ".png"}[fmt]
    split_names = splits if splits is not None else ("",)
    offset = 0
    for split in split_names:
        n = per_class if isinstance(per_class, int) else per_class[split]
        for label, cls in enumerate(classes):
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_image(label, offset + i, size).save(d / f"{cls}_{offset + i:04d}{ext}", fmt)
        offset += 1000
    return root


class EventLog:
    """A callback importable by name (``helpers:EventLog``) that appends event names to the
    file named by ``$VT_TEST_EVENTS``: shows a config-named callback was attached."""

    def __new__(cls, cfg):
        from visiontune.callbacks import Callback

        class _Log(Callback):
            def _write(self, name: str) -> None:
                import os

                with open(os.environ["VT_TEST_EVENTS"], "a") as f:
                    f.write(name + "\n")

            def on_train_start(self, state):
                self._write("train_start")

            def on_epoch_end(self, state, metrics):
                self._write("epoch_end")

            def on_train_end(self, state, result):
                self._write("train_end")

        return _Log()


# ------------------------------------------------------------------------- loopback servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    """Where a loopback S3 server listens and the access key it accepts."""

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


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    """``python -m moto.server`` on a free port, as its own process, with IAM auth on.

    moto accepts any credentials unless IAM auth is on; ``INITIAL_NO_AUTH_ACTION_COUNT=3`` lets
    exactly the three IAM calls below through unauthenticated (create a user, give it S3 rights,
    make its access key), after which every request must be signed with that key, so wrong
    credentials are really rejected. Use it through the ``s3_server`` fixture (tests/conftest.py).
    """
    import boto3

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
        deadline = time.monotonic() + 60
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


def wait_for(condition, what: str = "the condition", timeout: float = 60.0, interval: float = 0.05):
    """Poll ``condition()`` until it returns something truthy, and return that.

    Raises:
        AssertionError: ``timeout`` seconds went by first (the message names ``what``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
