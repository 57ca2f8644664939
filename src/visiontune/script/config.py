"""Config files shaped like the notebook: what a user passes to ``PyTorch(...)``,
``HyperparameterTuner(...)`` and ``fit(...)``, so porting a notebook means copying values.

::

    estimator:                      # PyTorch(...)
      entry_point: train.py
      source_dir: .
      hyperparameters: {epochs: 3, batch-size: 32}
      metric_definitions:
        - {Name: average test loss, Regex: 'Test set: Average loss: ([0-9\\.]+)'}
      max_run: 3600
    tuner:                          # HyperparameterTuner(...)
      objective_metric_name: average test loss
      objective_type: Minimize
      hyperparameter_ranges:
        lr: ContinuousParameter(0.001, 0.1, scaling_type="Logarithmic")
        batch-size: CategoricalParameter([32, 64, 128])
        epochs: {IntegerParameter: {min_value: 2, max_value: 4}}
      max_jobs: 6
      max_parallel_jobs: 2
      strategy: Bayesian
      early_stopping_type: Auto
    inputs:                         # estimator.fit(inputs)
      training: s3://my-bucket/hymenoptera/train

Ranges may be written as the SDK's own call (a string, read with :mod:`ast`, never ``eval``),
as ``{ContinuousParameter: {min_value: ..., max_value: ..., scaling_type: ...}}``, or in
visiontune's space-file form (``{type: continuous, min: ..., max: ..., scaling: log}``).
Estimator arguments that only matter on AWS (``role``, ``instance_type``, ``instance_count``,
``framework_version``, ``py_version``, ...) are accepted and ignored, so a pasted call works.
"""

from __future__ import annotations

import ast
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune.errors import UserError
from visiontune.script.metrics import MetricDefinition, definitions_from_list
from visiontune.tuning.space import Param, SearchSpace

# Estimator/tuner arguments that describe AWS resources: accepted so a pasted call works.
AWS_ONLY = {
    "role",
    "instance_type",
    "instance_count",
    "framework_version",
    "py_version",
    "image_uri",
    "output_path",
    "sagemaker_session",
    "volume_size",
    "use_spot_instances",
    "max_wait",
    "checkpoint_s3_uri",
    "distribution",
    "debugger_hook_config",
    "profiler_config",
    "rules",
    "tags",
    "subnets",
    "security_group_ids",
    "environment",
    "base_tuning_job_name",
    "code_location",
    "dependencies",
    "enable_sagemaker_metrics",
}
ESTIMATOR_KEYS = {
    "entry_point",
    "source_dir",
    "hyperparameters",
    "metric_definitions",
    "max_run",
    "base_job_name",
}
TUNER_KEYS = {
    "objective_metric_name",
    "objective_type",
    "hyperparameter_ranges",
    "metric_definitions",
    "max_jobs",
    "max_parallel_jobs",
    "strategy",
    "early_stopping_type",
}
STRATEGIES = {"bayesian": "bayesian", "random": "random", "grid": "grid", "hyperband": "hyperband"}
RANGE_TYPES = {
    "ContinuousParameter": "continuous",
    "IntegerParameter": "integer",
    "CategoricalParameter": "categorical",
}
SCALING = {"auto": False, "linear": False, "logarithmic": True, "log": True}


# ---------------------------------------------------------------------------- ranges


