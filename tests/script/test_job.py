"""``visiontune run``: a user's SageMaker script run unchanged, its metrics, failures and stops."""

from __future__ import annotations

import json
import tarfile

from visiontune.io import read_jsonl
from visiontune.script.job import ScriptJob, run_job
from visiontune.script.metrics import parse_metric_options

LOSS = "average test loss=Average loss: ([0-9\\.]+)"
ACC = "accuracy=Accuracy: ([0-9\\.]+)%"


def test_run_extracts_metric_series_saves_logs_and_packs_the_model(vt, scripts, channel, tmp_path):
    run_dir = tmp_path / "run"
    proc = vt(
        "run", scripts / "train.py",
        "--hyperparameters", "lr=0.1", "--hp", "epochs=3", "--hp", "batch-size=32",
        "--channel", f"training={channel}",
        "--metric", LOSS, "--metric", ACC,
        "--output", run_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # The script's own output is streamed through, and the last line says how to serve it.
    assert "Test set: Average loss: 2.0000" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("serve it: visiontune serve ") and "model --handler inference.py" in last

    records = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["average test loss"] for r in records if "average test loss" in r]
    accs = [r["accuracy"] for r in records if "accuracy" in r]
    assert losses == [2.0, 1.5, 1.3333]  # (log10(0.1)+2)^2 + 1/epoch, as printed
    assert [r["step"] for r in records if "accuracy" in r] == [0, 1, 2]
    assert accs == [33.33, 40.0, 42.86]

    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "Completed" and job["exit_code"] == 0
    assert job["final_metrics"] == {"average test loss": 1.3333, "accuracy": 42.86}
    assert "Training on 6 files" in (run_dir / "logs" / "stdout.log").read_text()
    with tarfile.open(run_dir / "model.tar.gz") as tar:
        assert tar.getnames() == ["model.pth"]
        assert tar.extractfile("model.pth").read() == b"lr=0.1 optimizer=sgd"


