"""Serving commands used wrongly, through the real console entry point: one line, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, preexec_fn=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "visiontune", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=preexec_fn,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_serve_on_a_port_in_use_fails_before_loading_the_model(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", str(model_dir), "--port", str(port))
    assert_one_line_error(proc, f"127.0.0.1:{port}", "--port")
    assert "warmed up" not in proc.stdout + proc.stderr  # the model was never loaded


def test_serve_refuses_a_model_json_that_lies_in_one_line(model_dir, tmp_path):
    tampered = tmp_path / "model"
    shutil.copytree(model_dir, tampered)
    meta = json.loads((tampered / "model.json").read_text())
    meta["class_names"] = meta["class_names"][:-1]
    (tampered / "model.json").write_text(json.dumps(meta))
    proc = run_cli("serve", str(tampered), "--port", "0")
    assert_one_line_error(proc, "class_names")


def other_model(tmp_path: Path) -> Path:
    """The same architecture, name and classes as ``model_dir``, other weights."""
    from visiontune.models.artifact import save_model_dir
    from visiontune.models.registry import build_model, get_spec

    torch.manual_seed(1)
    model, _ = build_model("tiny_cnn", 3, weights="none")
    return save_model_dir(
        tmp_path / "other",
        model.eval(),
        architecture="tiny_cnn",
        class_ids=["000", "001", "002"],
        class_names=["red", "green", "blue"],
        preprocess=get_spec("tiny_cnn").preprocess,
        name="colours",
    )


def test_transform_refuses_an_output_written_by_another_model(model_dir, tmp_path, image_bytes):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.jpg").write_bytes(image_bytes(i))
    out = tmp_path / "out"
    # In a fresh process: batch transform must not need the HTTP server's modules.
    script = (
        "import sys; from visiontune.transform import transform; "
        f"transform({str(model_dir)!r}, {str(images)!r}, {str(out)!r}, top_k=2); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'visiontune.serving.app') "
        "if m in sys.modules))"
    )
    first = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "[]"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3
    identities = {json.dumps(r["model"], sort_keys=True) for r in records}
    assert len(identities) == 1
    identity = records[0]["model"]
    assert identity["name"] == "colours" and identity["version"] and identity["fingerprint"]

    other = other_model(tmp_path)
    (images / "img9.jpg").write_bytes(image_bytes(9))
    refused = run_cli("transform", str(other), "--input", str(images), "--output", str(out))
    assert_one_line_error(refused, "predictions of model 'colours'", "--overwrite")
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3  # left untouched

    redone = run_cli(
        "transform", str(other), "--input", str(images), "--output", str(out), "--overwrite"
    )
    assert redone.returncode == 0, redone.stderr
    assert "4 predicted" in redone.stdout
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert {r["model"]["fingerprint"] for r in records} != {identity["fingerprint"]}
    assert len({r["model"]["fingerprint"] for r in records}) == 1


def test_transform_output_that_is_a_file_is_one_line(model_dir, tmp_path, image_bytes):
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.jpg").write_bytes(image_bytes(0))
    target = tmp_path / "predictions.txt"
    target.write_text("keep me\n")
    proc = run_cli("transform", str(model_dir), "--input", str(images), "--output", str(target))
    assert_one_line_error(proc, "is a file")
    assert target.read_text() == "keep me\n"


def _small_file_limit() -> None:
    """In the child: files may grow to 20 kB, like a disk that fills up (EFBIG, no signal)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_export_onto_a_full_disk_is_one_line(model_dir, tmp_path):
    target = tmp_path / "model.onnx"
    proc = run_cli("export", str(model_dir), "--output", str(target), preexec_fn=_small_file_limit)
    assert_one_line_error(proc, "cannot write", str(target))
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_saving_a_model_onto_a_full_disk_is_a_user_error(model_dir, tmp_path):
    script = f"""
import torch
from visiontune.errors import UserError
from visiontune.models.artifact import load_model_dir, save_model_dir
loaded = load_model_dir({str(model_dir)!r})
try:
    save_model_dir({str(tmp_path / "copy")!r}, loaded.model, architecture="tiny_cnn",
                   class_ids=loaded.class_ids, class_names=loaded.class_names,
                   preprocess=loaded.preprocess)
except UserError as e:
    print("UserError:", e)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        preexec_fn=_small_file_limit,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("UserError: cannot write"), proc.stdout
    assert "\n" not in proc.stdout.strip()


def test_serve_options_it_would_ignore_or_bend_are_refused_in_one_line(model_dir):
    # Each one started a server: --port 70000 listened on 4464 (getaddrinfo wraps at 65536)
    # while the banner said 70000; the others were quietly dropped for a runtime default, and
    # --max-body-mb nan left requests with no body limit.
    for args, needle in (
        (["--port", "70000"], "--port must be at most 65535, got 70000"),
        (["--precision", "fp8"], "--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        (["--runtime", "onnx", "--precision", "bf16"], "--runtime onnx runs fp32 only"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--max-body-mb", "nan"], "--max-body-mb"),
    ):
        proc = run_cli("serve", str(model_dir), "--device", "cpu", *args, timeout=60)
        assert_one_line_error(proc, needle)
        assert "Uvicorn running" not in proc.stderr


def test_predict_with_an_endpoint_that_is_not_a_url_is_one_line(tmp_path, image_bytes):
    image = tmp_path / "a.jpg"
    image.write_bytes(image_bytes(0))
    # httpx raised InvalidURL (not a transport error) from inside the first request.
    for url in ("http://256.1.1.1:8080", "127.0.0.1:8080", "ftp://host/x"):
        proc = run_cli("predict", str(image), "--endpoint", url)
        assert proc.returncode == 2
        assert_one_line_error(proc, f"endpoint URL {url!r} is not valid")


def test_a_model_with_nan_weights_is_refused_by_serve_and_predict(model_dir, tmp_path, image_bytes):
    # A diverged training run still writes its model: the endpoint said ready and answered
    # "probability": NaN (not JSON to strict parsers), predict printed an arbitrary label.
    from safetensors.torch import load_file, save_file

    diverged = tmp_path / "diverged"
    shutil.copytree(model_dir, diverged)
    state = load_file(str(diverged / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(diverged / "model.safetensors"))
    image = tmp_path / "a.jpg"
    image.write_bytes(image_bytes(0))
    for args in (["serve", str(diverged)], ["predict", str(image), "--model", str(diverged)]):
        proc = run_cli(*args, timeout=60)
        assert proc.returncode == 2
        assert_one_line_error(proc, "holds NaN or infinite weights", "diverged")
        assert "Uvicorn running" not in proc.stderr


def test_predict_against_a_web_server_that_is_no_endpoint_says_so_in_one_line(
    tmp_path, image_bytes
):
    import http.server
    import threading

    image = tmp_path / "a.jpg"
    image.write_bytes(image_bytes(0))
    # A plain web server answers POST with its HTML error page, which was printed whole.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proc = run_cli(
            "predict", str(image), "--endpoint", f"http://127.0.0.1:{server.server_port}"
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    assert line.startswith(f"{image}: error: HTTP 501: ")
    assert "text/html" in line and "is this URL an endpoint" in line and "<" not in line
