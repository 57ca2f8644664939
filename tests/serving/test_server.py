"""``visiontune serve`` as a real process on a real loopback port."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visiontune.serving.client import EndpointError, Predictor, predict_endpoint

CONTENT_TYPES = [
    "image/jpeg",
    "image/png",
    "application/x-image",
    "application/octet-stream",
    "application/json",
    "application/x-npy",
    "text/plain",
    "",
]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, image_bytes):
    images = [image_bytes(i) for i in range(24)]
    with httpx.Client(timeout=30) as client:
        singles = [
            client.post(
                f"{server.url}/invocations", content=b, headers={"Content-Type": "image/jpeg"}
            ).json()
            for b in images
        ]

        def send(i: int) -> dict:
            r = client.post(
                f"{server.url}/invocations",
                content=images[i],
                headers={"Content-Type": "image/jpeg"},
            )
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(24) as pool:
            together = list(pool.map(send, range(24)))
        metrics = client.get(f"{server.url}/metrics").text

    assert len({json.dumps(s["predictions"]) for s in singles}) > 12  # the images really differ
    for single, batched in zip(singles, together, strict=True):
        assert [p["label"] for p in batched["predictions"][0]] == [
            p["label"] for p in single["predictions"][0]
        ]
        for a, b in zip(batched["predictions"][0], single["predictions"][0], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=2e-3)
    # Some batches held several requests.
    buckets = {
        line.split('le="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("visiontune_batch_size_bucket")
    }
    assert buckets["1.0"] < buckets["+Inf"]
    log = server.log()
    assert any(
        json.loads(line).get("batch_size", 0) and json.loads(line)["batch_size"] > 1
        for line in log.splitlines()
        if line.startswith('{"time"')
    )


def test_predictor_and_predict_endpoint(server, image_bytes, tmp_path, classes):
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes(5, fmt="PNG"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(image_bytes(5)[:300])
    with Predictor(server.url, top_k=2) as predictor:
        assert predictor.ping()
        top = predictor.predict(good)
        assert len(top) == 2 and top[0]["label"] in classes
        assert predictor.predict(good.read_bytes(), top_k=1)[0] == top[0]
        with pytest.raises(EndpointError, match="HTTP 400: cannot decode the image"):
            predictor.predict(broken)

    results = predict_endpoint(
        [str(good), str(broken), str(tmp_path / "missing.jpg")],
        server.url + "/invocations",
        top_k=3,
    )
    assert results[0]["image"] == str(good) and len(results[0]["predictions"]) == 3
    assert "truncated" in results[1]["error"]
    assert "cannot read the file" in results[2]["error"]


def test_predict_endpoint_without_a_server_is_a_user_error(tmp_path, image_bytes, unused_url):
    from visiontune.errors import UserError

    image = tmp_path / "a.jpg"
    image.write_bytes(image_bytes(0))
    with pytest.raises(
        UserError, match=r"cannot reach the endpoint .* is `visiontune serve` running"
    ):
        predict_endpoint([str(image)], unused_url, timeout=5)


def test_fuzzed_bodies_never_give_5xx_and_the_server_stays_up(server, image_bytes):
    seed_jpeg = image_bytes(7)
    seed_json = json.dumps({"instances": [{"b64": base64.b64encode(seed_jpeg).decode()}]}).encode()
    client = httpx.Client(timeout=30)

    @settings(
        max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(
        content_type=st.sampled_from(CONTENT_TYPES),
        body=st.one_of(
            st.binary(max_size=2048),
            st.builds(
                lambda cut, flips: bytes(
                    b ^ 0xFF if i in flips else b for i, b in enumerate(seed_jpeg[:cut])
                ),
                st.integers(0, len(seed_jpeg)),
                st.sets(st.integers(0, len(seed_jpeg)), max_size=8),
            ),
            st.builds(lambda cut: seed_json[:cut], st.integers(0, len(seed_json))),
        ),
        accept=st.sampled_from(["application/json", "*/*", "application/x-npy", "text/html", ""]),
    )
    def check(content_type, body, accept):
        headers = {"Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        r = client.post(f"{server.url}/invocations", content=body, headers=headers)
        assert r.status_code < 500, r.text
        if r.status_code != 200:
            assert set(r.json()) == {"error", "request_id"}

    try:
        check()
    finally:
        client.close()
    assert httpx.get(f"{server.url}/ping").status_code == 200
    assert server.proc.poll() is None


def test_sigterm_finishes_in_flight_requests_then_exits(
    model_dir, tmp_path, image_bytes, start_server
):
    handler = tmp_path / "slow.py"
    handler.write_text(
        "import time\n\n"
        "def predict_fn(data, model):\n"
        "    time.sleep(1.5)\n"
        "    return model.predict(data)\n"
    )
    proc = start_server([str(model_dir), "--handler", str(handler), "--access-log", "-"])
    proc.wait_ready()
    answers: list[httpx.Response] = []

    def request() -> None:
        answers.append(
            httpx.post(
                f"{proc.url}/invocations",
                content=image_bytes(0),
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            )
        )

    in_flight = threading.Thread(target=request)
    in_flight.start()
    time.sleep(0.7)  # the request is now inside predict_fn (which takes 1.5 s)
    proc.proc.terminate()
    in_flight.join(30)
    assert answers and answers[0].status_code == 200, proc.log()
    assert answers[0].json()["predictions"][0][0]["label"]
    proc.proc.wait(30)
    log = proc.log()
    assert "Shutting down" in log and "Finished server process" in log
    # uvicorn re-raises the signal after its graceful shutdown, so supervisors see SIGTERM.
    assert proc.proc.returncode in (0, -15)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{proc.url}/ping", timeout=2)


def test_serve_a_folder_that_is_not_a_model_fails_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "photos").mkdir()
    visiontune = str(Path(sys.executable).with_name("visiontune"))
    done = subprocess.run(
        [visiontune, "serve", str(tmp_path / "photos")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: ")
    assert "is not a visiontune model directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_client_hanging_up_mid_body_is_499_not_a_server_error(server, image_bytes):
    head = (
        "POST /invocations HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n"
        "X-Request-Id: hangs-up-early\r\nContent-Length: 100000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head.encode() + image_bytes(0)[:500])  # then hang up, 99,500 bytes short

    def logged() -> dict | None:
        for line in server.log().splitlines():
            if line.startswith('{"time"') and '"hangs-up-early"' in line:
                return json.loads(line)
        return None

    assert wait_for(logged, "the access log line of the hung-up request")["status"] == 499
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'visiontune_requests_total{path="/invocations",status="499"}' in metrics
    assert 'path="/invocations",status="500"' not in metrics
    assert httpx.get(f"{server.url}/ping").status_code == 200


def test_a_request_that_is_not_http_gets_a_json_400(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"THIS IS NOT HTTP\x00\x01\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert b"content-type: application/json" in head.lower()
    doc = json.loads(body)
    assert set(doc) == {"error", "request_id"} and "HTTP" in doc["error"]


def test_predict_endpoint_prints_a_custom_handlers_answer(tmp_path, image_bytes, start_server):
    from visiontune.serving.client import describe_result

    handler = tmp_path / "inference.py"
    handler.write_text(
        "import json, torch\n\n"
        "def model_fn(model_dir):\n    return None\n\n"
        "def input_fn(body, content_type):\n    return len(body)\n\n"
        "def predict_fn(size, model):\n    return {'bytes': size, 'verdict': 'custom'}\n"
    )
    (tmp_path / "model").mkdir()
    proc = start_server([str(tmp_path / "model"), "--handler", str(handler)])
    proc.wait_ready()
    image = tmp_path / "a.jpg"
    image.write_bytes(image_bytes(0))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "visiontune",
            "predict",
            str(image),
            "--endpoint",
            proc.url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    (result,) = json.loads(done.stdout)
    assert result["response"] == {"bytes": image.stat().st_size, "verdict": "custom"}
    line = describe_result(result)
    assert line.startswith(f"{image}: ") and '"verdict": "custom"' in line


def test_half_sent_requests_are_closed_by_the_header_timeout_and_ping_answers_meanwhile(
    model_dir, start_server
):
    import selectors

    proc = start_server([str(model_dir), "--header-timeout", "2", "--access-log", "off"])
    proc.wait_ready()
    sockets = []
    try:
        for _ in range(300):  # a slowloris burst: headers started, never finished
            s = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            sockets.append(s)
        assert httpx.get(f"{proc.url}/ping", timeout=10).status_code == 200
        answers: dict[socket.socket, bytes] = {s: b"" for s in sockets}
        selector = selectors.DefaultSelector()
        for s in sockets:
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        open_ = set(sockets)
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                chunk = key.fileobj.recv(4096)
                answers[key.fileobj] += chunk
                if not chunk:  # the server closed it
                    selector.unregister(key.fileobj)
                    open_.discard(key.fileobj)
        assert not open_, f"{len(open_)} of 300 half-sent requests still open"
        first = next(iter(answers.values()))
        assert first.startswith(b"HTTP/1.1 408"), first
        assert b'"error"' in first and b"2 s" in first
        assert httpx.get(f"{proc.url}/ping", timeout=10).status_code == 200
    finally:
        for s in sockets:
            s.close()


def test_boto3_invoke_endpoint_works_by_changing_endpoint_url_only(server, image_bytes, classes):
    boto3 = pytest.importorskip("boto3", reason="boto3 is a test dependency (dev extra)")
    client = boto3.client(
        "sagemaker-runtime",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="testing",  # SigV4 signs the request; the endpoint ignores it
        aws_secret_access_key="testing",
    )
    response = client.invoke_endpoint(
        EndpointName="colours",
        Body=image_bytes(3),
        ContentType="image/jpeg",
        Accept="application/json",
        CustomAttributes="top_k=2",
    )
    assert response["ContentType"].startswith("application/json")
    assert response["CustomAttributes"] == "top_k=2"
    answer = json.loads(response["Body"].read())
    assert len(answer["predictions"][0]) == 2
    assert answer["predictions"][0][0]["label"] in classes

    with pytest.raises(client.exceptions.ModelError) as caught:
        client.invoke_endpoint(
            EndpointName="colours", Body=image_bytes(3)[:200], ContentType="image/jpeg"
        )
    error = caught.value.response
    assert error["OriginalStatusCode"] == 400
    assert "cannot decode the image" in error["Error"]["Message"]
