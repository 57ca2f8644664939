"""The training job on tiny synthetic data: learning, artifacts, resume, signals, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN as FAST  # other test modules import FAST from here
from helpers import write_dataset

from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.train import train


def cfg_for(data: Path, out: Path, **kw) -> TrainConfig:
    values = {**FAST, "data": str(data), "output": str(out), **kw}
    return build_config(TrainConfig, None, values)


def test_trains_and_writes_a_self_describing_model(image_dataset, tmp_path):
    result = train(cfg_for(image_dataset, tmp_path / "run", epochs=3))
    run = tmp_path / "run"
    assert result.test_metrics["accuracy"] == 1.0  # the synthetic classes are separable
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["architecture"] == "tiny_cnn"
    assert meta["class_ids"] == ["cat", "dog"]
    assert meta["preprocess"]["input_size"] == 64
    assert meta["config"]["lr"] == 0.01
    assert meta["metrics"]["best_epoch"] == result.best_epoch
    assert (run / "model" / "model.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in lines][:2] == [(1, "train"), (1, "valid")]
    assert {"loss", "accuracy", "top5"} <= set(lines[1])
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["confusion_matrix"] == [[8, 0], [0, 8]]
    assert set(evaluation["per_class"]["cat"]) == {"precision", "recall", "f1", "support"}


def test_evaluate_and_predict_need_only_the_model_dir(image_dataset, tmp_path, cli):
    train(cfg_for(image_dataset, tmp_path / "run", epochs=2))
    model_dir = tmp_path / "run" / "model"
    moved = tmp_path / "elsewhere"
    model_dir.rename(moved)  # nothing may reach back into the run directory
    code, out, _ = cli("evaluate", moved, "--data", image_dataset, "--json")
    assert code == 0
    assert json.loads(out)["accuracy"] == 1.0
    img = next((image_dataset / "test" / "dog").iterdir())
    code, out, _ = cli("predict", img, "--model", moved, "--top-k", "2", "--json")
    assert code == 0
    preds = json.loads(out)[0]["predictions"]
    assert preds[0]["label"] == "dog" and len(preds) == 2
    assert abs(sum(p["probability"] for p in preds) - 1) < 1e-3


def test_corrupt_training_image_is_skipped_and_counted(image_dataset, tmp_path, capsys):
    bad = image_dataset / "train" / "cat" / "broken.jpg"
    good = next((image_dataset / "train" / "cat").iterdir()).read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated JPEG
    (image_dataset / "train" / "dog" / "empty.jpg").write_bytes(b"")
    result = train(cfg_for(image_dataset, tmp_path / "run", epochs=1))
    assert result.bad_images == 2
    assert "2 training image(s) could not be decoded" in capsys.readouterr().err


def test_early_stopping_and_best_epoch(image_dataset, tmp_path):
    # lr so small nothing improves after the first epochs: patience 1 stops early.
    result = train(
        cfg_for(
            image_dataset,
            tmp_path / "run",
            epochs=8,
            lr=1e-9,
            early_stopping=1,
            schedule="constant",
            monitor="valid_accuracy",
        )
    )
    assert result.stop_reason == "early_stopping"
    assert len(result.history) == 2  # epoch 1 is best, epoch 2 does not improve: patience 1
    assert result.best_epoch == 1


def test_failing_callback_is_reported_and_training_goes_on(image_dataset, tmp_path, capsys):
    class Broken(Callback):
        def on_step_end(self, state, batch, outputs, loss):
            raise RuntimeError("boom")

    seen = []

    class Watch(Callback):
        def on_epoch_end(self, state, metrics):
            seen.append(metrics["epoch"])

    result = train(cfg_for(image_dataset, tmp_path / "run", epochs=2), [Broken(), Watch()])
    assert result.model_dir is not None and seen == [1, 2]
    err = capsys.readouterr().err
    assert err.count("Broken.on_step_end failed") == 1 and "boom" in err


def test_step_hooks_separate_data_wait_from_compute(image_dataset, tmp_path):
    events = []

    class Trace(Callback):
        def on_batch_start(self, state):
            events.append("batch")

        def on_step_start(self, state, batch):
            events.append("start")

        def on_after_backward(self, state, model):
            events.append("grads" if model.head[1].weight.grad is not None else "nograd")

        def on_step_end(self, state, batch, outputs, loss):
            events.append("end")

    train(cfg_for(image_dataset, tmp_path / "run", epochs=1), [Trace()])
    assert events[:4] == ["batch", "start", "grads", "end"]
    assert events.count("end") == 2  # 16 images / batch 8


def test_frozen_backbone_without_augmentation_uses_feature_cache(image_dataset, tmp_path):
    kw = {"trainable": "head", "augment": "none", "epochs": 2, "lr": 0.05}
    r1 = train(cfg_for(image_dataset, tmp_path / "a", **kw))
    r2 = train(cfg_for(image_dataset, tmp_path / "b", **kw))
    assert r1.used_feature_cache and r2.used_feature_cache
    assert r1.history[-1]["valid_loss"] == pytest.approx(r2.history[-1]["valid_loss"], rel=1e-5)
    # Augmentation through the backbone every epoch: no cache (on this small set the default
    # would cache augmented views instead, so they are turned off here).
    r3 = train(
        cfg_for(image_dataset, tmp_path / "c", **{**kw, "augment": "light", "augment_views": 0})
    )
    assert not r3.used_feature_cache


def test_existing_run_is_not_overwritten(image_dataset, tmp_path):
    train(cfg_for(image_dataset, tmp_path / "run", epochs=1))
    with pytest.raises(UserError, match="already holds a training run"):
        train(cfg_for(image_dataset, tmp_path / "run", epochs=1))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"model": "resnet5O"}, "unknown model 'resnet5O'; did you mean"),
        ({"batch_size": 64}, "batch_size 64 is larger than the training split (16 images)"),
        ({"image_size": 8}, "image_size 8 is too small for tiny_cnn"),
        ({"data": "/definitely/not/here"}, "/definitely/not/here"),
    ],
)
def test_bad_input_fails_before_compute(image_dataset, tmp_path, kw, message):
    with pytest.raises(UserError) as e:
        train(cfg_for(kw.pop("data", image_dataset), tmp_path / "run", **kw))
    assert message in str(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_single_class_dataset_is_refused(tmp_path):
    data = write_dataset(tmp_path / "d", classes=("only",))
    with pytest.raises(UserError, match="at least 2"):
        train(cfg_for(data, tmp_path / "run"))


def test_cli_errors_are_one_line(image_dataset, tmp_path, cli):
    code, _out, err = cli("train", "--data", image_dataset, "--model", "resnet5O",
                         "--output", tmp_path / "r")  # fmt: skip
    assert code == 2
    assert err.strip().startswith("error: unknown model") and "Traceback" not in err
    code, _, err = cli("train", "--data", image_dataset, "--lr", "0", "--output", tmp_path / "r")
    assert code == 2 and "lr must be > 0" in err
    code, _, err = cli("train", "--data", image_dataset, "--set", "nonsense=1")
    assert code == 2 and "unknown config key 'nonsense'" in err


# --------------------------------------------------------------------------------------------
# Exact resume after SIGKILL, and clean stop on SIGTERM, in real subprocesses

_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, json
    from visiontune.callbacks import Callback
    from visiontune.config import TrainConfig, build_config
    from visiontune.train import train, TrainingInterrupted

    values = json.loads(sys.argv[1]); kill_at = int(sys.argv[2]); sig = int(sys.argv[3])

    class Killer(Callback):
        def on_step_end(self, state, batch, outputs, loss):
            if state.step == kill_at:
                os.kill(os.getpid(), sig)

    try:
        train(build_config(TrainConfig, None, values), [Killer()])
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    """
)


