"""Test-time augmentation at the endpoint and in ``transform``: views are rows, answers are means."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from visiontune.errors import UserError
from visiontune.serving.app import TTA_HEADER, ServeConfig, create_app
from visiontune.transform import OUTPUT_FILE, transform


def _started(config: ServeConfig) -> TestClient:
    client = TestClient(create_app(config.check()), raise_server_exceptions=False)
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/ping").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ping").text
        time.sleep(0.02)
    return client


def _expected_two_view_probs(model_dir: Path, images: list[bytes]) -> torch.Tensor:
    """Mean softmax of the model on each image and on its mirror, computed without visiontune's
    TTA code: PIL decode, the model.json numbers by hand, ``torch.flip``."""
    from visiontune.models.artifact import load_model_dir

    loaded = load_model_dir(model_dir, "cpu")
    p = loaded.preprocess
    rows = []
    for data in images:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        # The tiny_cnn test model crops nothing (crop_pct 1.0) and the images are its size.
        assert image.size == (p.input_size, p.input_size) and p.crop_pct == 1.0
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(p.mean)[:, None, None]) / torch.tensor(p.std)[:, None, None]
        rows.append(x)
    x = torch.stack(rows)
    with torch.no_grad():
        plain = loaded.model(x).softmax(1)
        mirrored = loaded.model(torch.flip(x, dims=[3])).softmax(1)
    return (plain + mirrored) / 2


def _npy_answer(client: TestClient, images: list[bytes]):
    body = json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in images]})
    return client.post(
        "/invocations",
        content=body,
        headers={"Content-Type": "application/json", "Accept": "application/x-npy"},
    )


@pytest.mark.parametrize("runtime", ["torch", "onnx", "openvino"])
def test_endpoint_tta_answers_the_mean_of_the_two_views(model_dir, image_bytes, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    images = [image_bytes(i, fmt="PNG") for i in range(5)]
    expected = _expected_two_view_probs(model_dir, images)
    # 5 images x 2 views = 10 rows, in batches of at most 4 rows.
    config = ServeConfig(
        str(model_dir), runtime=runtime, precision="fp32", tta=2, max_batch_size=4, access_log=None
    )
    client = _started(config)
    try:
        state = client.app.state.serving
        seen: list[int] = []
        predict = state.handler.predict_fn

        def recording(batch, model):
            seen.append(int(batch.shape[0]))
            return predict(batch, model)

        state.handler.predict_fn = recording
        response = _npy_answer(client, images)
        assert response.status_code == 200, response.text
        assert response.headers[TTA_HEADER] == "2"
        got = torch.from_numpy(np.load(io.BytesIO(response.content)))
        assert got.shape == (5, 3)
        assert torch.allclose(got, expected, atol=1e-5), (got, expected)
        assert sum(seen) == 10 and max(seen) <= 4
        # The plain answer differs: the mirror view really counted.
        plain = _started(ServeConfig(str(model_dir), runtime=runtime, precision="fp32"))
        try:
            untouched = _npy_answer(plain, images)
            assert TTA_HEADER not in untouched.headers
            single = torch.from_numpy(np.load(io.BytesIO(untouched.content)))
            assert not torch.allclose(single, expected, atol=1e-4)
        finally:
            plain.__exit__(None, None, None)
    finally:
        client.__exit__(None, None, None)


def test_endpoint_tta_views_count_against_the_request_pixel_budget(model_dir, image_bytes):
    # Two 64x64 images are 8,192 pixels; their 2 views each are 16,384 model-input pixels.
    client = _started(
        ServeConfig(
            str(model_dir), runtime="torch", tta=2, max_request_pixels=10_000, access_log=None
        )
    )
    try:
        response = _npy_answer(client, [image_bytes(0), image_bytes(1)])
        assert response.status_code == 413, response.text
        assert "--tta 2 views" in response.json()["error"]
        assert _npy_answer(client, [image_bytes(0)]).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_serve_refuses_tta_with_a_handler_that_replaces_predict(model_dir, tmp_path):
    handler = tmp_path / "inference.py"
    handler.write_text("def predict_fn(data, model):\n    return model.predict(data)\n")
    with pytest.raises(UserError, match="overrides predict_fn"):
        ServeConfig(str(model_dir), handler=str(handler), tta=2).check()
    with pytest.raises(UserError, match="--tta-views must be between 2"):
        ServeConfig(str(model_dir), tta=1).check()
    assert ServeConfig(str(model_dir)).tta == 0  # off unless asked for


def test_serve_and_predict_flags_refuse_a_bad_view_count_in_one_line(model_dir, tmp_path, cli):
    image = tmp_path / "a.png"
    image.write_bytes(b"not read: the flags fail first")
    for args in (
        ("serve", model_dir, "--tta-views", "13", "--port", "0"),
        ("predict", image, "--model", model_dir, "--tta-views", "1"),
        ("predict", image, "--model", model_dir, "--tta", "--tta-views", "0"),
    ):
        code, _, err = cli(*args)
        assert code != 0
        assert len(err.strip().splitlines()) == 1 and "--tta-views must be between 2" in err
    code, _, err = cli("predict", image, "--endpoint", "http://127.0.0.1:9", "--tta")
    assert code != 0 and "visiontune serve --tta" in err


def test_transform_tta_writes_what_predict_tta_answers(model_dir, image_bytes, tmp_path, cli):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(5):
        (images / f"img{i}.png").write_bytes(image_bytes(i, fmt="PNG"))
    out = tmp_path / "out"
    code, _, err = cli(
        "transform",
        model_dir,
        "--input",
        images,
        "--output",
        out,
        "--runtime",
        "torch",
        "--tta",
        "--top-k",
        "3",
        "--batch-size",  # 3 images are 6 rows, given to the model 3 at a time
        "3",
        "--no-progress",
    )
    assert code == 0, err
    lines = {r["image"]: r for r in map(json.loads, (out / OUTPUT_FILE).read_text().splitlines())}
    code, printed, err = cli(
        "predict",
        *sorted(images.iterdir()),
        "--model",
        model_dir,
        "--tta",
        "--top-k",
        "3",
        "--device",
        "cpu",
        "--json",
    )
    assert code == 0, err
    answers = json.loads(printed)
    assert len(lines) == len(answers) == 5
    for answer in answers:
        line = lines[Path(answer["image"]).name]
        assert line["tta"] == answer["tta"] == {"views": 2, "names": ["full", "full+flip"]}
        assert [p["label"] for p in line["predictions"]] == [
            p["label"] for p in answer["predictions"]
        ]
        for written, predicted in zip(line["predictions"], answer["predictions"], strict=True):
            assert written["probability"] == pytest.approx(predicted["probability"], abs=1e-5)

    # One output, one way of predicting: a plain run may not resume a TTA output.
    (images / "img9.png").write_bytes(image_bytes(9, fmt="PNG"))
    with pytest.raises(UserError, match="test-time augmentation with 2 views"):
        transform(model_dir, str(images), str(out), runtime="torch")
    resumed = transform(model_dir, str(images), str(out), runtime="torch", tta=2)
    assert (resumed.predicted, resumed.skipped) == (1, 5)
