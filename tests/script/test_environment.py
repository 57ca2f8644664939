"""The training environment a script sees, checked against the SageMaker training toolkit's
documentation (ENVIRONMENT_VARIABLES.md) and its ``environment``/``mapping`` modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from visiontune.script.environment import TrainingEnvironment, to_cmd_args
from visiontune.script.job import ScriptJob, run_job


@pytest.fixture
def dumped(scripts, channel, tmp_path) -> tuple[dict, Path]:
    test_channel = tmp_path / "test-data"
    test_channel.mkdir()
    job = ScriptJob(
        entry_point="env_dump.py",
        source_dir=scripts,
        output=tmp_path / "run",
        hyperparameters={"learning-rate": 0.0001, "batch-size": 256, "communicator": "pure_nccl"},
        channels={"training": str(channel), "testing": str(test_channel)},
        extra_args=["--verbose"],
        job_name="my-job",
        echo=False,
    )
    result = run_job(job)
    assert result.ok, result.failure_reason
    run_dir = tmp_path / "run"
    return json.loads((run_dir / "output" / "data" / "env.json").read_text()), run_dir


def test_hyperparameters_arrive_as_sorted_dash_dash_arguments(dumped):
    data, _ = dumped
    assert data["argv"] == [
        "--batch-size", "256", "--communicator", "pure_nccl", "--learning-rate", "0.0001",
        "--verbose",
    ]  # fmt: skip


def test_documented_environment_variables(dumped, channel, scripts, tmp_path):
    data, run_dir = dumped
    env = data["env"]
    assert env["SM_MODEL_DIR"] == str(run_dir / "model")
    assert json.loads(env["SM_CHANNELS"]) == ["testing", "training"]
    assert env["SM_CHANNEL_TRAINING"] == str(channel)  # the folder itself, used in place
    assert env["SM_CHANNEL_TESTING"] == str(tmp_path / "test-data")
    # Non-string values are compact JSON with sorted keys; strings are as they are.
    assert env["SM_HPS"] == '{"batch-size":256,"communicator":"pure_nccl","learning-rate":0.0001}'
    assert env["SM_HP_LEARNING-RATE"] == "0.0001"
    assert env["SM_HP_BATCH-SIZE"] == "256"
    assert env["SM_HP_COMMUNICATOR"] == "pure_nccl"
    assert env["SM_CURRENT_HOST"] == "algo-1"
    assert json.loads(env["SM_HOSTS"]) == ["algo-1"]
    assert int(env["SM_NUM_CPUS"]) == os.cpu_count()
    assert int(env["SM_NUM_GPUS"]) >= 0
    assert env["SM_LOG_LEVEL"] == "20"
    assert env["SM_NETWORK_INTERFACE_NAME"] == "eth0"
    assert json.loads(env["SM_USER_ARGS"]) == data["argv"]
    assert env["SM_INPUT_DIR"] == str(run_dir / "input")
    assert env["SM_INPUT_CONFIG_DIR"] == str(run_dir / "input" / "config")
    assert env["SM_OUTPUT_DIR"] == str(run_dir / "output")
    assert env["SM_OUTPUT_DATA_DIR"] == str(run_dir / "output" / "data")
    assert env["SM_MODULE_NAME"] == "env_dump" and env["SM_USER_ENTRY_POINT"] == "env_dump.py"
    assert env["SM_MODULE_DIR"] == str(scripts) == data["cwd"]  # runs from its source dir
    assert json.loads(env["SM_RESOURCE_CONFIG"])["hosts"] == ["algo-1"]
    assert env["TRAINING_JOB_NAME"] == "my-job"
    file_mode = {
        "RecordWrapperType": "None",
        "S3DistributionType": "FullyReplicated",
        "TrainingInputMode": "File",
    }
    assert json.loads(env["SM_INPUT_DATA_CONFIG"]) == {"testing": file_mode, "training": file_mode}

    training_env = json.loads(env["SM_TRAINING_ENV"])
    # The keys of the documented example, with this job's values.
    for key in (
        "channel_input_dirs", "current_host", "framework_module", "hosts", "hyperparameters",
        "input_config_dir", "input_data_config", "input_dir", "job_name", "log_level",
        "model_dir", "module_dir", "module_name", "network_interface_name", "num_cpus",
        "num_gpus", "output_data_dir", "output_dir", "resource_config",
    ):  # fmt: skip
        assert key in training_env, key
    assert training_env["channel_input_dirs"] == {
        "testing": str(tmp_path / "test-data"),
        "training": str(channel),
    }
    assert training_env["hyperparameters"] == {
        "batch-size": 256,
        "communicator": "pure_nccl",
        "learning-rate": 0.0001,
    }
    assert training_env["job_name"] == "my-job"
    assert training_env["model_dir"] == env["SM_MODEL_DIR"]


def test_config_files_as_sagemaker_writes_them(dumped, scripts):
    data, run_dir = dumped
    files = data["files"]
    # The SDK JSON-encodes every value; the sagemaker_* entries are framework parameters.
    assert files["hyperparameters.json"] == {
        "learning-rate": "0.0001",
        "batch-size": "256",
        "communicator": '"pure_nccl"',
        "sagemaker_program": '"env_dump.py"',
        "sagemaker_submit_directory": json.dumps(str(scripts)),
        "sagemaker_container_log_level": "20",
        "sagemaker_job_name": '"my-job"',
    } | ({"sagemaker_region": json.dumps(r)} if (r := _region()) else {})
    assert set(files["inputdataconfig.json"]) == {"training", "testing"}
    assert files["inputdataconfig.json"]["training"]["TrainingInputMode"] == "File"
    resource = files["resourceconfig.json"]
    assert resource["current_host"] == "algo-1" and resource["hosts"] == ["algo-1"]
    assert resource["instance_groups"][0]["hosts"] == ["algo-1"]
    assert (run_dir / "output" / "intermediate").is_dir()


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def test_cmd_args_follow_the_toolkits_mapping():
    assert to_cmd_args({"lr": 0.01, "b": True, "opts": {"y": 2, "x": 1}, "name": None}) == [
        "-b", "True", "--lr", "0.01", "--name", "", "--opts", "x=1,y=2",
    ]  # fmt: skip


def test_sagemaker_names_cannot_be_hyperparameters(tmp_path):
    from visiontune.errors import UserError

    with pytest.raises(UserError, match="sagemaker_program"):
        TrainingEnvironment(tmp_path, "t.py", tmp_path, {"sagemaker_program": "x.py"})
