"""Bounded work per request: instance and pixel limits, batches within the limit, timeouts stop."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from visiontune.serving.app import ServeConfig, create_app


def started(config: ServeConfig) -> Iterator[TestClient]:
    with TestClient(create_app(config.check()), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while client.get("/ping").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/ping").status_code == 200, client.get("/ping").text
        yield client


def post(client: TestClient, body: bytes, content_type: str):
    return client.post("/invocations", content=body, headers={"Content-Type": content_type})


def assert_error(response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    for needle in needles:
        assert needle in response.json()["error"], response.json()["error"]


def png(side: int, colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, "PNG")
    return buffer.getvalue()


def instances(*images: bytes) -> bytes:
    return json.dumps(
        {"instances": [{"b64": base64.b64encode(image).decode()} for image in images]}
    ).encode()


@pytest.fixture(scope="module")
def small_batches(model_dir: Path) -> Iterator[TestClient]:
    config = ServeConfig(
        str(model_dir), access_log=None, max_batch_size=4, max_request_pixels=2_000_000
    )
    yield from started(config)


def test_too_many_images_in_one_request_is_413_naming_the_limit(small_batches):
    body = instances(*[png(1)] * 500)  # 500 copies of a 1x1 PNG: a few kB
    assert_error(post(small_batches, body, "application/json"), 413, "500 images", "64")
    assert "--max-instances" in post(small_batches, body, "application/json").json()["error"]


def test_a_request_is_predicted_in_batches_no_larger_than_the_max_batch_size(
    small_batches, image_bytes
):
    images = [image_bytes(i) for i in range(10)]
    together = post(small_batches, instances(*images), "application/json")
    assert together.status_code == 200, together.text
    rows = together.json()["predictions"]
    assert len(rows) == 10
    for i in (0, 5, 9):  # each row is its own image's answer, in order
        alone = post(small_batches, images[i], "image/jpeg").json()["predictions"][0]
        assert [p["label"] for p in rows[i]] == [p["label"] for p in alone]
    metrics = small_batches.get("/metrics").text
    buckets = {
        line.split('le="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("visiontune_batch_size_bucket")
    }
    assert buckets["+Inf"] > 0
    assert buckets["4.0"] == buckets["+Inf"]  # no batch held more than 4 images


def test_the_pixels_of_a_request_are_bounded_before_decoding(small_batches):
    body = instances(png(1000), png(1000), png(1000))  # 3 MP, over the 2 MP budget
    assert_error(post(small_batches, body, "application/json"), 413, "--max-request-pixels")
    assert small_batches.get("/ping").status_code == 200


def test_a_request_that_times_out_stops_decoding_and_the_next_one_is_answered(
    model_dir, image_bytes
):
    config = ServeConfig(
        str(model_dir),
        access_log=None,
        request_timeout_s=3,
        decode_threads=1,  # one decoder: it must be free again soon after the timeout
        max_instances=500,
        max_request_pixels=10**10,
    )
    heavy = instances(*[png(2000)] * 150)  # ~0.1 s of decoding each, ~15 s in all
    for client in started(config):
        assert_error(post(client, heavy, "application/json"), 504, "no answer within 3 s")
        # Today the decoder goes on for the seconds left and this request times out too.
        after = post(client, image_bytes(0), "image/jpeg")
        assert after.status_code == 200, after.text


def test_requests_beyond_the_decode_queue_bound_get_503_at_once(model_dir, image_bytes):
    import threading

    config = ServeConfig(
        str(model_dir),
        access_log=None,
        decode_threads=1,
        max_waiting=1,
        max_instances=500,
        max_request_pixels=10**10,
    )
    heavy = instances(*[png(2000)] * 40)  # a few seconds of decoding
    for client in started(config):
        state = client.app.state.serving
        first: list = []

        def send_heavy(client=client, first=first) -> None:
            first.append(post(client, heavy, "application/json"))

        worker = threading.Thread(target=send_heavy)
        worker.start()
        deadline = time.monotonic() + 30
        while state.decoding == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.decoding == 1
        busy = post(client, image_bytes(0), "image/jpeg")
        assert_error(busy, 503, "busy")
        assert client.get("/ping").status_code == 200  # /ping stays cheap
        worker.join(120)
        assert first and first[0].status_code == 200
