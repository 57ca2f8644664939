"""One contract every runtime passes, torch/ONNX parity, and ``visiontune export``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from visiontune.serving.runtimes import RUNTIMES, Runtime, load_runtime


def batch_of(image_bytes, indices, size=64) -> torch.Tensor:
    from visiontune.data.transforms import Preprocess
    from visiontune.inference import preprocess_batch

    preprocess = Preprocess(64, 1.0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 16)
    images = [Image.open(io.BytesIO(image_bytes(i, size))).convert("RGB") for i in indices]
    return preprocess_batch(images, preprocess)


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    """Plain fp32 eager torch, straight from the model directory: the numbers to match."""
    from visiontune.models.artifact import load_model_dir

    return load_model_dir(model_dir).model


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_runtime_contract(name, model_dir, reference, image_bytes, classes):
    if name == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    runtime = load_runtime(name, model_dir, device="cpu", precision="fp32", threads=1)
    assert isinstance(runtime, Runtime) and runtime.name == name
    assert runtime.info.class_names == classes and runtime.info.preprocess.input_size == 64

    batch = batch_of(image_bytes, range(5))
    probs = runtime.predict(batch)
    assert probs.shape == (5, len(classes)) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    # Each row is that image's answer, whatever else shares its batch (dynamic batch axis).
    for i in range(5):
        assert torch.allclose(runtime.predict(batch[i : i + 1])[0], probs[i], atol=1e-5)
    # Same top-1 and probabilities as eager fp32 torch.
    with torch.no_grad():
        expected = torch.softmax(reference(batch), 1)
    assert torch.equal(probs.argmax(1), expected.argmax(1))
    assert torch.allclose(probs, expected, atol=1e-4)


def test_bf16_autocast_keeps_top1_and_stays_close(model_dir, image_bytes):
    fp32 = load_runtime("torch", model_dir, device="cpu", precision="fp32")
    bf16 = load_runtime("torch", model_dir, device="cpu", precision="bf16")
    batch = batch_of(image_bytes, range(5))
    a, b = fp32.predict(batch), bf16.predict(batch)
    assert torch.allclose(a, b, atol=0.03)


def test_unknown_runtime_is_a_one_line_user_error(model_dir):
    from visiontune.errors import UserError

    with pytest.raises(UserError, match=r"unknown runtime 'tensorrt'; use one of"):
        load_runtime("tensorrt", model_dir)


def test_export_cli_writes_onnx_and_torchscript_with_dynamic_batch(
    model_dir, tmp_path, image_bytes, reference
):
    import onnxruntime as ort

    from visiontune.cli import app
    from visiontune.export import onnx_version

    runner = CliRunner()
    onnx_path = tmp_path / "exported.onnx"
    result = runner.invoke(
        app, ["export", str(model_dir), "--format", "onnx", "--output", str(onnx_path)]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {onnx_path}" in result.output
    assert onnx_version(onnx_path) == load_runtime("torch", model_dir).info.version

    batch = batch_of(image_bytes, range(3))
    with torch.no_grad():
        expected = reference(batch)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        (logits,) = session.run(None, {"input": batch[:n].numpy()})
        assert torch.allclose(torch.from_numpy(logits), expected[:n], atol=1e-4)

    script_path = tmp_path / "model.torchscript.pt"
    result = runner.invoke(
        app, ["export", str(model_dir), "--format", "torchscript", "--output", str(script_path)]
    )
    assert result.exit_code == 0, result.output
    with pytest.warns(FutureWarning):  # torch.jit.load itself is deprecated upstream
        scripted = torch.jit.load(str(script_path))
    assert torch.allclose(scripted(batch), expected, atol=1e-5)

    bad = runner.invoke(app, ["export", str(model_dir), "--format", "tflite"])
    assert bad.exit_code != 0
    assert "unknown export format 'tflite'" in str(bad.exception) + bad.output


def fastest_installed() -> str:
    import importlib.util

    for module, runtime in (("openvino", "openvino"), ("onnxruntime", "onnx")):
        if importlib.util.find_spec(module) is not None:
            return runtime
    return "torch"


def test_the_default_runtime_on_cpu_is_the_fastest_installed_with_the_same_top1(
    model_dir, reference, image_bytes
):
    default = load_runtime("auto", model_dir, device="cpu")
    assert default.name == fastest_installed()
    batch = batch_of(image_bytes, range(6))
    with torch.no_grad():
        expected = torch.softmax(reference(batch), dim=1)
    assert torch.equal(default.predict(batch).argmax(1), expected.argmax(1))


def test_auto_falls_back_to_onnxruntime_then_torch(model_dir, monkeypatch):
    import sys

    from visiontune.serving.runtimes import resolve_runtime

    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails: not installed
    if fastest_installed() != "torch":
        assert resolve_runtime("auto", "cpu") == "onnx"
    assert resolve_runtime("auto", "cpu", "bf16") == "torch"  # onnxruntime has no bf16
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert resolve_runtime("auto", "cpu") == "torch"
    assert load_runtime("auto", model_dir, device="cpu").name == "torch"


def test_serve_uses_the_default_runtime(model_dir):
    from visiontune.serving.app import ServeConfig
    from visiontune.serving.handler import Handler

    config = ServeConfig(str(model_dir), device="cpu").check()
    assert config.runtime == "auto"
    handler = Handler(config.model_dir, runtime=config.runtime, device="cpu")
    handler.load()
    assert handler.model.name == fastest_installed()


def test_a_damaged_model_onnx_is_exported_afresh_not_a_dead_endpoint(
    model_dir, reference, image_bytes, tmp_path, caplog
):
    # A cut-short MODEL/model.onnx failed the default runtime's load: /ping answered 503 for
    # good although the weights were fine.
    import shutil

    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    (damaged / "model.onnx").write_bytes(b"\x08\x07garbage, not protobuf")
    with caplog.at_level("WARNING", logger="visiontune.serving"):
        runtime = load_runtime("onnx", damaged, device="cpu", threads=1)
    assert "model.onnx is not a readable ONNX file" in caplog.text
    batch = batch_of(image_bytes, range(3))
    with torch.no_grad():
        expected = torch.softmax(reference(batch), 1)
    assert torch.allclose(runtime.predict(batch), expected, atol=1e-4)
    assert (damaged / "model.onnx").read_bytes() == b"\x08\x07garbage, not protobuf"
