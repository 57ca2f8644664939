"""Three tiny training runs shared by the tracking tests, and the S3 server of the
integration tests (imported, since sibling conftest files do not see each other)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_dataset
from integration.conftest import s3_env, s3_server  # noqa: F401  (fixtures re-exported)

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