def test_metric_definitions_file_shaped_like_the_estimators(vt, scripts, channel, tmp_path):
    defs = tmp_path / "metrics.yaml"
    defs.write_text(
        "metric_definitions:\n"
        "  - {Name: 'train:loss', Regex: 'Loss: ([0-9\\.]+)'}\n"
        "  - {Name: 'test:accuracy', Regex: 'Accuracy: ([0-9\\.]+)%'}\n"
    )
    proc = vt(
        "run", scripts / "train.py", "--hp", "epochs=2", "--channel", channel,
        "--metric-definitions", defs, "--output", tmp_path / "run", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Test set" not in proc.stdout  # --quiet: the log is in the run dir only
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["final_metrics"] == {"train:loss": 1.55, "test:accuracy": 40.0}


def test_a_crash_is_recorded_with_its_reason_and_a_non_zero_exit(vt, scripts, channel, tmp_path):
    run_dir = tmp_path / "run"
    proc = vt(
        "run", scripts / "crash.py", "--channel", f"training={channel}",
        "--metric", LOSS, "--output", run_dir,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "RuntimeError: CUDA out of memory while training on data" in proc.stderr
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "Failed" and job["exit_code"] == 1
    assert job["failure_reason"].startswith("AlgorithmError: ExecuteUserScriptError: ExitCode 1")
    assert "RuntimeError: CUDA out of memory" in job["failure_reason"]
    assert "Traceback" in "\n".join(job["stderr_tail"])
    assert (run_dir / "output" / "failure").read_text().strip() == job["failure_reason"]
    assert job["final_metrics"] == {"average test loss": 0.9}  # what it printed before dying
    assert not (run_dir / "model.tar.gz").exists()


def test_a_missing_channel_fails_like_in_sagemaker(vt, scripts, tmp_path):
    proc = vt("run", scripts / "crash.py", "--output", tmp_path / "run")
    assert proc.returncode == 1
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert "KeyError: 'SM_CHANNEL_TRAINING'" in job["failure_reason"]


def test_max_run_stops_a_hanging_script_with_sigterm(vt, scripts, tmp_path):
    run_dir = tmp_path / "run"
    proc = vt("run", scripts / "hang.py", "--max-run", "1", "--metric", LOSS, "-o", run_dir)
    assert proc.returncode == 124
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "Stopped" and job["secondary_status"] == "MaxRuntimeExceeded"
    assert job["failure_reason"].startswith("MaxRuntimeExceeded")
    assert job["failure_reason"].endswith("stopped with SIGTERM")
    assert "got SIGTERM, saving" in (run_dir / "logs" / "stdout.log").read_text()
    assert job["final_metrics"] == {"average test loss": 0.5}


def test_a_script_that_ignores_sigterm_is_killed_after_the_grace_period(scripts, tmp_path):
    job = ScriptJob(
        entry_point=str(scripts / "hang.py"),
        output=tmp_path / "run",
        hyperparameters={"ignore-sigterm": 1},
        max_run=1,
        stop_grace=1,
        echo=False,
    )
    result = run_job(job)
    assert result.status == "Stopped" and result.exit_code == -9
    assert result.failure_reason.endswith("then SIGKILL after 1 s")


def test_a_metric_hook_can_stop_the_job(scripts, channel, tmp_path):
    seen: list[tuple[str, float, int]] = []

    def hook(name: str, value: float, step: int) -> str | None:
        seen.append((name, value, step))
        return "pruned at step 1" if step == 1 else None

    job = ScriptJob(
        entry_point=str(scripts / "train.py"),
        output=tmp_path / "run",
        hyperparameters={"epochs": 50, "sleep": 0.2},
        channels={"training": str(channel)},
        metric_definitions=parse_metric_options([LOSS]),
        stop_grace=5,
        echo=False,
    )
    result = run_job(job, on_metric=hook)
    assert result.status == "Stopped"
    assert result.failure_reason.startswith("pruned at step 1")
    assert seen == [("average test loss", 2.0, 0), ("average test loss", 1.5, 1)]
    assert len(result.metric_series["average test loss"]) < 50


def test_user_errors_are_one_line(vt, scripts, tmp_path):
    proc = vt("run", tmp_path / "nope.py")
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"error: script not found: {tmp_path / 'nope.py'}"
    )
    proc = vt("run", scripts / "train.py", "--channel", f"training={tmp_path / 'missing'}")
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = vt("run", scripts / "train.py", "--metric", "loss=([0-9", "-o", tmp_path / "r")
    assert proc.returncode == 2 and "does not compile" in proc.stderr
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "job.json").write_text("{}")
    proc = vt("run", scripts / "train.py", "-o", tmp_path / "r2")
    assert proc.returncode == 2 and "already holds a training job" in proc.stderr


def test_missing_requirements_are_reported(vt, tmp_path, channel):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.py").write_text("print('ok')\n")
    (src / "requirements.txt").write_text("pyyaml\nnot-a-real-package-xyz==1.0\n")
    proc = vt("run", "train.py", "--source-dir", src, "-o", tmp_path / "run")
    assert proc.returncode == 0
    assert "not-a-real-package-xyz==1.0" in proc.stderr and "pyyaml" not in proc.stderr.lower()
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["missing_requirements"] == ["not-a-real-package-xyz==1.0"]


