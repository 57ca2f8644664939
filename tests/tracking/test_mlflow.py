"""Training logged to a real `mlflow server` (SQLite backend, local artifacts, loopback),
checked through MLflow's own client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MlflowServer, tiny_config
from helpers import wait_for

pytest.importorskip("mlflow")


def test_params_metrics_tags_artifacts_and_model(tracked_run, mlflow_server):
    # Tracking must not leave MLflow's URI in this process's environment, or every later
    # training run (and its subprocesses) would be tracked too.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    _, run_dir, result = tracked_run
    saved = json.loads((run_dir / "mlflow.json").read_text())
    client = mlflow_server.client()
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    params = run.data.params
    assert params["lr"] == "0.01" and params["model"] == "tiny_cnn" and params["epochs"] == "2"
    assert params["resolved.device"] == "cpu" and params["tracking.register_model"] == "tiny-cnn"
    tags = run.data.tags
    assert tags["visiontune.version"] and tags["visiontune.model"] == "tiny_cnn"
    assert len(tags["visiontune.data_fingerprint"]) == 32
    # Per-epoch metrics carry the global step, as metrics.jsonl does.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in lines if r["split"] == "valid"]
    history = client.get_metric_history(saved["run_id"], "valid_loss")
    assert [(m.step, m.value) for m in history] == [
        (r["step"], pytest.approx(r["loss"])) for r in valid
    ]
    steps = sorted(m.step for m in client.get_metric_history(saved["run_id"], "train_loss_step"))
    assert steps == list(range(1, valid[-1]["step"] + 1))
    assert run.data.metrics["test_accuracy"] == result.test_metrics["accuracy"]
    # System metrics are the profiler's samples (RUN/profile/system), not a second sampler.
    from visiontune.profile.store import read_series

    samples = read_series(run_dir / "profile" / "system", "time")
    cpu = client.get_metric_history(saved["run_id"], "system/cpu")
    assert samples is not None and len(cpu) == samples.num_rows > 0
    assert [m.value for m in cpu] == pytest.approx(samples.column("cpu").to_pylist())
    artifacts = {a.path for a in client.list_artifacts(saved["run_id"])}
    assert {"config.yaml", "metrics.jsonl", "evaluation.json", "report.html"} <= artifacts


def test_logged_and_registered_model_predict_the_run_models_top1(tracked_run, mlflow_server):
    import mlflow
    import pandas as pd

    from visiontune.evaluate import Predictor
    from visiontune.tracking.mlflow_callback import use_tracking_uri

    data, run_dir, _ = tracked_run
    saved = json.loads((run_dir / "mlflow.json").read_text())
    assert saved["registered_model"] == {"name": "tiny-cnn", "version": "1"}
    versions = mlflow_server.client().search_model_versions("name='tiny-cnn'")
    assert [v.run_id for v in versions] == [saved["run_id"]]
    images = [next((data / "test" / c).iterdir()) for c in ("cat", "dog")]
    expected = Predictor(run_dir / "model", device="cpu").predict(images)
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images]})
    with use_tracking_uri(mlflow_server.url):
        for uri in ("models:/tiny-cnn/1", saved["model_uri"]):
            model = mlflow.pyfunc.load_model(uri)
            assert list(model.predict(frame)["label"]) == expected
            assert model.metadata.get_input_schema().input_names() == ["image"]


def test_unreachable_server_fails_before_training_in_one_line(image_dataset, tmp_path, cli):
    from helpers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    args = ["train", "--data", image_dataset, "--model", "tiny_cnn", "--weights", "none",
            "--epochs", "1", "--workers", "0", "--batch-size", "8", "--tracking", dead]  # fmt: skip
    code, _, err = cli(*args, "--output", tmp_path / "run")
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "unreachable" in err and dead in err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing left behind
    code, _, err = cli(*args, "--output", tmp_path / "run2", "--tracking-optional")
    assert code == 0, err
    assert "training without tracking" in err
    assert (tmp_path / "run2" / "model" / "model.json").is_file()


def test_server_lost_mid_run_costs_no_training(image_dataset, tmp_path, capsys):
    from visiontune.callbacks import Callback
    from visiontune.train import train

    server = MlflowServer(tmp_path / "server")

    class KillServerAfterEpoch1(Callback):
        def on_epoch_end(self, state, metrics):
            if metrics["epoch"] == 1:
                server.stop()

    try:
        cfg = tiny_config(image_dataset, tmp_path / "run", epochs=2, tracking={"uri": server.url})
        result = train(cfg, [KillServerAfterEpoch1()])
    finally:
        server.stop()
    assert result.model_dir is not None and (result.model_dir / "model.json").is_file()
    err = capsys.readouterr().err
    lost = [line for line in err.splitlines() if "tracking" in line and "lost" in line]
    assert len(lost) == 1, err  # said once, in one line
    # Epoch 2 never reached MLflow: its metrics are in the run directory, with their step.
    lines = (tmp_path / "run" / "mlflow-unsent.jsonl").read_text().splitlines()
    unsent = {(u["key"], u["step"]) for u in map(json.loads, lines)}
    assert {("valid_loss", 4), ("train_loss", 4)} <= unsent
    assert json.loads((tmp_path / "run" / "mlflow.json").read_text())["lost"] is True


def test_resume_after_sigkill_continues_the_same_mlflow_run(image_dataset, tmp_path, mlflow_server):
    from visiontune.config import TrainConfig, build_config
    from visiontune.train import train

    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    config = tmp_path / "config.yaml"
    config.write_text("tracking:\n  experiment: resume\n  log_every_steps: 1\nreport: false\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
        "VT_PAUSE_STEP": "3",  # mid-epoch 2: the last checkpoint is the end of epoch 1 (step 2)
        "VT_PAUSE_MARKER": str(marker),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "visiontune", "train", "--data", str(image_dataset),
         "--output", str(run_dir), "--model", "tiny_cnn", "--weights", "none",
         "--trainable", "all", "--batch-size", "8", "--epochs", "3", "--workers", "0",
         "--config", str(config), "--tracking", mlflow_server.url,
         "--callback", "pause_callback:PauseAtStep"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, "the run to reach step 3", 120)
        assert proc.poll() is None, proc.stderr.read().decode()
        run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
        client = mlflow_server.client()
        # Step 3's loss reached MLflow before the kill, so the resumed run must not repeat it.
        wait_for(
            lambda: 3 in {m.step for m in client.get_metric_history(run_id, "train_loss_step")},
            "step 3 in MLflow",
            120,
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    cfg = build_config(TrainConfig, run_dir / "config.yaml", {"callbacks": []})
    train(cfg, resume=True)
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run_id
    experiment = client.get_experiment_by_name("resume")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    loss_steps = [m.step for m in client.get_metric_history(run_id, "train_loss_step")]
    assert sorted(loss_steps) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in client.get_metric_history(run_id, "valid_loss")) == [2, 4, 6]


def test_registry_uris_serve_the_runs_model_on_the_sagemaker_contract(tracked_run, mlflow_server):
    from fastapi.testclient import TestClient

    from visiontune.errors import UserError
    from visiontune.evaluate import Predictor
    from visiontune.serving.app import ServeConfig, create_app
    from visiontune.tracking.registry import resolve_model_uri

    data, run_dir, _ = tracked_run
    saved = json.loads((run_dir / "mlflow.json").read_text())
    client = mlflow_server.client()
    client.set_registered_model_alias("tiny-cnn", "champion", "1")
    images = [next((data / "test" / c).iterdir()) for c in ("cat", "dog")]
    expected = Predictor(run_dir / "model", device="cpu").predict(images)
    for uri in ("models:/tiny-cnn/1", "models:/tiny-cnn@champion", saved["model_uri"]):
        model_dir = resolve_model_uri(uri, mlflow_server.url)
        meta = json.loads((Path(model_dir) / "model.json").read_text())
        assert meta["version"] == json.loads((run_dir / "model/model.json").read_text())["version"]
    app = create_app(ServeConfig(model_dir, device="cpu").check())
    with TestClient(app, raise_server_exceptions=False) as http:
        wait_for(lambda: http.get("/ping").status_code == 200, "/ping", 60)
        labels = [
            http.post(
                "/invocations", content=p.read_bytes(), headers={"Content-Type": "image/jpeg"}
            ).json()["predictions"][0][0]["label"]
            for p in images
        ]
    assert labels == expected
    with pytest.raises(UserError, match="tiny-cnn"):
        resolve_model_uri("models:/tiny-cnn/99", mlflow_server.url)
    assert resolve_model_uri(str(run_dir / "model")) == str(run_dir / "model")


def test_tuning_study_is_a_parent_run_with_a_nested_run_per_trial(
    image_dataset, tmp_path, mlflow_server
):
    from visiontune.tracking.tuning import log_study
    from visiontune.tuning.space import parse_space
    from visiontune.tuning.storage import load_study
    from visiontune.tuning.study import TuneSettings, tune

    fixed = tiny_config(
        image_dataset, tmp_path / "unused", epochs=1,
        tracking={"uri": mlflow_server.url, "experiment": "tuning"},
    )  # fmt: skip
    space = parse_space({"lr": {"type": "categorical", "values": [0.01, 0.05]}})
    settings = TuneSettings(
        study="lrs", study_dir=str(tmp_path / "study"), strategy="grid", max_trials=2,
        heartbeat=1, report=True,
    )  # fmt: skip
    result = tune(settings, fixed, space)
    parent = log_study(load_study(result.study, result.storage), result.study_dir, result.report)
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("tuning")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 3 and len(children) == 2  # the study, and one run per trial
    assert {r.data.params["lr"] for r in children} == {"0.01", "0.05"}
    assert all(r.data.tags["visiontune.trial_state"] == "complete" for r in children)
    best = [r for r in children if r.data.tags.get("visiontune.best_trial") == "true"]
    assert len(best) == 1
    assert best[0].data.metrics["trial_value"] == pytest.approx(result.best["value"])
    study_run = client.get_run(parent)
    assert study_run.data.tags["visiontune.best_trial_run_id"] == best[0].info.run_id
    assert study_run.info.status == "FINISHED"
    assert "report.html" in {a.path for a in client.list_artifacts(parent)}


def test_register_model_without_a_tracking_uri_is_one_line(
    image_dataset, tmp_path, cli, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = cli(
        "train", "--data", image_dataset, "--output", tmp_path / "run", "--model", "tiny_cnn",
        "--register-model", "bees",
    )  # fmt: skip
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "no MLflow tracking URI" in err and not (tmp_path / "run").exists()


def test_serving_a_registry_uri_with_a_wrong_store_is_one_line_and_creates_nothing(tmp_path):
    from helpers import free_port

    def serve(tracking: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        if tracking is not None:
            env["MLFLOW_TRACKING_URI"] = tracking
        return subprocess.run(
            [sys.executable, "-m", "visiontune", "serve", "models:/bees/1"],
            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
        )  # fmt: skip

    def one_line(proc: subprocess.CompletedProcess) -> str:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        return line

    # serve has no --tracking or --tracking-optional: the training command's advice misled.
    line = one_line(serve(None))
    assert "set MLFLOW_TRACKING_URI" in line and "--tracking" not in line
    line = one_line(serve(f"http://127.0.0.1:{free_port()}"))
    assert "is unreachable" in line and "--tracking-optional" not in line
    # A mistyped store was opened as a new, empty database: "model not registered".
    typo = tmp_path / "mlfow" / "mlflow.db"
    line = one_line(serve(f"sqlite:///{typo}"))
    assert f"there is no MLflow database at {typo}" in line
    line = one_line(serve("mlfow-folder"))
    assert f"there is no MLflow database at {tmp_path / 'mlfow-folder' / 'mlflow.db'}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
