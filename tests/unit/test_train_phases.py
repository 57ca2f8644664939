"""The training job's phases: schedules, parameter groups, clipping, callbacks on every exit,
safe checkpoints, resume rules, run folders and what a run records."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import FAST, _resume, _run_script, cfg_for

from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config
from visiontune.errors import UserError
from visiontune.train import build_optimizer, lr_multiplier, train


def _cfg(**kw) -> TrainConfig:
    return build_config(TrainConfig, None, {"data": "unused", **kw})


# ---- schedules: the multiplier of the peak learning rate at chosen steps


def test_cosine_schedule_with_warmup():
    f = lr_multiplier(_cfg(schedule="cosine", warmup_epochs=1), total_steps=110, steps_per_epoch=10)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)  # warmup done: cosine starts at the peak
    assert f(60) == pytest.approx(0.5)  # half-way through the 100 cosine steps
    assert f(110) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_decays_every_step_size_epochs():
    f = lr_multiplier(_cfg(schedule="step", step_size=2, step_gamma=0.5), 100, 10)
    assert [f(0), f(19), f(20), f(39), f(40)] == pytest.approx([1, 1, 0.5, 0.5, 0.25])


def test_onecycle_rises_to_the_peak_at_30_percent_then_anneals():
    f = lr_multiplier(_cfg(schedule="onecycle"), total_steps=100, steps_per_epoch=10)
    assert f(0) == pytest.approx(1 / 25)
    assert f(30) == pytest.approx(1.0)
    assert f(15) == pytest.approx(1 / 25 + (1 - 1 / 25) * 0.5)
    assert f(100) == pytest.approx(1e-4)


def test_constant_schedule_is_flat_after_warmup():
    f = lr_multiplier(_cfg(schedule="constant", warmup_epochs=0.5), 100, 10)
    assert [f(0), f(4), f(5), f(99)] == pytest.approx([0.2, 1.0, 1.0, 1.0])


def test_backbone_lr_scale_makes_a_backbone_group_at_the_scaled_rate():
    from visiontune.models.registry import build_model, set_trainable

    model, _ = build_model("tiny_cnn", 3, weights="none")
    set_trainable(model, "all")
    opt = build_optimizer(_cfg(lr=0.1, backbone_lr_scale=0.1), model)
    rates = sorted({round(g["lr"], 6) for g in opt.param_groups})
    assert rates == [0.01, 0.1]
    head = {id(p) for p in model.head.parameters()}
    for g in opt.param_groups:
        is_head = {id(p) in head for p in g["params"]}
        assert len(is_head) == 1  # a group holds head or backbone parameters, never both
        assert g["lr"] == pytest.approx(0.1 if is_head.pop() else 0.01)


def test_grad_clip_bounds_the_gradient_norm(image_dataset, tmp_path):
    norms = []

    class Norm(Callback):
        def on_step_end(self, state, batch, outputs, loss):
            grads = [p.grad for p in state.model.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    train(cfg_for(image_dataset, tmp_path / "run", epochs=1, grad_clip=1e-3, lr=1.0), [Norm()])
    assert norms and max(norms) <= 1e-3 * (1 + 1e-4)


# ---- callbacks: events, state, every exit path


class Recorder(Callback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_train_start(self, state):
        self.events.append(("train_start", state.phase, state.resumed))

    def on_features_start(self, state, split, backbone):
        self.events.append(("features_start", split, state.phase))

    def on_evaluation_start(self, state, split):
        self.events.append(("eval_start", split, state.phase))

    def on_before_backward(self, state, outputs, loss):
        self.events.append(("before_backward", state.phase))

    def on_checkpoint_start(self, state):
        self.events.append(("checkpoint_start", state.phase))

    def on_export_start(self, state):
        self.events.append(("export_start", state.best_epoch))

    def on_export_end(self, state, model_dir):
        self.events.append(("export_end", Path(model_dir).name))

    def on_train_end(self, state, result):
        self.events.append(("train_end", result is not None, state.stop_reason, state.error))


def test_events_and_phases_of_a_cached_feature_run(image_dataset, tmp_path):
    rec = Recorder()
    kw = {"trainable": "head", "augment": "none", "epochs": 1}
    result = train(cfg_for(image_dataset, tmp_path / "run", **kw), [rec])
    names = [e[0] for e in rec.events]
    assert result.used_feature_cache
    assert [e for e in rec.events if e[0] == "features_start"] == [
        ("features_start", s, "features") for s in ("train", "valid", "test")
    ]
    assert names.index("train_start") < names.index("features_start")
    assert ("before_backward", "train") in rec.events
    assert ("eval_start", "valid", "eval") in rec.events and (
        "eval_start",
        "test",
        "eval",
    ) in rec.events
    assert ("checkpoint_start", "checkpoint") in rec.events
    assert ("export_start", 1) in rec.events and ("export_end", "model") in rec.events
    assert rec.events[-1] == ("train_end", True, None, None)
    # The second run reads the features from the cache: no feature pass to report.
    rec2 = Recorder()
    train(cfg_for(image_dataset, tmp_path / "run2", **kw), [rec2])
    assert not [e for e in rec2.events if e[0] == "features_start"]


def test_train_end_fires_after_an_exception(image_dataset, tmp_path):
    rec = Recorder()

    class Explode(Callback):
        def on_epoch_end(self, state, metrics):
            state.config.__dict__["monitor"] = "no_such_metric"  # a user error mid-run

    with pytest.raises(UserError, match="monitor 'no_such_metric' is not a logged metric"):
        train(cfg_for(image_dataset, tmp_path / "run", epochs=2), [Explode(), rec])
    assert rec.events[-1][:2] == ("train_end", False)
    assert rec.events[-1][3].startswith("UserError: monitor")


_END_SCRIPT = """
import json, os, signal, sys
from visiontune.callbacks import Callback
from visiontune.config import TrainConfig, build_config
from visiontune.train import train, TrainingInterrupted
values = json.loads(sys.argv[1])
class Kill(Callback):
    def on_step_end(self, state, batch, outputs, loss):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    def on_train_end(self, state, result):
        print("train_end", result is None, state.stop_reason, file=sys.stderr)
