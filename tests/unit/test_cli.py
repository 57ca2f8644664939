"""The command line as a user meets it: through the real console entry point, in a subprocess.

Usage mistakes end in click's usage message and one error line (exit 2), never a traceback;
help pages show defaults and no ``<bool>`` beside flags; piped tables keep every cell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def visiontune(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m visiontune ARGS`` with this environment (the worktree's source first)."""
    return subprocess.run(
        [sys.executable, "-m", "visiontune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--epoch", "3"], "No such option: --epoch"),
        (["train", "--epochs", "three"], "'--epochs'"),
        (["evaluate"], "Missing argument"),
        (["trian"], "No such command 'trian'"),
        (["predict", "x.jpg", "--model", "m", "--top-k", "0"], "'--top-k'"),
        (["evaluate", "m", "--data", "d", "--batch-size", "0"], "'--batch-size'"),
    ],
)
def test_usage_mistakes_print_usage_and_one_error_line(args, says):
    r = visiontune(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert r.stderr.startswith("Usage:")


def test_predict_on_a_folder_points_to_transform(tmp_path):
    r = visiontune("predict", tmp_path, "--model", tmp_path / "model")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "is a folder" in r.stderr and "visiontune transform" in r.stderr


def test_help_shows_defaults_and_no_type_beside_flags():
    r = visiontune("evaluate", "--help")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for flag in ("--json", "--help"):
        line = next(x for x in lines if f" {flag} " in x)
        assert "<bool>" not in line, line
    split_line = next(x for x in lines if "--split" in x)
    assert "<str>" in split_line  # options that take a value still show their type
    assert "[default: test]" in r.stdout and "[default: 64]" in r.stdout
    assert "--install-completion" in visiontune("--help").stdout


def test_train_help_shows_the_config_defaults():
    r = visiontune("train", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    batch = next(x for x in lines if "--batch-size" in x)
    assert "[default: (32)]" in batch
    assert "[default: (efficientnet_lite0)]" in next(x for x in lines if " --model " in x)
    assert "<bool>" not in next(x for x in lines if " --debug " in x)


def test_piped_tables_keep_every_cell_and_json_is_offered():
    r = visiontune("models", env={"COLUMNS": ""})  # piped: not a terminal
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout
    listed = json.loads(visiontune("models", "--json").stdout)
    lite = next(m for m in listed if m["name"] == "efficientnet_lite0")
    # The longest description must appear whole on its row, not cut at 80 columns.
    assert any(lite["description"] in line for line in r.stdout.splitlines())
    assert {m["name"] for m in listed} >= {"tiny_cnn", "resnet50"}


def test_models_says_which_backbones_are_offline_ready(tmp_path):
    """Weights on disk now (a package, or torchvision's file in the hub cache) vs a download."""
    import torchvision

    url = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1").url
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / url.rsplit("/", 1)[-1]).write_bytes(b"cached")  # only its presence counts
    env = {"TORCH_HOME": str(tmp_path)}
    listed = {m["name"]: m for m in json.loads(visiontune("models", "--json", env=env).stdout)}
    ready = {name for name, m in listed.items() if m["offline_ready"]}
    assert {"resnet18", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
            "tiny_cnn"} <= ready  # fmt: skip
    assert "resnet50" not in ready and listed["resnet50"]["weights_action"] == "download"
    assert str(checkpoints) in listed["resnet18"]["weights_status"]
    assert {listed[f"efficientnet_lite{i}"]["input_size"] for i in range(3)} == {224, 240, 260}
    assert listed["efficientnet_lite1"]["license"] == "Apache-2.0"
    r = visiontune("models", env={**env, "COLUMNS": ""})
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.count("│") > 2}
    assert "no (download)" in rows["resnet50"] and "no (download)" not in rows["resnet18"]
    assert f"{len(ready)} of {len(listed)} backbones are offline-ready" in r.stdout


def test_piped_data_check_keeps_long_class_names(tmp_path):
    from helpers import write_dataset

    long_names = ("a_rather_long_class_name_" * 3 + "one", "a_rather_long_class_name_" * 3 + "two")
    data = write_dataset(tmp_path / "data", classes=long_names, per_class=2)
    r = visiontune("data", "check", data, env={"COLUMNS": ""})
    assert r.returncode == 0, r.stderr
    assert all(name in r.stdout for name in long_names), r.stdout
    assert "…" not in r.stdout


def test_shell_completion_completes_commands_and_options():
    script = Path(sys.executable).parent / "visiontune"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable} (package not installed)")
    env = {**os.environ, "_VISIONTUNE_COMPLETE": "complete_bash", "COMP_CWORD": "1"}
    r = subprocess.run(
        [script], env={**env, "COMP_WORDS": "visiontune tr"}, capture_output=True, text=True
    )
    assert r.stdout.split() == ["train", "transform"], r.stderr
    r = subprocess.run(
        [script],
        env={**env, "COMP_WORDS": "visiontune evaluate --sp", "COMP_CWORD": "2"},
        capture_output=True,
        text=True,
    )
    assert r.stdout.split() == ["--split"], r.stderr