def _run_script(values: dict, kill_at: int, sig: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(values), str(kill_at), str(int(sig))],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def _resume(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "visiontune", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, workers):
    data = write_dataset(tmp_path / "d", classes=("a", "b", "c"), per_class={"train": 12, "valid": 4, "test": 4})  # fmt: skip
    common = {**FAST, "data": str(data), "epochs": 3, "augment": "light", "dropout": 0.2,
              "checkpoint_every_steps": 2, "workers": workers, "precision": "fp32"}  # fmt: skip
    reference = train(build_config(TrainConfig, None, {**common, "output": str(tmp_path / "ref")}))

    run = tmp_path / "killed"
    # 36 images / batch 8 = 5 steps an epoch: step 8 is mid-epoch 2, after the step-6 checkpoint
    p = _run_script({**common, "output": str(run)}, kill_at=8, sig=signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not (run / "model").exists()
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["batch_in_epoch"]) == (1, 1)

    p = _resume(run)
    assert p.returncode == 0, p.stderr
    resumed = json.loads((run / "evaluation.json").read_text())
    ref = json.loads((tmp_path / "ref" / "evaluation.json").read_text())
    assert resumed["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
    assert resumed["confusion_matrix"] == ref["confusion_matrix"]
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [h["loss"] for h in hist if h["split"] == "valid"]
    assert valid == pytest.approx([h["valid_loss"] for h in reference.history], rel=1e-4)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(image_dataset, tmp_path):
    run = tmp_path / "run"
    values = {**FAST, "data": str(image_dataset), "output": str(run), "epochs": 3}
    p = _run_script(values, kill_at=3, sig=signal.SIGTERM)
    assert p.returncode == 128 + signal.SIGTERM
    assert "checkpoint saved, resume with `visiontune train --resume" in p.stderr
    assert "Traceback" not in p.stderr
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 3
    p = _resume(run)
    assert p.returncode == 0, p.stderr
    assert (run / "model" / "model.json").is_file()