def _call_arguments(name: str, text: str) -> tuple[str, list[Any], dict[str, Any]]:
    """``"ContinuousParameter(0.1, 1, scaling_type='Logarithmic')"`` -> its type and literals."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if (
        not isinstance(node, ast.Call)
        or not isinstance(node.func, ast.Name | ast.Attribute)
        or (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) not in RANGE_TYPES
    ):
        raise UserError(
            f"range {name}: {text!r} is not ContinuousParameter(...), IntegerParameter(...) "
            "or CategoricalParameter(...)"
        )
    func = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except ValueError:
        raise UserError(f"range {name}: the arguments of {text!r} must be plain values") from None
    return func, args, kwargs


def _bound(name: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"range {name}: bounds must be finite numbers, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise UserError(f"range {name}: IntegerParameter bounds must be whole, got {value!r}")
        return int(value)
    return float(value)


def _sdk_range(name: str, func: str, args: list[Any], kwargs: dict[str, Any]) -> Param:
    kind = RANGE_TYPES[func]
    if kind == "categorical":
        values = args[0] if args else kwargs.get("values")
        if not isinstance(values, list | tuple) or not values:
            raise UserError(f"range {name}: CategoricalParameter needs a non-empty list of values")
        if len({repr(v) for v in values}) != len(values):
            raise UserError(f"range {name}: CategoricalParameter values have duplicates")
        return Param(name, "categorical", values=tuple(values))
    names = ("min_value", "max_value", "scaling_type")
    given = dict(zip(names, args, strict=False)) | kwargs
    unknown = set(given) - set(names)
    if unknown or "min_value" not in given or "max_value" not in given:
        raise UserError(
            f"range {name}: {func} takes min_value, max_value and scaling_type"
            + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
        )
    integer = kind == "integer"
    low = _bound(name, given["min_value"], integer)
    high = _bound(name, given["max_value"], integer)
    if low > high:
        raise UserError(f"range {name}: min_value {low} > max_value {high}")
    scaling = str(given.get("scaling_type", "Auto"))
    if scaling.lower() == "reverselogarithmic":
        raise UserError(
            f"range {name}: ReverseLogarithmic scaling is not supported; use Linear or "
            "Logarithmic (on 1 - value, if that is what you tune)"
        )
    if scaling.lower() not in SCALING:
        raise UserError(
            f"range {name}: scaling_type must be Auto, Linear or Logarithmic, got {scaling!r}"
        )
    log = SCALING[scaling.lower()]
    if log and integer:
        raise UserError(f"range {name}: Logarithmic IntegerParameter is not supported; use Linear")
    if log and low <= 0:
        raise UserError(f"range {name}: Logarithmic scaling needs min_value > 0, got {low}")
    return Param(name, kind, low=low, high=high, log=log)  # type: ignore[arg-type]


def parse_range(name: str, spec: Any) -> Param:
    """One hyperparameter range in any of the three accepted forms (see the module docstring).

    Raises:
        UserError: a malformed range; the message names the hyperparameter.
    """
    if isinstance(spec, str):
        return _sdk_range(name, *_call_arguments(name, spec))
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in RANGE_TYPES:
        func, body = next(iter(spec.items()))
        if isinstance(body, list):
            return _sdk_range(name, func, [body] if func == "CategoricalParameter" else body, {})
        if not isinstance(body, dict):
            raise UserError(f"range {name}: {func} needs a mapping of its arguments")
        return _sdk_range(name, func, [], body)
    if isinstance(spec, dict) and "type" in spec:
        kind = str(spec["type"]).lower()
        func = {v: k for k, v in RANGE_TYPES.items()}.get(kind)
        if func is None:
            raise UserError(f"range {name}: type must be continuous, integer or categorical")
        if func == "CategoricalParameter":
            return _sdk_range(name, func, [spec.get("values")], {})
        scaling = {"log": "Logarithmic", "linear": "Linear"}.get(
            str(spec.get("scaling", "linear")).lower(), str(spec.get("scaling"))
        )
        return _sdk_range(name, func, [spec.get("min"), spec.get("max"), scaling], {})
    raise UserError(
        f"range {name}: write ContinuousParameter(min, max), IntegerParameter(min, max) or "
        "CategoricalParameter([...])"
    )


def parse_ranges(spec: Any) -> SearchSpace:
    """A script's search space: hyperparameter name (as the script spells it) -> range.

    Raises:
        UserError: an empty mapping or a malformed range.
    """
    if not isinstance(spec, dict) or not spec:
        raise UserError("hyperparameter_ranges: expected a non-empty mapping of name -> range")
    params = []
    for key, value in spec.items():
        name = str(key).strip()
        if not name or name.startswith("sagemaker_"):
            raise UserError(f"hyperparameter_ranges: {key!r} cannot be tuned")
        params.append(parse_range(name, value))
    return SearchSpace(tuple(params))


def load_ranges(path: str | Path) -> SearchSpace:
    """A space file of script hyperparameters (any accepted range form).

    Raises:
        UserError: a missing or malformed file.
    """
    data = _load_yaml(path, "space file")
    if isinstance(data, dict) and "hyperparameter_ranges" in data:
        data = data["hyperparameter_ranges"]
    return parse_ranges(data)


# ---------------------------------------------------------------------------- the notebook file


@dataclass
class NotebookConfig:
    """The estimator, tuner and inputs of a notebook, as read from one YAML file."""

    entry_point: str
    source_dir: Path | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metric_definitions: list[MetricDefinition] = field(default_factory=list)
    max_run: float | None = None
    base_job_name: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    objective_metric_name: str | None = None
    objective_type: str = "maximize"  # the SDK's default
    ranges: SearchSpace | None = None
    max_jobs: int | None = None
    max_parallel_jobs: int = 1
    strategy: str = "bayesian"
    early_stopping: str = "off"


def _load_yaml(path: str | Path, what: str = "config file") -> Any:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p} is not a YAML file (not UTF-8 text)") from None


def _check_keys(section: str, values: dict[str, Any], known: set[str]) -> None:
    for key in values:
        if key not in known and key not in AWS_ONLY:
            close = difflib.get_close_matches(str(key), sorted(known), n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"{section}: unknown argument {key!r}{hint}")


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise UserError(f"{name}: expected a mapping of {name} arguments")
    return value


def parse_inputs(inputs: Any) -> dict[str, str]:
    """``fit(inputs)``: one URI (the ``training`` channel) or a channel -> URI mapping."""
    if inputs is None:
        return {}
    if isinstance(inputs, str):
        return {"training": inputs}
    if isinstance(inputs, dict):
        out = {}
        for k, v in inputs.items():
            if isinstance(v, dict):  # TrainingInput(s3_data=...) written as a mapping
                v = v.get("s3_data") or v.get("uri")
            if not isinstance(v, str) or not v:
                raise UserError(f"inputs: channel {k!r} needs a folder or s3:// URI")
            out[str(k)] = v
        return out
    raise UserError("inputs: a folder/s3:// URI, or a mapping of channel name -> URI")


def parse_notebook_config(data: Any, base: Path | None = None) -> NotebookConfig:
    """Read the ``estimator``/``tuner``/``inputs`` mapping; relative paths are taken from ``base``
    (the file's folder).

    Raises:
        UserError: an unknown argument, a missing entry_point, or a malformed range.
    """
    if not isinstance(data, dict):
        raise UserError("config: expected a mapping with estimator:, tuner: and inputs:")
    unknown = set(data) - {"estimator", "tuner", "inputs"}
    if unknown:
        raise UserError(f"config: unknown section(s) {', '.join(sorted(map(str, unknown)))}")
    est, tuner = _section(data, "estimator"), _section(data, "tuner")
    _check_keys("estimator", est, ESTIMATOR_KEYS)
    _check_keys("tuner", tuner, TUNER_KEYS)
    if not est.get("entry_point"):
        raise UserError("estimator: entry_point is required")
    base = base or Path.cwd()
    source_dir = est.get("source_dir")
    hps = est.get("hyperparameters") or {}
    if not isinstance(hps, dict):
        raise UserError("estimator: hyperparameters must be a mapping")
    defs = definitions_from_list(
        est.get("metric_definitions") or [], "estimator.metric_definitions"
    )
    # The tuner may repeat or add definitions (HyperparameterTuner(metric_definitions=...)).
    names = {d.name for d in defs}
    for d in definitions_from_list(
        tuner.get("metric_definitions") or [], "tuner.metric_definitions"
    ):
        if d.name not in names:
            defs.append(d)
    cfg = NotebookConfig(
        entry_point=str(est["entry_point"]),
        source_dir=(base / source_dir) if source_dir else None,
        hyperparameters=dict(hps),
        metric_definitions=defs,
        max_run=est.get("max_run"),
        base_job_name=est.get("base_job_name"),
        inputs={
            k: v if "://" in v or Path(v).is_absolute() else str(base / v)
            for k, v in parse_inputs(data.get("inputs")).items()
        },
    )
    if tuner:
        cfg.objective_metric_name = tuner.get("objective_metric_name")
        if not cfg.objective_metric_name:
            raise UserError("tuner: objective_metric_name is required")
        cfg.objective_type = str(tuner.get("objective_type", "Maximize")).lower()
        if cfg.objective_type not in ("minimize", "maximize"):
            raise UserError("tuner: objective_type must be Minimize or Maximize")
        if cfg.objective_metric_name not in {d.name for d in defs}:
            raise UserError(
                f"tuner: objective_metric_name {cfg.objective_metric_name!r} is not one of the "
                f"metric_definitions ({', '.join(sorted(d.name for d in defs)) or 'none'})"
            )
        cfg.ranges = parse_ranges(tuner.get("hyperparameter_ranges"))
        cfg.max_jobs = int(tuner.get("max_jobs", 1))
        cfg.max_parallel_jobs = int(tuner.get("max_parallel_jobs", 1))
        if cfg.max_jobs < 1 or cfg.max_parallel_jobs < 1:
            raise UserError("tuner: max_jobs and max_parallel_jobs must be at least 1")
        strategy = str(tuner.get("strategy", "Bayesian")).lower()
        if strategy not in STRATEGIES:
            raise UserError("tuner: strategy must be Bayesian, Random, Grid or Hyperband")
        cfg.strategy = STRATEGIES[strategy]
        early = str(tuner.get("early_stopping_type", "Off")).lower()
        if early not in ("off", "auto"):
            raise UserError("tuner: early_stopping_type must be Off or Auto")
        cfg.early_stopping = early
    return cfg


def load_notebook_config(path: str | Path) -> NotebookConfig:
    """:func:`parse_notebook_config` of a YAML file.

    Raises:
        UserError: a missing or malformed file.
    """
    return parse_notebook_config(_load_yaml(path), Path(path).absolute().parent)
