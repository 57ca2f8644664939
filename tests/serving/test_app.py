"""The endpoint in-process (FastAPI TestClient): every content type and every error path."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from visiontune.serving.app import ServeConfig, create_app


def wait_ready(client: TestClient, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ping").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"/ping never answered 200: {client.get('/ping').text}")


def started(config: ServeConfig) -> Iterator[TestClient]:
    with TestClient(create_app(config.check()), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def access_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("log") / "access.jsonl"


@pytest.fixture(scope="module")
def client(model_dir: Path, access_log: Path) -> Iterator[TestClient]:
    yield from started(ServeConfig(str(model_dir), access_log=str(access_log), top_k=3))


def post(client: TestClient, body: bytes, content_type: str, **headers: str):
    return client.post(
        "/invocations", content=body, headers={"Content-Type": content_type, **headers}
    )


def assert_error(response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    doc = response.json()
    assert set(doc) == {"error", "request_id"}
    assert doc["request_id"] == response.headers["x-request-id"]
    for needle in needles:
        assert needle in doc["error"], doc["error"]
    return doc


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG that declares 10 gigapixels: it must be refused from its header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------ happy paths


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [
        ("image/jpeg", "JPEG"),
        ("image/png", "PNG"),
        ("application/x-image", "JPEG"),
        ("application/octet-stream", "PNG"),
    ],
)
def test_image_content_types_answer_top_k_with_model_identity(
    image_bytes, classes, client, model_dir, content_type, fmt
):
    response = post(client, image_bytes(1, fmt=fmt), content_type)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    meta = json.loads((model_dir / "model.json").read_text())
    assert (doc["model"], doc["version"]) == (meta["name"], meta["version"])
    (top,) = doc["predictions"]
    assert [set(p) for p in top] == [{"label", "class_id", "probability"}] * 3
    assert {p["label"] for p in top} == set(classes)
    assert sum(p["probability"] for p in top) == pytest.approx(1, abs=1e-4)
    assert top == sorted(top, key=lambda p: -p["probability"])


def test_json_instances_answer_each_image_like_a_single_request(image_bytes, client):
    images = [image_bytes(i) for i in range(3)]
    body = json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in images]})
    doc = post(client, body.encode(), "application/json").json()
    singles = [post(client, b, "image/jpeg").json()["predictions"][0] for b in images]
    assert len(doc["predictions"]) == 3
    for got, single in zip(doc["predictions"], singles, strict=True):
        assert [p["label"] for p in got] == [p["label"] for p in single]
        for a, b in zip(got, single, strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-3)


def test_npy_input_single_and_batch_match_the_decoded_image(image_bytes, client, model_dir):
    from visiontune.data.transforms import Preprocess
    from visiontune.inference import preprocess_batch
    from visiontune.models.artifact import read_meta

    preprocess = Preprocess.from_dict(read_meta(model_dir)["preprocess"])
    image = Image.open(io.BytesIO(image_bytes(2, fmt="PNG"))).convert("RGB")
    array = preprocess_batch([image], preprocess).numpy()
    from_png = post(client, image_bytes(2, fmt="PNG"), "image/png").json()["predictions"][0]

    buffer = io.BytesIO()
    np.save(buffer, array[0])
    single = post(client, buffer.getvalue(), "application/x-npy").json()["predictions"]
    buffer = io.BytesIO()
    np.save(buffer, np.concatenate([array, array]))
    double = post(client, buffer.getvalue(), "application/x-npy").json()["predictions"]
    assert len(single) == 1 and len(double) == 2
    for answer in (single[0], double[0], double[1]):
        assert answer[0]["label"] == from_png[0]["label"]
        assert answer[0]["probability"] == pytest.approx(from_png[0]["probability"], abs=1e-3)


def test_accept_npy_returns_the_probability_array(image_bytes, client):
    response = post(client, image_bytes(0), "image/jpeg", Accept="application/x-npy")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-npy"
    probs = np.load(io.BytesIO(response.content))
    assert probs.shape == (1, 3)
    assert probs.sum() == pytest.approx(1, abs=1e-4)


def test_top_k_from_sagemaker_custom_attributes_and_query(image_bytes, client):
    one = post(
        client, image_bytes(0), "image/jpeg", **{"X-Amzn-SageMaker-Custom-Attributes": "top_k=1"}
    )
    assert len(one.json()["predictions"][0]) == 1
    two = client.post(
        "/invocations?top_k=2", content=image_bytes(0), headers={"Content-Type": "image/jpeg"}
    )
    assert len(two.json()["predictions"][0]) == 2
    assert_error(client.post("/invocations?top_k=zero", content=image_bytes(0)), 400, "top_k")


def test_accept_wildcards_and_quality_pick_json(image_bytes, client):
    for accept in (
        "*/*",
        "application/*",
        "text/csv;q=0.9, application/json",
        "image/png;q=0, */*",
    ):
        response = post(client, image_bytes(0), "image/jpeg", Accept=accept)
        assert response.status_code == 200, (accept, response.text)
        assert response.headers["content-type"] == "application/json"


# ------------------------------------------------------------------------------ error paths


def test_bad_bodies_are_400_with_the_reason(image_bytes, client):
    jpeg = image_bytes(3)
    assert_error(post(client, b"", "image/jpeg"), 400, "empty")
    assert_error(post(client, jpeg[: len(jpeg) // 2], "image/jpeg"), 400, "truncated")
    assert_error(
        post(client, b"\xff\xd8\xff" + b"garbage" * 50, "image/jpeg"), 400, "cannot decode"
    )
    assert_error(post(client, b"hello, world", "application/x-image"), 400, "not an image")
    assert_error(post(client, png_bomb_header(), "image/png"), 400, "decompression bomb")


def test_bad_json_and_npy_bodies_are_400_saying_what_to_send(client):
    assert_error(post(client, b"{not json", "application/json"), 400, '"instances"')
    assert_error(post(client, b'{"images": []}', "application/json"), 400, '"instances"')
    assert_error(
        post(client, b'{"instances": [{"b64": "@@@"}]}', "application/json"), 400, "base64"
    )
    bad = base64.b64encode(b"not an image").decode()
    assert_error(
        post(client, json.dumps({"instances": [{"b64": bad}]}).encode(), "application/json"),
        400,
        "instances[0]",
    )
    for array, needle in (
        (np.zeros((3, 32, 32), np.float32), "expected (3, 64, 64) or (N, 3, 64, 64)"),
        (np.zeros((2, 64, 64, 3), np.float32), "does not fit"),
        (np.zeros((3, 64, 64), np.int64), "floats"),
        (np.full((3, 64, 64), np.nan, np.float32), "NaN"),
    ):
        buffer = io.BytesIO()
        np.save(buffer, array)
        assert_error(post(client, buffer.getvalue(), "application/x-npy"), 400, needle)
    assert_error(post(client, b"\x93NUMPY junk", "application/x-npy"), 400, ".npy")


def test_unsupported_content_type_is_415_listing_the_supported(client):
    assert_error(post(client, b"a,b\n1,2\n", "text/csv"), 415, "text/csv", "image/jpeg")


def test_unsupported_accept_is_406(image_bytes, client):
    assert_error(
        post(client, image_bytes(0), "image/jpeg", Accept="text/csv"), 406, "application/json"
    )


def test_unknown_path_and_method_are_json_errors(client):
    assert_error(client.get("/nope"), 404, "/invocations")
    assert_error(client.get("/invocations"), 405, "GET")


def test_body_over_the_limit_is_413_naming_the_limit(image_bytes, model_dir):
    for client in started(ServeConfig(str(model_dir), max_body_mb=0.01, access_log=None)):
        doc = assert_error(
            post(client, b"\xff" * 20_000, "image/jpeg"), 413, "0.01 MB", "10485 bytes"
        )
        assert "--max-body-mb" in doc["error"]
        assert post(client, image_bytes(0), "image/jpeg").status_code == 200


def test_model_error_is_500_with_request_id_and_the_server_keeps_serving(
    image_bytes, model_dir, tmp_path
):
    handler = tmp_path / "broken.py"
    handler.write_text(
        "def output_fn(prediction, accept):\n"
        "    if prediction.shape[0] == 2:\n"
        "        raise RuntimeError('two images are one too many')\n"
        "    return 'ok'\n"
    )
    for client in started(ServeConfig(str(model_dir), handler=str(handler), access_log=None)):
        two = json.dumps(
            {"instances": [{"b64": base64.b64encode(image_bytes(i)).decode()} for i in (0, 1)]}
        )
        doc = assert_error(
            post(client, two.encode(), "application/json"), 500, "output_fn", "one too many"
        )
        assert len(doc["request_id"]) >= 16
        ok = post(client, image_bytes(0), "image/jpeg", Accept="text/plain")
        assert (ok.status_code, ok.text, ok.headers["content-type"]) == (
            200,
            "ok",
            "text/plain; charset=utf-8",
        )


def test_slow_model_gets_504_naming_the_timeout(image_bytes, model_dir, tmp_path):
    handler = tmp_path / "slow.py"
    handler.write_text(
        "import time\n\n"
        "def predict_fn(data, model):\n"
        "    time.sleep(1.0)\n"
        "    return model.predict(data)\n"
    )
    config = ServeConfig(
        str(model_dir), handler=str(handler), request_timeout_s=0.3, access_log=None
    )
    with TestClient(create_app(config.check()), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert_error(post(client, image_bytes(0), "image/jpeg"), 504, "0.3 s")


def test_ping_is_503_until_the_model_is_loaded_and_warm(image_bytes, model_dir, tmp_path):
    gate = tmp_path / "go"
    handler = tmp_path / "gated.py"
    handler.write_text(
        "import time\nfrom pathlib import Path\n"
        "from visiontune.serving.runtimes import load_runtime\n\n"
        "def model_fn(model_dir):\n"
        f"    while not Path({str(gate)!r}).exists():\n"
        "        time.sleep(0.02)\n"
        "    return load_runtime('torch', model_dir)\n"
    )
    config = ServeConfig(str(model_dir), handler=str(handler), access_log=None)
    with TestClient(create_app(config.check()), raise_server_exceptions=False) as client:
        assert_error(client.get("/ping"), 503, "loading")
        assert_error(post(client, image_bytes(0), "image/jpeg"), 503, "GET /ping")
        gate.touch()
        wait_ready(client)
        assert client.get("/ping").content == b""
        # Its own model_fn means unbatched steps; the default output_fn still honours top_k.
        answer = client.post("/invocations?top_k=1", content=image_bytes(0))
        assert answer.status_code == 200 and len(answer.json()["predictions"][0]) == 1


# ------------------------------------------------------------------------------ the rest


def test_execution_parameters_for_batch_transform(client):
    assert client.get("/execution-parameters").json() == {
        "MaxConcurrentTransforms": 32,
        "BatchStrategy": "SINGLE_RECORD",
        "MaxPayloadInMB": 6,
    }


def test_openapi_describes_invocations_content_types(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/invocations"]["post"]["requestBody"]["content"]
    assert {"image/jpeg", "application/json", "application/x-npy"} <= set(body)
    assert {"/ping", "/execution-parameters", "/metrics"} <= set(spec["paths"])


def test_metrics_and_access_log_record_requests(image_bytes, client, access_log):
    post(client, image_bytes(4), "image/jpeg", **{"X-Request-Id": "trace-me-123"})
    post(client, b"a,b", "text/csv")
    text = client.get("/metrics").text
    assert 'visiontune_requests_total{path="/invocations",status="200"}' in text
    assert 'visiontune_requests_total{path="/invocations",status="415"}' in text
    assert "visiontune_batch_size_bucket" in text and "visiontune_queue_depth" in text
    assert "visiontune_request_latency_seconds_bucket" in text
    lines = [json.loads(line) for line in access_log.read_text().splitlines()]
    traced = next(line for line in lines if line["request_id"] == "trace-me-123")
    assert traced["method"] == "POST" and traced["path"] == "/invocations"
    assert traced["status"] == 200 and traced["batch_size"] == 1 and traced["latency_ms"] > 0
    assert set(traced) == {
        "time",
        "request_id",
        "method",
        "path",
        "status",
        "latency_ms",
        "batch_size",
    }
    assert any(line["status"] == 415 for line in lines)


# ------------------------------------------------------------------------------ hardening


def test_top_k_with_a_non_ascii_digit_is_400_not_500(image_bytes, client):
    jpeg = image_bytes(0)
    query = client.post(
        "/invocations?top_k=²", content=jpeg, headers={"Content-Type": "image/jpeg"}
    )
    assert_error(query, 400, "top_k must be a positive integer")
    # A latin-1 byte in the header decodes to "²" too: the same 400, not an int() crash.
    header = client.post(
        "/invocations",
        content=jpeg,
        headers={
            "Content-Type": "image/jpeg",
            "X-Amzn-SageMaker-Custom-Attributes": b"top_k=\xb2",
        },
    )
    assert_error(header, 400, "top_k")


def test_deeply_nested_json_is_400(client):
    depth = 100_000
    body = b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"
    assert_error(post(client, body, "application/json"), 400, "nested too deeply")
    assert client.get("/ping").status_code == 200


def test_docs_page_loads_swagger_ui_from_the_server_itself(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn." not in page.text and "https://" not in page.text
    scripts = re.findall(r'src="([^"]+\.js)"', page.text)
    styles = re.findall(r'href="([^"]+\.css)"', page.text)
    assert scripts and styles
    for asset in scripts + styles:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 10_000  # the real bundle, not an error page
    assert '"/openapi.json"' in page.text or "'/openapi.json'" in page.text


# A seed-style handler (like examples/inference.py): its output_fn insists on JSON.
SEED_STYLE_HANDLER = """
import io, json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

