"""The SageMaker training environment, laid out in a run directory instead of ``/opt/ml``.

A user's script mode ``entry_point`` reads its whole world from this environment: channels from
``SM_CHANNEL_<NAME>``, where to save the model from ``SM_MODEL_DIR``, hyperparameters as
``--name value`` arguments. Everything here follows the SageMaker training toolkit
(``sagemaker_training.environment`` and ``mapping``; ENVIRONMENT_VARIABLES.md):

* the run directory plays ``/opt/ml``: ``input/config/`` holds ``hyperparameters.json``,
  ``inputdataconfig.json`` and ``resourceconfig.json``; ``model/``, ``output/``,
  ``output/data/`` and ``output/intermediate/`` are created empty;
* ``hyperparameters.json`` holds every value JSON-encoded as a string, as the SageMaker Python
  SDK sends them (``{"lr": "0.01", "optimizer": "\\"sgd\\""}``), plus the SDK's ``sagemaker_*``
  entries, which are framework parameters and never reach the script as arguments;
* arguments: hyperparameters sorted by name, ``--name value`` (``-n`` for one-letter names),
  ``str()`` of the decoded value, a dict as ``k=v,k2=v2`` (``mapping.to_cmd_args``);
* ``SM_*`` variables: ``SM_`` + upper-cased key; strings as they are, anything else compact
  JSON with sorted keys (``mapping.to_env_vars``), so ``SM_HPS`` is a JSON object and
  ``SM_HP_LEARNING-RATE`` keeps the dash.

Channels are not copied: ``SM_CHANNEL_TRAINING`` names the local folder itself (or the cache
copy of an ``s3://`` prefix), which is what a script sees in SageMaker's File mode.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.errors import UserError
from visiontune.io import atomic_write_json

CURRENT_HOST = "algo-1"
INSTANCE_GROUP = "homogeneousCluster"
INSTANCE_TYPE = "local"  # what the toolkit itself writes outside SageMaker
NETWORK_INTERFACE = "eth0"
LOG_LEVEL = 20  # logging.INFO, the SDK's default container_log_level
# Hyperparameters with this prefix are the SDK's framework parameters, not the script's.
FRAMEWORK_PREFIX = "sagemaker_"
FILE_INPUT = {
    "TrainingInputMode": "File",
    "S3DistributionType": "FullyReplicated",
    "RecordWrapperType": "None",
}


def format_env_value(value: Any) -> str:
    """One ``SM_*`` value as the toolkit writes it: strings as is, ``None`` empty, else JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def to_env_vars(mapping: dict[str, Any]) -> dict[str, str]:
    """``{"model_dir": "/x"}`` -> ``{"SM_MODEL_DIR": "/x"}`` (``mapping.to_env_vars``)."""
    return {f"SM_{str(k).upper()}": format_env_value(v) for k, v in mapping.items() if k}


def _arg_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return "" if value is None else str(value)


def to_cmd_args(hyperparameters: dict[str, Any]) -> list[str]:
    """Hyperparameters as the script's arguments, in SageMaker's form (``mapping.to_cmd_args``).

    >>> to_cmd_args({"lr": 0.01, "batch-size": 64, "b": True})
    ['-b', 'True', '--batch-size', '64', '--lr', '0.01']
    """
    args: list[str] = []
    for key in sorted(hyperparameters):
        name = str(key)
        args += [f"--{name}" if len(name) > 1 else f"-{name}", _arg_value(hyperparameters[key])]
    return args


def encode_hyperparameters(hyperparameters: dict[str, Any]) -> dict[str, str]:
    """``hyperparameters.json`` as the SageMaker Python SDK writes it: each value JSON-encoded."""
    return {str(k): json.dumps(v) for k, v in hyperparameters.items()}


def decode_hyperparameters(encoded: dict[str, str]) -> dict[str, Any]:
    """The toolkit's reading of ``hyperparameters.json``: JSON-decode each value if it can."""
    out: dict[str, Any] = {}
    for k, v in encoded.items():
        try:
            out[k] = json.loads(v)
        except (ValueError, TypeError):
            out[k] = v
    return out


