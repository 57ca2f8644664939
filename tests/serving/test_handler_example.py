"""The seed-style ``examples/inference.py`` (resnet50, ``model.pth``) served unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from visiontune.serving.app import ServeConfig, create_app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inference.py"


@pytest.fixture(scope="module")
def seed_model_dir(tmp_path_factory) -> Path:
    """An ``/opt/ml/model``-like folder with only ``model.pth`` (random resnet50 + seed head)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Sequential(nn.Linear(2048, 128), nn.ReLU(inplace=True), nn.Linear(128, 133))
    folder = tmp_path_factory.mktemp("opt_ml_model")
    torch.save(model.state_dict(), folder / "model.pth")
    return folder


def test_seed_handler_serves_logits_from_a_plain_model_pth(seed_model_dir, image_bytes):
    assert not (seed_model_dir / "model.json").exists()  # not a visiontune model directory
    config = ServeConfig(str(seed_model_dir), handler=str(EXAMPLE), access_log=None).check()
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while client.get("/ping").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/ping").status_code == 200

        jpeg = image_bytes(0, size=96)
        response = client.post(
            "/invocations",
            content=jpeg,
            headers={"Content-Type": "image/jpeg", "Accept": "application/json"},
        )
        assert response.status_code == 200, response.text
        # SageMaker semantics: output_fn returned a str, so it is the body, typed as Accept.
        assert response.headers["content-type"].startswith("application/json")
        logits = json.loads(response.text)
        assert len(logits) == 1 and len(logits[0]) == 133

        # The same numbers the handler gives when called directly, outside the server.
        import importlib.util

        spec = importlib.util.spec_from_file_location("seed_inference", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.model_fn(str(seed_model_dir))
        expected = module.predict_fn(module.input_fn(jpeg, "image/jpeg"), model)
        assert torch.allclose(torch.tensor(logits), expected, atol=1e-4)

        # Its input_fn only takes JPEG: a PNG is refused as a bad request, not a crash.
        png = client.post(
            "/invocations", content=image_bytes(0, fmt="PNG"), headers={"Content-Type": "image/png"}
        )
        assert png.status_code == 400
        assert "unsupported ContentType" in png.json()["error"]


def test_without_model_fn_the_directory_must_be_a_visiontune_model(seed_model_dir, tmp_path):
    from visiontune.errors import UserError

    only_output = tmp_path / "inference.py"
    only_output.write_text("def output_fn(prediction, accept):\n    return 'x'\n")
    with pytest.raises(UserError, match="not a visiontune model directory"):
        ServeConfig(str(seed_model_dir), handler=str(only_output)).check()