try:
    train(build_config(TrainConfig, None, values), [Kill()])
except TrainingInterrupted:
    sys.exit(143)
"""


def test_train_end_fires_after_sigterm(image_dataset, tmp_path):
    values = {**FAST, "data": str(image_dataset), "output": str(tmp_path / "run"), "epochs": 3}
    p = subprocess.run(
        [sys.executable, "-c", _END_SCRIPT, json.dumps(values)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 143, p.stderr
    assert "train_end True SIGTERM" in p.stderr


def test_callback_named_in_a_config_file_is_attached(image_dataset, tmp_path, monkeypatch):
    log = tmp_path / "events.txt"
    monkeypatch.setenv("VT_TEST_EVENTS", str(log))
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump({**FAST, "epochs": 1, "callbacks": ["helpers:EventLog"]}))
    cfg = build_config(
        TrainConfig, conf, {"data": str(image_dataset), "output": str(tmp_path / "r")}
    )
    train(cfg)
    assert log.read_text().split() == ["train_start", "epoch_end", "train_end"]


def test_unknown_callback_name_is_one_line(image_dataset, tmp_path):
    with pytest.raises(UserError, match="unknown callback 'nope'"):
        train(cfg_for(image_dataset, tmp_path / "r", callbacks=["nope"]))
    assert not (tmp_path / "r").exists()


# ---- checkpoints that verify themselves


def _killed_run(tmp_path, image_dataset, kill_at=3) -> Path:
    run = tmp_path / "run"
    values = {**FAST, "data": str(image_dataset), "output": str(run), "epochs": 3,
              "checkpoint_every_steps": 1}  # fmt: skip
    p = _run_script(values, kill_at=kill_at, sig=15)
    assert p.returncode == 143, p.stderr
    return run


def test_corrupted_checkpoint_falls_back_to_the_previous_good_one(image_dataset, tmp_path):
    run = _killed_run(tmp_path, image_dataset)
    last = run / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
    last.write_bytes(bytes(data))
    p = _resume(run)
    assert p.returncode == 0, p.stderr
    assert "last.pt is damaged (its checksum does not match); resuming from previous.pt" in p.stderr
    assert "resuming" in p.stderr and "batch 0" not in p.stderr.split("resuming from")[0][:0]
    assert (run / "model" / "model.json").is_file()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_bytes(os.urandom(64)), "is damaged (its checksum does not match)"),
    ],
)
def test_damaged_checkpoint_with_no_good_one_is_one_line(image_dataset, tmp_path, damage, message):
    run = _killed_run(tmp_path, image_dataset)
    for name in ("last.pt", "previous.pt"):
        damage(run / "checkpoints" / name)
    p = _resume(run)
    assert p.returncode == 2
    assert message in p.stderr and "no earlier good checkpoint" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_checkpoint_missing_a_key_is_refused(image_dataset, tmp_path):
    from visiontune.run import RunDir

    run = _killed_run(tmp_path, image_dataset)
    rd = RunDir(run)
    ck = rd.load_checkpoint()
    del ck["optimizer"], ck["version"]
    (run / "checkpoints" / "previous.pt").unlink()
    rd.save_checkpoint(ck)  # verifies, but is incomplete
    (run / "checkpoints" / "previous.pt").unlink()
    with pytest.raises(UserError, match=r"last.pt is incomplete \(missing optimizer\)"):
        rd.load_checkpoint()


# ---- resume rules


def test_resume_refuses_a_changed_hyperparameter(image_dataset, tmp_path):
    run = _killed_run(tmp_path, image_dataset)
    p = subprocess.run(
        [sys.executable, "-m", "visiontune", "train", "--resume", str(run), "--lr", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "--resume keeps the run's hyperparameters: lr is 0.5 here but 0.01" in p.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.01


def test_resume_of_a_finished_run_says_so_and_keeps_the_model(image_dataset, tmp_path):
    run = tmp_path / "run"
    train(cfg_for(image_dataset, run, epochs=1))
    before = (run / "model" / "model.safetensors").stat().st_mtime_ns
    p = _resume(run)
    assert p.returncode == 2 and "is finished" in p.stderr and "nothing to resume" in p.stderr
    assert (run / "model" / "model.safetensors").stat().st_mtime_ns == before


# ---- run folders


def test_a_folder_holding_a_config_is_not_overwritten(image_dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 0.3\n")
    with pytest.raises(UserError, match=r"already holds a training run \(config.yaml\)"):
        train(cfg_for(image_dataset, out, epochs=1))
    assert (out / "config.yaml").read_text() == "lr: 0.3\n"


def test_a_failed_start_leaves_no_run_folder(image_dataset, tmp_path):
    with pytest.raises(UserError):
        train(cfg_for(image_dataset, tmp_path / "new" / "run", batch_size=999))
    assert not (tmp_path / "new" / "run").exists()


# ---- what a run records


def test_run_states_and_records_device_precision_workers(image_dataset, tmp_path, capsys):
    # The device pinned: on a GPU machine "auto" would record cuda.
    run_cfg = cfg_for(image_dataset, tmp_path / "run", epochs=1, precision="fp32", device="cpu")
    result = train(run_cfg)
    err = capsys.readouterr().err
    assert "on cpu in fp32, 0 loader workers, batch size 8, from images" in err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["resolved"] == {"device": "cpu", "precision": "fp32", "workers": 0,
                                 "batch_size": 8, "uses_feature_cache": False}  # fmt: skip
    meta = json.loads((result.model_dir / "model.json").read_text())
    assert meta["config"]["resolved"]["precision"] == "fp32"


def test_evaluation_file_names_the_split_when_there_is_no_test_split(tmp_path):
    from helpers import write_dataset

    data = write_dataset(tmp_path / "d", splits=("train", "valid"))
    train(cfg_for(data, tmp_path / "run", epochs=1))
    assert not (tmp_path / "run" / "evaluation.json").exists()
    ev = json.loads((tmp_path / "run" / "evaluation-valid.json").read_text())
    assert ev["split"] == "valid"


def test_run_files_follow_the_umask(image_dataset, tmp_path):
    old = os.umask(0o022)
    try:
        train(cfg_for(image_dataset, tmp_path / "run", epochs=1))
    finally:
        os.umask(old)
    for rel in ("config.yaml", "checkpoints/last.pt", "model/model.json", "evaluation.json"):
        mode = stat.S_IMODE((tmp_path / "run" / rel).stat().st_mode)
        assert mode == 0o644, (rel, oct(mode))


def test_callback_flag_on_the_command_line_attaches_it(image_dataset, tmp_path):
    log = tmp_path / "events.txt"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "visiontune",
            "train",
            "--data",
            str(image_dataset),
            "--output",
            str(tmp_path / "r"),
            "--model",
            "tiny_cnn",
            "--weights",
            "none",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--batch-size",
            "8",
            "--callback",
            "helpers:EventLog",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={
            **os.environ,
            "VT_TEST_EVENTS": str(log),
            "PYTHONPATH": str(Path(__file__).parents[1]),
        },
    )
    assert p.returncode == 0, p.stderr
    assert log.read_text().split() == ["train_start", "epoch_end", "train_end"]
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["callbacks"] == [
        "helpers:EventLog"
    ]


def test_evaluation_lists_the_most_confident_mistakes(image_dataset, tmp_path):
    # lr 0: the untrained head gets some test images wrong, and those are listed.
    result = train(cfg_for(image_dataset, tmp_path / "run", epochs=1, lr=1e-12))
    ev = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    wrong = ev["misclassified"]
    assert wrong  # an untrained head gets some of them wrong
    cm = ev["confusion_matrix"]
    assert len(wrong) == min(24, sum(cm[i][j] for i in range(2) for j in range(2) if i != j))
    for item in wrong:
        assert Path(item["image"]).is_file() and item["true"] != item["predicted"]
        assert item["true"] in Path(item["image"]).parent.name
    probs = [w["probability"] for w in wrong]
    assert probs == sorted(probs, reverse=True)
    assert result.test_metrics["misclassified"] == wrong