def count_gpus() -> int:
    """GPUs as the toolkit counts them (``nvidia-smi --list-gpus``); 0 without a driver.

    Counting through the driver, not torch, keeps a job's start fast.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run(
            [exe, "--list-gpus"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


@dataclass
class TrainingEnvironment:
    """What SageMaker would give a training container, rooted at ``base_dir`` (``/opt/ml``).

    Args:
        base_dir: the run directory.
        entry_point: the script's file name inside ``source_dir`` (``train.py``).
        source_dir: the folder the script runs from (SageMaker's ``/opt/ml/code``).
        hyperparameters: the script's hyperparameters (decoded values: numbers, strings...).
        channels: channel name -> local folder holding its data.
        job_name: the training job's name.
        num_gpus: GPUs to report (default: counted through the driver).
        num_cpus: CPUs to report (default: ``os.cpu_count()``).
        region: AWS region recorded as ``sagemaker_region`` when known.
    """

    base_dir: Path
    entry_point: str
    source_dir: Path
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    channels: dict[str, Path] = field(default_factory=dict)
    job_name: str = "visiontune-job"
    num_gpus: int | None = None
    num_cpus: int | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).absolute()
        self.source_dir = Path(self.source_dir).absolute()
        for name in self.channels:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise UserError(
                    f"channel name {name!r} must be letters, digits, '-', '_' or '.' "
                    "(as SageMaker's ChannelName)"
                )
        framework = [k for k in self.hyperparameters if str(k).startswith(FRAMEWORK_PREFIX)]
        if framework:
            raise UserError(
                f"hyperparameter {framework[0]!r}: names starting with {FRAMEWORK_PREFIX!r} "
                "are SageMaker's own and never reach the script"
            )
        if self.num_gpus is None:
            self.num_gpus = count_gpus()
        if self.num_cpus is None:
            self.num_cpus = os.cpu_count() or 1

    # -------------------------------------------------------------------- the /opt/ml layout

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def input_config_dir(self) -> Path:
        return self.input_dir / "config"

    @property
    def model_dir(self) -> Path:
        return self.base_dir / "model"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def output_data_dir(self) -> Path:
        return self.output_dir / "data"

    @property
    def output_intermediate_dir(self) -> Path:
        return self.output_dir / "intermediate"

    @property
    def module_name(self) -> str:
        return self.entry_point[:-3] if self.entry_point.endswith(".py") else self.entry_point

    # -------------------------------------------------------------------- the config files

    def framework_parameters(self) -> dict[str, Any]:
        """The ``sagemaker_*`` entries the SDK adds to ``hyperparameters.json``."""
        params: dict[str, Any] = {
            "sagemaker_program": self.entry_point,
            "sagemaker_submit_directory": str(self.source_dir),
            "sagemaker_container_log_level": LOG_LEVEL,
            "sagemaker_job_name": self.job_name,
        }
        if self.region:
            params["sagemaker_region"] = self.region
        return params

    def resource_config(self) -> dict[str, Any]:
        """``resourceconfig.json``: one host, one homogeneous instance group."""
        return {
            "current_host": CURRENT_HOST,
            "current_instance_type": INSTANCE_TYPE,
            "current_group_name": INSTANCE_GROUP,
            "hosts": [CURRENT_HOST],
            "instance_groups": [
                {
                    "instance_group_name": INSTANCE_GROUP,
                    "instance_type": INSTANCE_TYPE,
                    "hosts": [CURRENT_HOST],
                }
            ],
            "network_interface_name": NETWORK_INTERFACE,
        }

    def input_data_config(self) -> dict[str, dict[str, str]]:
        """``inputdataconfig.json``: every channel in File mode, fully replicated."""
        return {name: dict(FILE_INPUT) for name in sorted(self.channels)}

    def channel_input_dirs(self) -> dict[str, str]:
        return {name: str(Path(path).absolute()) for name, path in sorted(self.channels.items())}

    def training_env(self) -> dict[str, Any]:
        """``SM_TRAINING_ENV``: every property of the toolkit's ``Environment``."""
        resource = self.resource_config()
        hosts = resource["hosts"]
        return {
            "additional_framework_parameters": {},
            "channel_input_dirs": self.channel_input_dirs(),
            "current_host": CURRENT_HOST,
            "current_instance_group": INSTANCE_GROUP,
            "current_instance_group_hosts": hosts,
            "current_instance_type": INSTANCE_TYPE,
            "distribution_hosts": [],
            "distribution_instance_groups": [],
            "framework_module": None,
            "hosts": hosts,
            "hyperparameters": dict(self.hyperparameters),
            "input_config_dir": str(self.input_config_dir),
            "input_data_config": self.input_data_config(),
            "input_dir": str(self.input_dir),
            "instance_groups": [INSTANCE_GROUP],
            "instance_groups_dict": {
                g["instance_group_name"]: g for g in resource["instance_groups"]
            },
            "is_hetero": False,
            "is_master": True,
            "is_modelparallel_enabled": None,
            "job_name": self.job_name,
            "log_level": LOG_LEVEL,
            "master_hostname": CURRENT_HOST,
            "model_dir": str(self.model_dir),
            "module_dir": str(self.source_dir),
            "module_name": self.module_name,
            "network_interface_name": NETWORK_INTERFACE,
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "num_neurons": 0,
            "output_data_dir": str(self.output_data_dir),
            "output_dir": str(self.output_dir),
            "output_intermediate_dir": str(self.output_intermediate_dir),
            "resource_config": resource,
            "user_entry_point": self.entry_point,
        }

    def cmd_args(self) -> list[str]:
        """The script's arguments: the hyperparameters in SageMaker's ``--name value`` form."""
        return to_cmd_args(self.hyperparameters)

    def env_vars(self, extra_args: list[str] | None = None) -> dict[str, str]:
        """Every ``SM_*`` variable the toolkit sets (``Environment.to_env_vars``), plus
        ``TRAINING_JOB_NAME`` and ``SAGEMAKER_BASE_DIR`` (so a script that imports
        ``sagemaker_training`` reads this run's config files, not ``/opt/ml``).
        """
        resource = self.resource_config()
        training_env = self.training_env()
        env: dict[str, Any] = {
            "hosts": resource["hosts"],
            "network_interface_name": NETWORK_INTERFACE,
            "hps": dict(self.hyperparameters),
            "user_entry_point": self.entry_point,
            "framework_params": {},
            "resource_config": resource,
            "input_data_config": self.input_data_config(),
            "output_data_dir": str(self.output_data_dir),
            "channels": sorted(self.channels),
            "current_host": CURRENT_HOST,
            "current_instance_type": INSTANCE_TYPE,
            "current_instance_group": INSTANCE_GROUP,
            "current_instance_group_hosts": resource["hosts"],
            "instance_groups": [INSTANCE_GROUP],
            "instance_groups_dict": training_env["instance_groups_dict"],
            "distribution_instance_groups": [],
            "is_hetero": False,
            "module_name": self.module_name,
            "log_level": LOG_LEVEL,
            "framework_module": None,
            "input_dir": str(self.input_dir),
            "input_config_dir": str(self.input_config_dir),
            "output_dir": str(self.output_dir),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "model_dir": str(self.model_dir),
            "module_dir": str(self.source_dir),
            "training_env": training_env,
            "user_args": self.cmd_args() + list(extra_args or []),
            "output_intermediate_dir": str(self.output_intermediate_dir),
        }
        for name, path in self.channel_input_dirs().items():
            env[f"channel_{name}"] = path
        for key, value in self.hyperparameters.items():
            env[f"hp_{key}"] = value
        out = to_env_vars(env)
        out["TRAINING_JOB_NAME"] = self.job_name
        out["SAGEMAKER_BASE_DIR"] = str(self.base_dir)
        return out

    def write(self) -> None:
        """Create the directories and the three config files, as SageMaker does at start."""
        for d in (
            self.input_config_dir,
            self.model_dir,
            self.output_data_dir,
            self.output_intermediate_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
        encoded = encode_hyperparameters({**self.hyperparameters, **self.framework_parameters()})
        atomic_write_json(self.input_config_dir / "hyperparameters.json", encoded)
        atomic_write_json(self.input_config_dir / "inputdataconfig.json", self.input_data_config())
        atomic_write_json(self.input_config_dir / "resourceconfig.json", self.resource_config())