def test_sigterm_to_visiontune_stops_the_script_too(scripts, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "visiontune", "run", str(scripts / "hang.py"),
         "--hp", "ignore-sigterm=1", "--stop-grace", "1", "--metric", LOSS, "-o", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").exists():  # the script is up and printing
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        script_pid = int((run_dir / "logs" / "stdout.log").read_text().split()[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
    job = json.loads((run_dir / "job.json").read_text())
    assert job["status"] == "Stopped"
    assert job["failure_reason"].startswith("the job was terminated (SIGTERM to visiontune)")
    assert job["failure_reason"].endswith("then SIGKILL after 1 s")  # it ignored SIGTERM
    try:
        os.kill(script_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the script outlived visiontune"


def test_profile_samples_the_scripts_process_tree(scripts, channel, tmp_path):
    from visiontune.profile.store import read_series

    job = ScriptJob(
        entry_point=str(scripts / "train.py"),
        output=tmp_path / "run",
        hyperparameters={"epochs": 4, "sleep": 0.25},
        channels={"training": str(channel)},
        echo=False,
        profile=True,
        profile_interval=0.1,
    )
    assert run_job(job).ok
    table = read_series(tmp_path / "run" / "profile" / "system")
    workers = table.column("workers").to_pylist()
    assert max(workers) >= 1  # the script itself, seen as this process's child


def test_an_s3_output_is_refused_not_written_to_a_local_s3_folder(vt, scripts, channel, tmp_path):
    # SageMaker users write output_path=s3://...; Path() turned it into the folder ./s3:/...
    proc = vt("run", scripts / "train.py", "--channel", channel, "-o", "s3://bucket/run1",
              cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: --output s3://bucket/run1: ")
    assert "local" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s3:").exists()


def test_a_job_name_sagemaker_would_refuse_is_refused_before_the_job(vt, scripts, channel, tmp_path):  # fmt: skip
    # The name is the default run directory runs/NAME: "../x" put the job outside runs/ and
    # "a/b" made nested folders, while SageMaker itself refuses both.
    for name in ("../escaped", "team/job-1", "-lead", "a" * 64):
        proc = vt("run", scripts / "train.py", "--channel", channel, "--job-name", name,
                  cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == (
            f"error: --job-name {name!r}: a training job name is 1 to 63 letters, digits and "
            "hyphens, starting and ending with a letter or digit (SageMaker's rule)"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no runs/, no escaped/
    proc = vt("run", scripts / "train.py", "--channel", channel, "--job-name", "job-2-a",
              cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "job-2-a" / "job.json").is_file()


def test_a_max_run_or_grace_out_of_range_is_refused_before_the_job(vt, scripts, channel, tmp_path):
    # --max-run 0 used to start the job and stop it at once, using up the run directory.
    for i, (flags, needle) in enumerate(
        (
            (["--max-run", "0"], "--max-run (max_run) must be more than 0 seconds"),
            (["--max-run", "-5"], "--max-run (max_run) must be more than 0 seconds"),
            (["--stop-grace", "-1"], "--stop-grace must be 0 or more seconds"),
        )
    ):
        out = tmp_path / f"run{i}"
        proc = vt("run", scripts / "train.py", "--channel", channel, "-o", out, *flags)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not out.exists()


def test_a_bad_max_run_or_a_binary_file_in_the_notebook_yaml_is_one_line(
    vt, scripts, channel, tmp_path
):
    config = tmp_path / "job.yaml"
    config.write_text(f"estimator:\n  entry_point: {scripts / 'train.py'}\n  max_run: soon\n")
    proc = vt("run", "--job-config", config, "--channel", channel, "-o", tmp_path / "r")
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip() == "error: --max-run (max_run) must be a number of seconds, got 'soon'"
    )
    binary = tmp_path / "photo.yaml"
    binary.write_bytes(b"\xff\xd8\xff\xe0 not text")
    for flag in ("--job-config", "--metric-definitions"):
        args = [scripts / "train.py"] if flag != "--job-config" else []
        proc = vt("run", *args, flag, binary, "-o", tmp_path / "r")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().startswith("error: ") and "not UTF-8 text" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_an_output_inside_a_channel_is_refused_and_the_channel_untouched(
    vt, scripts, channel, tmp_path
):
    # The job's model/, logs/ and input/config/ landed in the data: the script (and every
    # later job on the folder) read them as training files.
    before = sorted(p.relative_to(channel) for p in channel.rglob("*"))
    for output in (channel / "run1", channel):
        proc = vt("run", scripts / "train.py", "--channel", f"training={channel}", "-o", output)
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert (
            line.startswith("error: --output ") and f"inside channel training ({channel})" in line
        )
    assert sorted(p.relative_to(channel) for p in channel.rglob("*")) == before


def test_a_hyperparameter_given_twice_is_refused(vt, scripts, channel, tmp_path):
    # Like a channel given twice: the last value was used, the first looked set.
    proc = vt("run", scripts / "train.py", "--channel", channel, "-o", tmp_path / "r",
              "--hp", "lr=0.1", "--hp", "epochs=2", "--hp", "lr=0.01")  # fmt: skip
    assert proc.returncode == 2 and not (tmp_path / "r").exists()
    assert proc.stderr.strip() == "error: hyperparameter 'lr' given twice (--hp lr=...)"
