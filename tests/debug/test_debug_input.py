"""Bad input to `visiontune debug` and to a run's debugger: section, through the console entry
point: one line on stderr, exit code 2, nothing half-done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY_TRAIN, write_dataset
from loop_harness import cfg_for, run_train

SRC = Path(__file__).resolve().parents[2] / "src"


def visiontune(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "visiontune", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    [line] = out.stderr.strip().splitlines()
    return line


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("debug-input") / "data", per_class=4)


@pytest.fixture(scope="module")
def debugged_run(data) -> Path:
    run = data.parent / "run"
    run_train(cfg_for(data, run, epochs=1, debugger={"save_interval": 1}))
    return run


def test_a_rule_parameter_of_the_wrong_kind_is_one_line(debugged_run):
    out = visiontune("debug", str(debugged_run), "--set", "LossNotDecreasing.num_steps=abc")
    assert one_error_line(out) == "error: LossNotDecreasing.num_steps must be a number, got 'abc'"
    # SageMaker passes rule parameters as strings: "4" is the number 4.
    ok = visiontune("debug", str(debugged_run), "--set", "LossNotDecreasing.num_steps='4'")
    assert ok.returncode == 0 and "LossNotDecreasing" in ok.stdout, ok.stderr


@pytest.mark.parametrize(
    ("debugger", "line"),
    [
        (
            {"rules": [{"name": "LossNotDecreasing", "parameters": {"num_steps": "abc"}}]},
            "error: invalid config value for 'debugger.rules': "
            "LossNotDecreasing.num_steps must be a number, got 'abc'",
        ),
        (
            {"activations_regex": "[(", "collections": ["activations"]},
            "error: invalid config value for 'debugger.activations_regex': not a valid regular "
            "expression (unterminated character set at position 0): '[('",
        ),
    ],
)
def test_a_bad_debugger_section_stops_train_before_it_starts(data, tmp_path, debugger, line):
    # The rule trained along with a warning and judged nothing; the regex was a traceback.
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**TINY_TRAIN, "epochs": 1, "debugger": debugger}))
    run = tmp_path / "run"
    out = visiontune("train", "--data", str(data), "--output", str(run), "--config", str(config))
    assert one_error_line(out) == line
    assert not run.exists()


def test_a_bad_tensor_regex_is_one_line(debugged_run):
    for args in (["--tensors", "[("], ["--plot", "--plot-tensors", "[("]):
        out = visiontune("debug", str(debugged_run), *args)
        assert one_error_line(out) == (
            "error: not a valid regular expression (unterminated character set at position 0): '[('"
        )


def test_an_unknown_reduction_is_refused_not_left_out_of_the_page(debugged_run, tmp_path):
    page = tmp_path / "plots.html"
    args = ["--plot", "--plot-tensors", "loss", "--reduction", "median", "-o", str(page)]
    out = visiontune("debug", str(debugged_run), *args)
    assert one_error_line(out) == (
        "error: unknown reduction 'median' "
        "(one of: min, max, mean, std, variance, l1, l2, zero_frac, nan, inf)"
    )
    assert not page.exists()


def test_an_s3_run_without_credentials_is_one_line(tmp_path):
    no_credentials = {
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
        "AWS_PROFILE": "", "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true",
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({k: v for k, v in no_credentials.items() if v})
    uri = "s3://runs/one"
    out = visiontune("debug", uri, "--endpoint-url", "http://127.0.0.1:9", env=env)
    assert one_error_line(out).startswith(f"error: no AWS credentials found for {uri}: ")


def test_a_run_copied_in_part_is_one_line_naming_the_file(debugged_run, tmp_path):
    # Parts and meta.json are written atomically: a broken one is a copy cut short.
    for broken, line in (
        ("meta.json", "{} is not valid JSON (a copy cut short?)"),
        ("tensors/part-000001.parquet", "cannot read {} (a copy cut short?): "),
    ):
        run = tmp_path / broken.replace("/", "-")
        shutil.copytree(debugged_run, run)
        path = run / "debug" / broken
        path.write_bytes(path.read_bytes()[:20])
        out = visiontune("debug", str(run))
        assert one_error_line(out).startswith("error: " + line.format(path.resolve()))
