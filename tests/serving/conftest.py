"""Fixtures for the serving tests: a tiny model directory, test images, a real server process."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
VISIONTUNE = str(Path(sys.executable).with_name("visiontune"))  # the console script
CLASSES = ["red", "green", "blue"]
_COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 30), (200, 40, 200)]


def image_bytes(index: int, size: int = 64, fmt: str = "JPEG") -> bytes:
    """A distinct small picture per ``index`` (colour + stripes + noise), encoded."""
    rng = np.random.default_rng(index)
    arr = np.empty((size, size, 3), dtype=np.float32)
    arr[:] = _COLOURS[index % len(_COLOURS)]
    yy, xx = np.mgrid[0:size, 0:size]
    arr[(((xx if index % 2 else yy) // (3 + index % 5)) % 2) == 0] *= 0.5
    arr += rng.normal(0, 20, arr.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session", autouse=True)
def _visiontune_home(tmp_path_factory) -> Iterator[None]:
    # ONNX exports and s3 copies go to a cache: keep the tests' out of the user's home.
    old = os.environ.get("VISIONTUNE_HOME")
    os.environ["VISIONTUNE_HOME"] = str(tmp_path_factory.mktemp("home"))
    yield
    if old is None:
        os.environ.pop("VISIONTUNE_HOME", None)
    else:
        os.environ["VISIONTUNE_HOME"] = old


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A 3-class tiny_cnn model directory (64 px) with random but fixed weights."""
    from visiontune.models.artifact import save_model_dir
    from visiontune.models.registry import build_model, get_spec

    torch.manual_seed(0)
    model, _ = build_model("tiny_cnn", len(CLASSES), weights="none")
    # Spread the head's weights so different pictures get clearly different probabilities.
    with torch.no_grad():
        model.head[1].weight.mul_(8)
    path = tmp_path_factory.mktemp("models") / "colours"
    return save_model_dir(
        path,
        model.eval(),
        architecture="tiny_cnn",
        class_ids=[f"{i:03d}" for i in range(len(CLASSES))],
        class_names=CLASSES,
        preprocess=get_spec("tiny_cnn").preprocess,
        name="colours",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``visiontune serve`` as a real subprocess on a real loopback port."""

    def __init__(self, args: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  (lives as long as the process; closed in stop)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [VISIONTUNE, "serve", *args, "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ping", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    """One real server for a test module: batching on, a 200 ms batch window."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(
        [str(model_dir), "--max-batch-size", "16", "--max-batch-delay-ms", "200"], log
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(name="image_bytes", scope="session")
def _image_bytes_fixture():
    """:func:`image_bytes` as a fixture (test modules cannot import a conftest by name)."""
    return image_bytes


@pytest.fixture(scope="session")
def classes() -> list[str]:
    return list(CLASSES)


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    """Start extra ``visiontune serve`` processes: ``start_server(args) -> ServerProcess``."""
    started: list[ServerProcess] = []

    def start(args: list[str]) -> ServerProcess:
        proc = ServerProcess(args, tmp_path / f"server{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def unused_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
