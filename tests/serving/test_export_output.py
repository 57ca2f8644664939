"""``visiontune export --output`` onto an existing file: an earlier export is replaced, any other
file (the model's own weights first of all) is refused in one line and left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import run_cli

from visiontune.errors import UserError
from visiontune.export import export_model, onnx_version
from visiontune.models.artifact import load_model_dir


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


def test_export_onto_the_model_weights_is_refused_in_one_line(model_copy):
    weights = model_copy / "model.safetensors"
    before = weights.read_bytes()

    # Before, this wrote the ONNX file over the weights; evaluate then said they were damaged.
    proc = run_cli("export", str(model_copy), "--output", str(weights))

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"--output {weights} exists and is not a visiontune onnx export" in lines[0]
    assert weights.read_bytes() == before
    assert load_model_dir(model_copy, "cpu").class_ids


def test_another_format_or_any_other_file_is_kept(model_copy, tmp_path):
    onnx_file = export_model(model_copy, "onnx")
    notes = tmp_path / "notes.pt"
    notes.write_text("not a model")
    for fmt, target in (
        ("torchscript", onnx_file),  # an ONNX export is not a TorchScript one
        ("torchscript", model_copy / "model.json"),
        ("onnx", notes),
    ):
        before = target.read_bytes()
        with pytest.raises(UserError, match=f"not a visiontune {fmt} export"):
            export_model(model_copy, fmt, target)
        assert target.read_bytes() == before


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_replaces_its_own_earlier_export(model_copy, tmp_path, fmt):
    target = tmp_path / f"exported.{fmt}"
    export_model(model_copy, fmt, target)
    target.write_bytes(target.read_bytes())  # the same export, copied back by the user

    assert export_model(model_copy, fmt, target) == target

    if fmt == "onnx":
        assert onnx_version(target) == load_model_dir(model_copy, "cpu").version
