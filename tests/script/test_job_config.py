"""The notebook-shaped YAML: values copied from PyTorch(...), HyperparameterTuner(...), fit(...)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiontune.errors import UserError
from visiontune.script.config import load_notebook_config, parse_range

NOTEBOOK = """\
estimator:
  entry_point: train.py
  source_dir: {scripts}
  role: arn:aws:iam::111122223333:role/SageMakerRole   # AWS-only: accepted, ignored
  instance_type: ml.m5.xlarge
  instance_count: 1
  framework_version: "2.1"
  py_version: py310
  hyperparameters: {{epochs: 2, batch-size: 32}}
  metric_definitions:
    - {{Name: average test loss, Regex: 'Test set: Average loss: ([0-9\\.]+)'}}
tuner:
  objective_metric_name: average test loss
  objective_type: Minimize
  hyperparameter_ranges:
    lr: ContinuousParameter(0.001, 0.1, scaling_type="Logarithmic")
    optimizer: CategoricalParameter(["sgd", "adam"])
    epochs-extra: {{IntegerParameter: {{min_value: 1, max_value: 3}}}}
  max_jobs: 6
  max_parallel_jobs: 2
  strategy: Random
  early_stopping_type: Auto
inputs:
  training: {data}
"""


def test_notebook_values_map_onto_the_job(scripts, channel, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(NOTEBOOK.format(scripts=scripts, data=channel))
    cfg = load_notebook_config(path)
    assert cfg.entry_point == "train.py" and cfg.source_dir == scripts
    assert cfg.hyperparameters == {"epochs": 2, "batch-size": 32}
    assert cfg.inputs == {"training": str(channel)}
    assert (cfg.objective_metric_name, cfg.objective_type) == ("average test loss", "minimize")
    assert (cfg.max_jobs, cfg.max_parallel_jobs, cfg.strategy, cfg.early_stopping) == (
        6,
        2,
        "random",
        "auto",
    )
    lr, opt, extra = cfg.ranges.params
    assert (lr.type, lr.low, lr.high, lr.log) == ("continuous", 0.001, 0.1, True)
    assert opt.values == ("sgd", "adam")
    assert (extra.name, extra.type, extra.low, extra.high) == ("epochs-extra", "integer", 1, 3)


def test_visiontune_run_takes_the_notebook_file(vt, scripts, channel, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(NOTEBOOK.format(scripts=scripts, data=channel))
    proc = vt("run", "--job-config", path, "--hp", "lr=0.01", "-o", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["hyperparameters"] == {"epochs": 2, "batch-size": 32, "lr": 0.01}
    assert job["final_metrics"] == {"average test loss": 0.5}  # (log10(0.01)+2)^2 + 1/2


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ContinuousParameter(0.1, 1)", ("continuous", 0.1, 1.0, False)),
        ("ContinuousParameter(min_value=1e-4, max_value=1e-1, scaling_type='Logarithmic')",
         ("continuous", 1e-4, 0.1, True)),
        ("IntegerParameter(16, 256, scaling_type='Linear')", ("integer", 16, 256, False)),
        ({"type": "continuous", "min": 0.01, "max": 1, "scaling": "log"},
         ("continuous", 0.01, 1.0, True)),
        ({"ContinuousParameter": [0.2, 0.8]}, ("continuous", 0.2, 0.8, False)),
    ],
)  # fmt: skip
def test_range_forms(spec, expected):
    p = parse_range("x", spec)
    assert (p.type, p.low, p.high, p.log) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ContinuousParameter(1, 0.1)", "min_value 1.0 > max_value 0.1"),
        ("ContinuousParameter(0, 1, scaling_type='Logarithmic')", "needs min_value > 0"),
        ("ContinuousParameter(0.1, 1, scaling_type='ReverseLogarithmic')", "not supported"),
        ("__import__('os').system('true')", "is not ContinuousParameter"),
        ("CategoricalParameter([])", "non-empty list"),
        ("IntegerParameter(1.5, 3)", "must be whole"),
    ],
)
def test_bad_ranges_are_one_line(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_range("x", spec)


def test_unknown_arguments_and_objectives_are_caught(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("estimator: {entry_point: t.py, hyperparameter: {lr: 1}}\n")
    with pytest.raises(UserError, match="did you mean hyperparameters"):
        load_notebook_config(bad)
    bad.write_text(
        "estimator: {entry_point: t.py, metric_definitions: [{Name: acc, Regex: 'a: (\\d+)'}]}\n"
        "tuner: {objective_metric_name: loss, hyperparameter_ranges: "
        "{lr: 'ContinuousParameter(0.1, 1)'}}\n"
    )
    with pytest.raises(UserError, match="'loss' is not one of the metric_definitions"):
        load_notebook_config(bad)


def test_the_shipped_example_parses():
    example = Path(__file__).resolve().parents[2] / "examples" / "script_mode" / "job.yaml"
    cfg = load_notebook_config(example)
    assert cfg.entry_point == "train.py" and cfg.ranges is not None
    assert (example.parent / cfg.entry_point).is_file()
