"""A training run whose loss or weights stop being finite (too high a learning rate) stops
there, exports its best finite epoch, or says in one line that there is none: it used to train
every remaining epoch on NaNs and write a model that no loader accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN, run_cli, write_dataset

from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config
from visiontune.models.artifact import load_model_dir
from visiontune.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("diverged") / "data", per_class=8)


class PoisonGradients(Callback):
    """Makes every gradient NaN from the given epoch on (0-based), as a diverging step would."""

    def __init__(self, from_epoch: int) -> None:
        self.from_epoch = from_epoch

    def on_after_backward(self, state, model) -> None:
        if state.epoch >= self.from_epoch:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


def test_a_run_that_diverges_stops_and_exports_its_best_finite_epoch(data, tmp_path, capsys):
    cfg = build_config(
        TrainConfig,
        None,
        {**TINY_TRAIN, "data": str(data), "output": str(tmp_path / "r"), "epochs": 8,
         "precision": "fp32"},
    )  # fmt: skip
    result = train(cfg, [PoisonGradients(from_epoch=2)])

    assert result.stop_reason == "diverged"
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # not 8 epochs of NaNs
    assert result.best_epoch in (1, 2)
    err = capsys.readouterr().err
    assert (
        "training diverged in epoch 3" in err and f"the model is epoch {result.best_epoch}'s" in err
    )
    model = load_model_dir(result.model_dir).model  # refuses NaN weights: these are finite
    assert all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    )
    summary = json.loads((result.model_dir / "model.json").read_text())["metrics"]
    assert summary["best_epoch"] == result.best_epoch


def test_a_run_that_diverges_in_its_first_epoch_is_one_line_and_writes_no_model(data, tmp_path):
    out = tmp_path / "r"
    proc = run_cli(
        "train", "--data", data, "--model", "tiny_cnn", "--weights", "none", "--trainable", "all",
        "--workers", "0", "--batch-size", "8", "--optimizer", "sgd", "--lr", "1e12",
        "--epochs", "5", "--precision", "fp32", "-o", out,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged in epoch 1 (")
    assert last.endswith("no model was written: lower the learning rate (--lr 1e+12)")
    assert not (out / "model").exists()
    epochs = [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(epochs) == 1  # stopped there, not 5 epochs of NaNs