with open(Path(__file__).with_suffix(".imports"), "a") as f:
    f.write("imported\\n")


def model_fn(model_dir):
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def input_fn(request_body, content_type="image/jpeg"):
    image = Image.open(io.BytesIO(request_body)).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)))[None]


def predict_fn(input_object, model):
    with torch.no_grad():
        return model(input_object)


def output_fn(predictions, content_type):
    assert content_type == "application/json", content_type
    return json.dumps(predictions.tolist())
"""


@pytest.fixture
def seed_handler(tmp_path) -> Path:
    path = tmp_path / "inference.py"
    path.write_text(SEED_STYLE_HANDLER)
    return path


def test_seed_style_handler_gets_json_for_a_wildcard_or_missing_accept(
    seed_handler, tmp_path, image_bytes
):
    config = ServeConfig(str(tmp_path), handler=str(seed_handler), access_log=None)
    for client in started(config):
        for accept in ("*/*", None, "*/*; q=0.8"):
            headers = {"Content-Type": "image/jpeg"}
            request = client.build_request(
                "POST", "/invocations", content=image_bytes(0), headers=headers
            )
            if accept is None:
                del request.headers["accept"]
            else:
                request.headers["accept"] = accept
            response = client.send(request)
            assert response.status_code == 200, (accept, response.text)
            assert response.headers["content-type"].startswith("application/json")
            assert len(response.json()[0]) == 2


def test_handler_file_is_imported_once_per_process(seed_handler, tmp_path):
    config = ServeConfig(str(tmp_path), handler=str(seed_handler), access_log=None)
    for _client in started(config):  # check() and the app both need the module
        pass
    assert seed_handler.with_suffix(".imports").read_text().splitlines() == ["imported"]


TAMPERED = {
    "fewer class names": lambda m: m.update(class_names=m["class_names"][:-1]),
    "more class ids than the head": lambda m: m.update(
        class_ids=[*m["class_ids"], "x"], class_names=[*m["class_names"], "x"]
    ),
    "num_classes disagrees": lambda m: m.update(num_classes=len(m["class_ids"]) + 1),
    "duplicate class ids": lambda m: m.update(class_ids=[m["class_ids"][0]] * 3),
    "class names not strings": lambda m: m.update(class_names=[1, 2, 3]),
    "no preprocess": lambda m: m.pop("preprocess"),
    "mean missing": lambda m: m["preprocess"].pop("mean"),
    "std of zero": lambda m: m["preprocess"].update(std=[0, 0, 0]),
    "input size as text": lambda m: m["preprocess"].update(input_size="64"),
    "crop_pct zero": lambda m: m["preprocess"].update(crop_pct=0),
    "unknown interpolation": lambda m: m["preprocess"].update(interpolation="lanczos"),
    "mean of two values": lambda m: m["preprocess"].update(mean=[0.5, 0.5]),
    "format_version text": lambda m: m.update(format_version="one"),
}


def tampered_copy(model_dir: Path, target: Path, change) -> Path:
    shutil.copytree(model_dir, target)
    meta = json.loads((target / "model.json").read_text())
    change(meta)
    (target / "model.json").write_text(json.dumps(meta))
    return target


@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_model_json_that_lies_is_refused_when_loaded(name, model_dir, tmp_path):
    from visiontune.errors import UserError

    tampered = tampered_copy(model_dir, tmp_path / "model", TAMPERED[name])
    with pytest.raises(UserError) as caught:
        ServeConfig(str(tampered)).check()
    assert "\n" not in str(caught.value)


def test_ping_never_says_ready_for_a_model_json_that_lies(model_dir, tmp_path, image_bytes):
    tampered = tampered_copy(model_dir, tmp_path / "model", TAMPERED["fewer class names"])
    # Unchecked config (as a worker process gets it): loading itself must refuse the model.
    config = ServeConfig(str(tampered), access_log=None)
    with TestClient(create_app(config), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while "failed" not in client.get("/ping").text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert_error(client.get("/ping"), 503, "class_names")
        assert post(client, image_bytes(0), "image/jpeg").status_code == 503


def test_a_handler_answer_that_cannot_be_sent_is_a_500_naming_its_step(
    model_dir, tmp_path, image_bytes
):
    # These were "internal error: TypeError ..." (or, for a CR/LF content type, a header
    # split in two); the docs promise a 500 naming the handler's step.
    output = tmp_path / "odd_output.py"
    output.write_text(
        "def output_fn(prediction, accept):\n"
        "    if accept == 'x/set':\n"
        "        return {1, 2}\n"
        "    if accept == 'x/none':\n"
        "        return b'body', None\n"
        "    return b'body', 'text/plain\\r\\nX-Injected: 1'\n"
    )
    for client in started(ServeConfig(str(model_dir), handler=str(output), access_log=None)):
        for accept, needle in (
            ("x/set", "set is not bytes, str or JSON-serialisable"),
            ("x/none", "the content type None is not a one-line string"),
            ("x/crlf", "is not a one-line string"),
        ):
            response = post(client, image_bytes(0), "image/jpeg", Accept=accept)
            assert_error(response, 500, "output_fn returned what cannot be sent: ", needle)
            assert "x-injected" not in response.headers
    transform = tmp_path / "odd_transform.py"
    transform.write_text(
        "def transform_fn(model, body, content_type, accept):\n"
        "    if content_type == 'image/png':\n"
        "        raise RuntimeError('no PNG here')\n"
        "    return object()\n"
    )
    for client in started(ServeConfig(str(model_dir), handler=str(transform), access_log=None)):
        assert_error(
            post(client, image_bytes(0, fmt="PNG"), "image/png"),
            500,
            "error in transform_fn: RuntimeError: no PNG here",
        )
        assert_error(
            post(client, image_bytes(0), "image/jpeg"),
            500,
            "transform_fn returned what cannot be sent: object is not bytes",
        )


def test_an_npy_body_that_overflows_the_model_is_400_never_a_nan_answer(client):
    # 1e38 is finite, so it passed the NaN check and the endpoint answered 200 with
    # "probability": NaN (not JSON to strict parsers); float64 1e300 became inf as float32.
    for array, accept, needle in (
        (np.full((3, 64, 64), 1e38, np.float32), "application/json", "is not finite"),
        (np.full((3, 64, 64), 1e38, np.float32), "application/x-npy", "is not finite"),
        (np.full((3, 64, 64), 1e300, np.float64), "application/json", "infinite values"),
    ):
        buffer = io.BytesIO()
        np.save(buffer, array)
        response = post(client, buffer.getvalue(), "application/x-npy", Accept=accept)
        assert_error(response, 400, needle)
    good = io.BytesIO()
    np.save(good, np.zeros((3, 64, 64), np.float32))
    answer = post(client, good.getvalue(), "application/x-npy")
    assert answer.status_code == 200 and "NaN" not in answer.text
