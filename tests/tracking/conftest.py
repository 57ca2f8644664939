"""Three tiny training runs shared by the tracking tests, and an MLflow server (the loopback S3
server, ``s3_env``, comes from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_dataset

from visiontune.callbacks import Callback

FAST = {
    "model": "tiny_cnn",
    "weights": "none",
    "trainable": "all",
    "batch_size": 8,
    "workers": 0,
    "progress": False,
    "report": False,
}


def tiny_config(data: Path, out: Path, **kw):
    from visiontune.config import TrainConfig, build_config

    return build_config(TrainConfig, None, {**FAST, "data": str(data), "output": str(out), **kw})


class StopAfterFirstEpoch(Callback):
    """What a pruner does: ask the loop to stop cleanly after epoch 1 (a model is written)."""

    def on_epoch_end(self, state, metrics):
        state.stop_reason = "pruned"


class KillAfterFirstCheckpoint(Callback):
    """Stands in for a kill -9 right after epoch 1's checkpoint: no model, no clean exit."""

    def on_checkpoint(self, state, path):
        raise KeyboardInterrupt


@pytest.fixture(scope="session")
def three_runs(tmp_path_factory) -> Path:
    """``runs/{finished,stopped,killed}``: 2 of 2 epochs; stopped after 1 of 2 with a model;
    killed after 1 of 2 epochs with a checkpoint and no model."""
    from visiontune.train import train

    base = tmp_path_factory.mktemp("tracking")
    data = write_dataset(base / "data")
    runs = base / "runs"
    train(tiny_config(data, runs / "finished", epochs=2, lr=0.01))
    train(tiny_config(data, runs / "stopped", epochs=2, lr=0.05), [StopAfterFirstEpoch()])
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, runs / "killed", epochs=2, lr=0.02), [KillAfterFirstCheckpoint()])
    return runs


# ---------------------------------------------------------------------------- MLflow server


class MlflowServer:
    """``mlflow server`` as its own process: SQLite backend, local artifacts, loopback."""

    def __init__(self, root: Path):
        import os
        import subprocess
        import sys

        from helpers import free_port

        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        self.log = open(root / "server.log", "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            [
                str(mlflow_cli), "server",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # No background job runner (huey processes): tests only need tracking and registry.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        self._wait_healthy(root)

    def _wait_healthy(self, root: Path, deadline_s: float = 180) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + deadline_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server did not start:\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tracked_run(mlflow_server, tmp_path_factory):
    """A tiny 2-epoch run logged to the server, its model registered as ``tiny-cnn``."""
    from visiontune.train import train

    base = tmp_path_factory.mktemp("tracked")
    data = write_dataset(base / "data")
    tracking = {"uri": mlflow_server.url, "register_model": "tiny-cnn", "log_every_steps": 1}
    profiler = {"sample_interval_ms": 100}  # some system samples even in a tiny run
    cfg = tiny_config(
        data, base / "run", epochs=2, lr=0.01, tracking=tracking, profiler=profiler, report=True
    )
    result = train(cfg)
    return data, base / "run", result
