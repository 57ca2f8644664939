"""Serving throughput and latency: `visiontune serve` (dynamic batching) vs a naive server.

Both servers run as real processes on loopback with the same model (efficientnet_lite0 with its
real ImageNet weights, a 2-class head) and the same real JPEGs (../shared/data/hymenoptera when
present, else synthetic photos). A bounded async load generator (httpx) drives each at
concurrency 1, 8 and 32 and prints requests/s and p50/p95/p99 latency; then a soak at
concurrency 8 checks for errors and RSS growth of the batched server; and single-image latency
of each runtime (torch fp32, torch bf16, onnxruntime) is printed side by side.

    .venv/bin/python benchmarks/serving.py                 # about 3-4 minutes
    .venv/bin/python benchmarks/serving.py --seconds 5 --soak-seconds 10   # a quick look

Targets on a 2-core CPU: at concurrency 32 the batched server does at least 3x the naive
requests/s with a lower p99; the soak has zero errors and under 10% RSS growth.

The naive server (``--naive-server``, below) is what a first attempt looks like: FastAPI, eager
fp32 torch, full-size decode, one request at a time on the event loop.
"""

import argparse
import asyncio
import contextlib
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"


# --------------------------------------------------------------------------- the naive server


def run_naive_server(model_dir: str, port: int) -> None:
    """FastAPI + eager torch, one request at a time: decode, preprocess, predict, answer."""
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from PIL import Image

    from visiontune.data.transforms import eval_transform
    from visiontune.inference import topk
    from visiontune.models.artifact import load_model_dir

    loaded = load_model_dir(model_dir)
    transform = eval_transform(loaded.preprocess)
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {}

    @app.post("/invocations")
    async def invocations(request: Request) -> dict:
        # Blocking work on the event loop: requests are served strictly one at a time.
        image = Image.open(io.BytesIO(await request.body())).convert("RGB")
        with torch.no_grad():
            probs = torch.softmax(loaded.model(transform(image).unsqueeze(0)), 1)
        return {"predictions": topk(probs, loaded.class_ids, loaded.class_names, 2)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_dir(root: Path) -> Path:
    from visiontune.models.artifact import save_model_dir
    from visiontune.models.registry import build_model

    model, spec = build_model("efficientnet_lite0", 2, weights="imagenet")
    return save_model_dir(
        root / "model",
        model.eval(),
        architecture="efficientnet_lite0",
        class_ids=["ants", "bees"],
        class_names=["ants", "bees"],
        preprocess=spec.preprocess,
        name="hymenoptera",
    )


def load_images(count: int) -> tuple[list[bytes], str]:
    files = sorted(HYMENOPTERA.rglob("*.jpg"))[:count] if HYMENOPTERA.is_dir() else []
    if files:
        return [f.read_bytes() for f in files], f"{len(files)} hymenoptera JPEGs"
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        arr = (rng.random((375, 500, 3)) * 40 + (i * 37 % 200)).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images, f"{count} synthetic 500x375 JPEGs"


class Server:
    def __init__(self, name: str, command: list[str], port: int):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115  (closed in stop)
            prefix=f"{name}-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: see {self.log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"{self.name} not ready after {timeout} s: see {self.log.name}")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 1e6

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def load(url: str, images: list[bytes], concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients sending images back to back for ``seconds``."""
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors, counter
            while time.perf_counter() < deadline:
                body = images[counter % len(images)]
                counter += 1
                start = time.perf_counter()
                try:
                    r = await client.post(
                        f"{url}/invocations", content=body, headers={"Content-Type": "image/jpeg"}
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "rps": len(latencies) / elapsed,
        "p50": q[49] * 1000,
        "p95": q[94] * 1000,
        "p99": q[98] * 1000,
        "ok": len(latencies),
        "errors": errors,
    }


def single_image_latency(model_dir: Path, image: bytes, repeats: int) -> dict[str, float]:
    """Median milliseconds to predict one preprocessed image, per runtime, in this process."""
    import torch

    from visiontune.data.images import load_image
    from visiontune.inference import preprocess_batch
    from visiontune.serving.runtimes import load_runtime

    out = {}
    for label, name, precision in (
        ("torch fp32", "torch", "fp32"),
        ("torch bf16", "torch", "bf16"),
        ("onnxruntime", "onnx", "fp32"),
    ):
        runtime = load_runtime(name, model_dir, device="cpu", precision=precision)
        batch = preprocess_batch([load_image(image)], runtime.info.preprocess)
        for _ in range(3):
            runtime.predict(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runtime.predict(batch)
            times.append((time.perf_counter() - start) * 1000)
        out[label] = statistics.median(times)
        del runtime
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (figures mean little without it)."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15, help="load per concurrency level")
    parser.add_argument("--soak-seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--runtime", default="auto", help="runtime of the batched server")
    parser.add_argument("--serve-args", default="", help="extra options for visiontune serve")
    parser.add_argument("--skip-naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--naive-server", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        run_naive_server(args.naive_server, args.port)
        return

    os.environ.setdefault("VISIONTUNE_HOME", tempfile.mkdtemp(prefix="vt-bench-home-"))
    work = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    model_dir = make_model_dir(work)
    images, source = load_images(args.images)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"model efficientnet_lite0 (ImageNet weights), {source}, {cores} CPU cores")
    print(f"CPU: {cpu_model()}; batched server runtime: {args.runtime}")
    print(f"load average before: {os.getloadavg()[0]:.2f}\n")

    print("single-image latency (median ms, one preprocessed 224 px image, in-process):")
    singles = single_image_latency(model_dir, images[0], repeats=20)
    print("  " + "   ".join(f"{k}: {v:7.1f}" for k, v in singles.items()) + "\n")

    visiontune = str(Path(sys.executable).with_name("visiontune"))
    servers = {
        "naive": lambda port: Server(
            "naive",
            [sys.executable, __file__, "--naive-server", str(model_dir), "--port", str(port)],
            port,
        ),
        "batched": lambda port: Server(
            "batched",
            [
                visiontune,
                "serve",
                str(model_dir),
                "--port",
                str(port),
                "--runtime",
                args.runtime,
                "--max-batch-size",
                "32",
                "--max-batch-delay-ms",
                "10",
                "--access-log",
                "-",
                *args.serve_args.split(),
            ],
            port,
        ),
    }
    results: dict[str, dict[int, dict]] = {}
    soak = None
    for name, make in servers.items():
        if name == "naive" and args.skip_naive:
            continue
        server = make(free_port())
        try:
            server.wait_ready()
            asyncio.run(load(server.url, images, 4, 3))  # warm-up, not measured
            results[name] = {}
            for c in args.concurrency:
                r = asyncio.run(load(server.url, images, c, args.seconds))
                results[name][c] = r
                print(
                    f"{name:8s} c={c:<3d} {r['rps']:7.1f} req/s   p50 {r['p50']:7.1f} ms   "
                    f"p95 {r['p95']:7.1f} ms   p99 {r['p99']:7.1f} ms   ok {r['ok']:5d}   "
                    f"errors {r['errors']}",
                    flush=True,
                )
            if name == "batched" and args.soak_seconds > 0:
                before = server.rss_mb()
                r = asyncio.run(load(server.url, images, 8, args.soak_seconds))
                after = server.rss_mb()
                soak = (r, before, after)
        finally:
            server.stop()

    print()
    top = max(args.concurrency)
    if "naive" in results and "batched" in results:
        for c in args.concurrency:
            n, b = results["naive"][c], results["batched"][c]
            print(
                f"c={c:<3d} batched/naive throughput {b['rps'] / n['rps']:5.2f}x   "
                f"p99 naive {n['p99']:7.1f} ms vs batched {b['p99']:7.1f} ms"
            )
        n, b = results["naive"][top], results["batched"][top]
        ok = b["rps"] >= 3 * n["rps"] and b["p99"] < n["p99"]
        print(f"target at c={top}: >= 3x throughput and lower p99: {'PASS' if ok else 'FAIL'}")
    if soak is not None:
        r, before, after = soak
        growth = (after - before) / before * 100
        print(
            f"soak {args.soak_seconds:g} s at c=8: {r['ok']} requests, {r['errors']} errors, "
            f"{r['rps']:.1f} req/s, p99 {r['p99']:.1f} ms, RSS {before:.0f} -> {after:.0f} MB "
            f"({growth:+.1f}%): {'PASS' if r['errors'] == 0 and growth < 10 else 'FAIL'}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
