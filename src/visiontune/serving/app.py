"""The HTTP endpoint: SageMaker's container contract on FastAPI + uvicorn.

``GET /ping`` (200 once the model is loaded and warmed up, 503 before), ``POST /invocations``,
``GET /execution-parameters`` (batch transform), ``GET /metrics`` (Prometheus) and the
OpenAPI description at ``/openapi.json`` (``/docs`` renders it).

A request flows decode -> batch -> predict -> unbatch -> encode: the body is decoded and
preprocessed in a thread pool, the :class:`~visiontune.serving.batching.DynamicBatcher` groups
it with concurrent requests and predicts them together in its worker thread, and each request
encodes its own rows. The event loop only moves bytes, so it never blocks on a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import io
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from visiontune.errors import UserError
from visiontune.models.artifact import fetch_model_dir
from visiontune.serving.batching import BatcherStopped, DynamicBatcher
from visiontune.serving.handler import (
    DECODERS,
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MAX_REQUEST_PIXELS,
    ENCODERS,
    JSON,
    BadRequest,
    ClientClosedRequest,
    Handler,
    ModelError,
    NotReady,
    PayloadTooLarge,
    RequestTimeout,
    ServingError,
    UnsupportedContentType,
    current_top_k,
    default_accept,
    load_user_module,
    media_type,
    negotiate,
)
from visiontune.serving.protocol import (
    CONFIG_ENV,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
)

__all__ = ["ServeConfig", "create_app", "fetch_model_dir", "serve"]

log = logging.getLogger("visiontune.serving")
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
# --precision values a runtime understands (fp16: CUDA with the torch runtime).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Answers made with test-time augmentation say so, with the number of views averaged.
TTA_HEADER = "x-visiontune-tta-views"


@dataclass
class ServeConfig:
    """Everything ``visiontune serve`` needs; validated by :meth:`check` before any loading.

    Attributes:
        model_dir: a local model directory (``s3://`` is resolved to a local copy first).
        host, port: where to listen.
        runtime: ``auto`` (the fastest installed on CPU), ``torch``, ``onnx`` or ``openvino``.
        handler: a SageMaker-style ``inference.py`` overriding some steps, or ``None``.
        max_batch_size: the most images predicted together.
        max_batch_delay_ms: the longest a request waits for others to share its batch.
        workers: server processes (each loads the model and batches on its own).
        top_k: classes per image when the request does not say (``top_k=N`` in the
            ``X-Amzn-SageMaker-Custom-Attributes`` header or the query string).
        max_body_mb: the body size limit (SageMaker's real-time limit is 6 MB).
        max_image_pixels: images with more pixels are refused (decompression bombs).
        max_instances: the most images in one request (413 above it); a request's images are
            predicted in batches of at most ``max_batch_size``.
        max_request_pixels: the most pixels of all a request's images together (413 above it).
        max_waiting: the most requests being decoded or waiting for a decoder; more get 503 at
            once, so the time in queue and the memory held by waiting bodies stay bounded.
        request_timeout_s: a request still unanswered after this gets 504.
        header_timeout_s: a connection whose request headers are not complete after this gets
            408 and is closed (slow or stalled clients cannot hold connections).
        body_timeout_s: the longest the body may take to arrive after its headers.
        max_connections: open connections (and requests in progress) above this get 503.
        device, precision, threads: passed to the runtime (threads: per worker process).
        decode_threads: threads decoding images (default: one per core).
        access_log: ``-`` for stderr, a file path, or ``None`` to turn it off.
        graceful_timeout_s: on SIGTERM, how long in-flight requests get to finish.
        tta: test-time augmentation views per image (0: off, the default; 2: the image and
            its mirror). Views are more rows in the batches (at most ``max_batch_size`` rows
            each), their model inputs count against ``max_request_pixels``, and the answer is
            the mean of the views' probabilities.
    """

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8080
    runtime: str = "auto"
    handler: str | None = None
    max_batch_size: int = 32
    max_batch_delay_ms: float = 10.0
    workers: int = 1
    top_k: int = 5
    max_body_mb: float = 6.0
    max_image_pixels: int | None = None
    max_instances: int = DEFAULT_MAX_INSTANCES
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    max_waiting: int = 256
    request_timeout_s: float = 60.0
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_connections: int = 1000
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    decode_threads: int | None = None
    access_log: str | None = "-"
    graceful_timeout_s: float = 30.0
    tta: int = 0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def check(self) -> ServeConfig:
        """Fail in the first second on a bad value, a missing handler or a non-model dir."""
        from visiontune.models.artifact import read_meta
        from visiontune.serving.runtimes import check_precision, resolve_runtime

        for name, value, low in (
            ("--max-batch-size", self.max_batch_size, 1),
            ("--workers", self.workers, 1),
            ("--top-k", self.top_k, 1),
            ("--port", self.port, 0),
            ("--max-instances", self.max_instances, 1),
            ("--max-request-pixels", self.max_request_pixels, 1),
            ("--max-waiting", self.max_waiting, 1),
            ("--max-connections", self.max_connections, 1),
        ):
            if value < low:
                raise UserError(f"{name} must be at least {low}, got {value}")
        # A port past 65535 is taken modulo 65536 by getaddrinfo: --port 70000 listened on
        # 4464 while uvicorn's banner said 70000.
        if self.port > 65535:
            raise UserError(f"--port must be at most 65535, got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        # An unknown precision fell through to each runtime's default without a word.
        if self.precision not in PRECISIONS:
            raise UserError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        # NaN passes every comparison below (--max-body-mb nan was no body limit at all).
        if any(math.isnan(v) for v in (self.max_batch_delay_ms, self.request_timeout_s)) or (
            not math.isfinite(self.max_body_mb)
        ):
            raise UserError(
                "--max-batch-delay-ms, --max-body-mb and --request-timeout must be numbers "
                "(and --max-body-mb a finite one)"
            )
        if self.max_batch_delay_ms < 0 or self.max_body_mb <= 0 or self.request_timeout_s <= 0:
            raise UserError("--max-batch-delay-ms must be >= 0; body limit and timeout > 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise UserError("--header-timeout and --body-timeout must be > 0 seconds")
        check_precision(
            resolve_runtime(self.runtime, self.device, self.precision), self.device, self.precision
        )
        from visiontune.tta import check_views

        check_views(self.tta)
        if not Path(self.model_dir).is_dir():
            raise UserError(f"model directory not found: {self.model_dir}")
        custom_model = False
        if self.handler is not None:
            module = load_user_module(self.handler)
            custom_model = callable(getattr(module, "model_fn", None))
            unbatched = [
                step
                for step in ("model_fn", "input_fn", "predict_fn", "transform_fn")
                if callable(getattr(module, step, None))
            ]
            if self.tta and unbatched:
                raise UserError(
                    f"--tta needs visiontune's own model, input and predict steps; "
                    f"{self.handler} overrides {', '.join(unbatched)} (a custom output_fn is fine)"
                )
        if not custom_model:
            read_meta(self.model_dir)  # a handler without model_fn needs a visiontune model
            _check_weights(self.model_dir)
        return self


def _check_weights(model_dir: str) -> None:
    """Refuse damaged or non-finite weights before the server starts: the model itself is
    loaded after uvicorn is up, where a failure only turns /ping to 503 for good."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from visiontune.models.artifact import WEIGHTS_FILE, check_finite_weights

    weights = Path(model_dir) / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except SafetensorError as e:
        raise UserError(f"{weights} is damaged: {str(e).splitlines()[0]}") from None
    check_finite_weights(state, weights)


# ------------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics in a registry of this app's own (two apps never share counters)."""

    def __init__(self, queue_depth) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "visiontune_requests",
            "HTTP requests by path and status",
            ["path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "visiontune_request_latency_seconds",
            "Request latency by path",
            ["path"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "visiontune_batch_size",
            "Images per predicted batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        queue = Gauge(
            "visiontune_queue_depth", "Requests waiting for a batch", registry=self.registry
        )
        queue.set_function(queue_depth)
        self.ready = Gauge(
            "visiontune_model_ready", "1 once /ping answers 200", registry=self.registry
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _access_logger(target: str | None) -> logging.Logger | None:
    if target is None:
        return None
    logger = logging.getLogger(f"visiontune.access.{id(target)}.{uuid.uuid4().hex[:6]}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if target == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return logger


def _utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class AccessLogMiddleware:
    """Pure ASGI middleware: request id, JSON access log line, request metrics.

    Pure ASGI (not ``BaseHTTPMiddleware``) keeps per-request overhead to a few microseconds.
    """

    def __init__(self, app, state: ServingState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = None
        for key, value in scope.get("headers", ()):
            if key in (b"x-request-id", b"x-amzn-requestid") and 0 < len(value) <= 128:
                request_id = value.decode("latin-1")
        request_id = request_id or uuid.uuid4().hex
        info = scope.setdefault("state", {})
        info["request_id"] = request_id
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            path = scope.get("path", "")
            label = path if path in self.state.known_paths else "other"
            self.state.metrics.requests.labels(label, str(status)).inc()
            self.state.metrics.latency.labels(label).observe(elapsed)
            if self.state.access_log is not None:
                self.state.access_log.info(
                    json.dumps(
                        {
                            "time": _utc_now(),
                            "request_id": request_id,
                            "method": scope.get("method"),
                            "path": path,
                            "status": status,
                            "latency_ms": round(elapsed * 1000, 2),
                            "batch_size": info.get("batch_size"),
                        }
                    )
                )


# ------------------------------------------------------------------------------- the state


class ServingState:
    """The loaded model, its batcher and thread pools, and whether /ping may say 200."""

    def __init__(self, config: ServeConfig) -> None:
        from visiontune.device import available_cores

        self.config = config
        module = load_user_module(config.handler) if config.handler else None
        cores = available_cores()
        self.handler = Handler(
            config.model_dir,
            module,
            runtime=config.runtime,
            device=config.device,
            precision=config.precision,
            threads=config.threads or max(1, cores // config.workers),
            max_pixels=config.max_image_pixels,
            top_k=config.top_k,
            max_instances=config.max_instances,
            max_request_pixels=config.max_request_pixels,
        )
        self.decode_pool = ThreadPoolExecutor(
            config.decode_threads or cores, thread_name_prefix="visiontune-decode"
        )
        # Custom handlers run one request at a time per worker, as a SageMaker worker does.
        self.handler_pool = ThreadPoolExecutor(1, thread_name_prefix="visiontune-handler")
        self.batcher: DynamicBatcher[torch.Tensor, torch.Tensor] = DynamicBatcher(
            self._predict_batch,
            config.max_batch_size,
            config.max_batch_delay_ms,
            size_of=lambda x: int(x.shape[0]),
            on_batch=lambda n: self.metrics.batch_size.observe(n),
        )
        self.metrics = Metrics(lambda: self.batcher.queue_depth)
        self.access_log = _access_logger(config.access_log)
        self.ready = False
        self.load_error: str | None = None
        self.known_paths: set[str] = set()
        self._load_task: asyncio.Future | None = None
        # Requests being decoded or waiting for a decoder (bounded by config.max_waiting);
        # only the event loop changes it.
        self.decoding = 0

    def _predict_batch(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        batch = items[0] if len(items) == 1 else torch.cat(items)
        probs = self.handler.predict_fn(batch, self.handler.model)
        if probs.shape[0] != batch.shape[0]:
            raise ModelError(
                f"the model returned {probs.shape[0]} rows for {batch.shape[0]} images"
            )
        return list(torch.split(probs, [int(x.shape[0]) for x in items]))

    def decode_request(self, decoder, body: bytes, options) -> torch.Tensor:
        """Decode one request's body; with TTA, into its views' rows (image by image)."""
        batch = decoder(body, options)
        if not self.config.tta:
            return batch
        from visiontune import tta

        views = self.config.tta
        rows = int(batch.shape[0]) * views
        pixels = rows * int(batch.shape[-2]) * int(batch.shape[-1])
        if pixels > self.config.max_request_pixels:
            raise PayloadTooLarge(
                f"with --tta {views} views, {batch.shape[0]} images are {rows} model inputs of "
                f"{pixels:,} pixels together, over the limit of "
                f"{self.config.max_request_pixels:,} per request (--max-request-pixels); send "
                "fewer images per request"
            )
        return tta.expand(batch, views, self.handler.decode.preprocess)

    def rows_per_batch(self) -> int:
        """Rows per submitted part: whole groups of an image's views where they fit."""
        views, most = max(1, self.config.tta), self.config.max_batch_size
        return most if most < views else most // views * views

    def load_and_warm_up(self) -> None:
        """Load the model, run one prediction through the real steps, then report ready."""
        self.handler.load()
        size = self.handler.decode.preprocess.input_size
        if self.handler.batched:
            from visiontune import tta

            views = self.config.tta
            warm = torch.zeros(1, 3, size, size)
            rows = tta.expand(warm, views, self.handler.decode.preprocess) if views else warm
            (probs,) = self._predict_batch([rows])
            if views:
                probs = tta.average(probs, views)
            # Encoding the answer too: labels that do not fit the model fail here, not later.
            if self.handler.info is not None:
                ENCODERS[JSON](probs, self.handler.info, self.config.top_k)
        else:
            from PIL import Image

            jpeg = io.BytesIO()
            Image.new("RGB", (size, size), (128, 128, 128)).save(jpeg, "JPEG")
            try:
                self.handler.handle(jpeg.getvalue(), "image/jpeg", "application/json")
            except Exception as e:  # its input_fn may not take JPEG: the model still loaded
                log.warning("warm-up request through the custom handler failed: %s", e)
        self.ready = True
        self.metrics.ready.set(1)
        runtime = getattr(self.handler.model, "name", type(self.handler.model).__name__)
        views = f", test-time augmentation with {self.config.tta} views" if self.config.tta else ""
        log.info("model loaded (runtime %s%s) and warmed up; /ping answers 200", runtime, views)

    async def start(self) -> None:
        self.batcher.start()
        loop = asyncio.get_running_loop()

        async def load() -> None:
            try:
                await loop.run_in_executor(self.handler_pool, self.load_and_warm_up)
            except Exception as e:
                self.load_error = f"{type(e).__name__}: {e}"
                log.exception("loading the model failed; /ping will answer 503")

        self._load_task = loop.create_task(load())

    async def stop(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.handler_pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------- requests


def _error(status: int, message: str, request: Request) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    return JSONResponse({"error": message, "request_id": request_id}, status_code=status)


def _runtime_api_error(status: int, message: str, request: Request) -> JSONResponse:
    """An error as the SageMaker Runtime API sends it, so botocore raises its ``ModelError``.

    SageMaker answers 424 with ``x-amzn-ErrorType: ModelError`` for any error status of the
    container, and keeps that status and message as ``OriginalStatusCode`` / ``OriginalMessage``.
    """
    request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    return JSONResponse(
        {
            "message": f'Received client error ({status}) from primary with message "{message}"'
            if status < 500
            else f'Received server error ({status}) from primary with message "{message}"',
            "OriginalStatusCode": status,
            "OriginalMessage": message,
            "error": message,
            "request_id": request_id,
        },
        status_code=424,
        headers={"x-amzn-ErrorType": "ModelError", "x-amzn-RequestId": request_id},
    )


async def _read_body(request: Request, limit_mb: float) -> bytes:
    limit = int(limit_mb * 1024 * 1024)
    too_large = (
        f"the request body is over the {limit_mb:g} MB limit "
        f"({limit} bytes); send a smaller image or raise --max-body-mb"
    )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(too_large)
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(too_large)
            chunks.append(chunk)
    except ClientDisconnect:
        # The caller hung up: nothing failed on our side, and no one reads the answer.
        raise ClientClosedRequest(
            f"the client closed the connection after {size} bytes of the body"
        ) from None
    return b"".join(chunks)


def _top_k(request: Request, default: int) -> int:
    raw = request.query_params.get("top_k")
    for part in request.headers.get(CUSTOM_ATTRIBUTES, "").split(","):
        key, _, value = part.partition("=")
        if key.strip() == "top_k":
            raw = value.strip()
    if raw is None:
        return default
    # isdigit() alone accepts "²" and other non-ASCII digits that int() refuses.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or int(raw) < 1:
        raise BadRequest(f"top_k must be a positive integer (ASCII digits), got {raw!r}")
    return int(raw)


async def _invoke(state: ServingState, request: Request) -> Response:
    if not state.ready:
        detail = f" (loading failed: {state.load_error})" if state.load_error else ""
        raise NotReady(f"the model is not loaded yet{detail}; retry when GET /ping answers 200")
    handler = state.handler
    content_type = media_type(request.headers.get("content-type"))
    accept = default_accept(request.headers.get("accept"))
    top_k = _top_k(request, state.config.top_k)
    current_top_k.set(top_k)
    if handler.batched and content_type not in DECODERS:
        raise UnsupportedContentType(
            f"content type {content_type!r} is not supported; use one of {', '.join(DECODERS)}"
        )
    if not handler.custom_output:
        negotiate(accept)  # 406 before any work is spent
    body = await _read_body(request, state.config.max_body_mb)
    loop = asyncio.get_running_loop()
    if not handler.batched:
        # copy_context: the handler thread must see this request's top_k.
        call = functools.partial(
            contextvars.copy_context().run, handler.handle, body, content_type, accept
        )
        answer, response_type = await loop.run_in_executor(state.handler_pool, call)
        return Response(answer, media_type=response_type)

    decoder = DECODERS[content_type]
    if state.decoding >= state.config.max_waiting:
        raise NotReady(
            f"the server is busy ({state.decoding} requests are being decoded or wait for it); "
            "retry shortly or add workers"
        )
    # Set when this request times out: a decoder that already started stops at the next image,
    # and one that has not started yet is cancelled with its future.
    cancel = threading.Event()
    state.batcher.announce()
    state.decoding += 1
    try:
        batch = await loop.run_in_executor(
            state.decode_pool,
            state.decode_request,
            decoder,
            body,
            handler.decode.for_request(cancel),
        )
    except BaseException:
        cancel.set()
        state.batcher.withdraw()
        raise
    finally:
        state.decoding -= 1
    # No batch larger than --max-batch-size, whatever one request holds (TTA views included).
    parts = torch.split(batch, state.rows_per_batch())
    try:
        answers = await asyncio.gather(
            *(state.batcher.submit(part, announced=i == 0) for i, part in enumerate(parts))
        )
        probs = answers[0][0] if len(answers) == 1 else torch.cat([a[0] for a in answers])
        batch_size = max(a[1] for a in answers)
    except BatcherStopped as e:
        raise NotReady(str(e)) from None
    except ServingError:
        raise
    except Exception as e:
        raise ModelError(f"the model failed on this batch: {type(e).__name__}: {e}") from e
    request.state.batch_size = batch_size
    headers = None
    if state.config.tta:
        from visiontune import tta

        probs = tta.average(probs, state.config.tta)
        headers = {TTA_HEADER: str(state.config.tta)}
    if not handler.custom_output:
        kind = negotiate(accept)
        return Response(
            ENCODERS[kind](probs, handler.info, top_k), media_type=kind, headers=headers
        )
    answer, response_type = handler.encode(probs, accept)
    return Response(answer, media_type=response_type, headers=headers)


def create_app(config: ServeConfig) -> FastAPI:
    """Build the ASGI app for ``config``; the model loads in the background at startup.

    Args:
        config: a checked :class:`ServeConfig` (``model_dir`` must be local).

    Returns:
        The FastAPI app; ``app.state.serving`` is its :class:`ServingState`.
    """
    state = ServingState(config)
    app = FastAPI(
        title="visiontune endpoint",
        description="SageMaker's inference container contract for a visiontune image classifier.",
        lifespan=_lifespan(state),
        # FastAPI's own pages load Swagger UI / ReDoc from a CDN: blank on an offline host.
        docs_url=None,
        redoc_url=None,
    )
    app.state.serving = state
    _add_offline_docs(app)
    _add_error_handlers(app)
    _add_ping(app, state)
    _add_invocations(app, state)
    _add_batch_transform_and_metrics(app, state)
    state.known_paths = {route.path for route in app.routes}  # type: ignore[attr-defined]
    app.add_middleware(AccessLogMiddleware, state=state)
    return app


def _lifespan(state: ServingState):
    """The app's lifespan: load the model in the background at startup, stop cleanly."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        yield
        # uvicorn calls this after in-flight requests finished (graceful shutdown).
        await state.stop()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered as one JSON shape."""

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        if request.url.path.startswith("/endpoints/"):
            return _runtime_api_error(exc.status, str(exc), request)
        return _error(exc.status, str(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no such path {request.url.path}; use POST /invocations or GET /ping"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error(exc.status_code, message, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, f"invalid request: {exc.errors()}", request)


def _add_ping(app: FastAPI, state: ServingState) -> None:
    """``GET /ping``: 200 once the model is loaded and warm, 503 with the reason before."""

    @app.get("/ping", summary="Readiness: 200 (empty) once the model is loaded and warm")
    async def ping(request: Request) -> Response:
        if not state.ready:
            detail = (
                f"model failed to load: {state.load_error}"
                if state.load_error
                else ("the model is still loading")
            )
            return _error(503, detail, request)
        return Response(status_code=200)


def _invocation_openapi() -> dict[str, Any]:
    """The OpenAPI description of an invocation: bodies, ``top_k`` and the error codes."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                **{
                    t: {"schema": {"type": "string", "format": "binary"}}
                    for t in DECODERS
                    if t != "application/json"
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["instances"],
                        "properties": {
                            "instances": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["b64"],
                                    "properties": {"b64": {"type": "string"}},
                                },
                            }
                        },
                    }
                },
            },
        },
        "parameters": [
            {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer"}}
        ],
        "responses": {
            "200": {"description": "top-k {label, class_id, probability} per image"},
            **{
                str(code): {"description": text}
                for code, text in (
                    (400, "the body is not a usable image or array"),
                    (406, "unsupported Accept"),
                    (413, "body over the limit"),
                    (415, "unsupported Content-Type"),
                    (500, "error inside the model"),
                    (503, "model not loaded yet"),
                    (504, "request timed out"),
                )
            },
        },
    }


def _add_invocations(app: FastAPI, state: ServingState) -> None:
    """``POST /invocations`` and its SageMaker Runtime API twin, with the request timeout."""
    config = state.config
    invocation_body = _invocation_openapi()

    @app.post("/invocations", summary="Predict", openapi_extra=invocation_body)
    async def invocations(request: Request) -> Response:
        try:
            return await asyncio.wait_for(_invoke(state, request), config.request_timeout_s)
        except TimeoutError:
            raise RequestTimeout(
                f"no answer within {config.request_timeout_s:g} s; the server is overloaded, "
                "retry later or raise --request-timeout"
            ) from None
        except ServingError:
            raise
        except Exception as e:  # a bug: logged with its traceback, answered as 500
            log.exception("request %s failed", getattr(request.state, "request_id", "?"))
            raise ModelError(f"internal error: {type(e).__name__}: {e}") from e

    @app.post(
        "/endpoints/{endpoint_name}/invocations",
        summary="Predict, as the SageMaker Runtime API's InvokeEndpoint (boto3 invoke_endpoint)",
        openapi_extra=invocation_body,
    )
    async def invoke_endpoint(endpoint_name: str, request: Request) -> Response:
        # boto3's sagemaker-runtime client with endpoint_url set to this server lands here;
        # the name is not checked (one server, one model), SigV4 headers are ignored.
        response = await invocations(request)
        response.headers["x-Amzn-Invoked-Production-Variant"] = "AllTraffic"
        custom = request.headers.get(CUSTOM_ATTRIBUTES)
        if custom is not None:
            response.headers["X-Amzn-SageMaker-Custom-Attributes"] = custom
        return response


def _add_batch_transform_and_metrics(app: FastAPI, state: ServingState) -> None:
    """``GET /execution-parameters`` (batch transform) and ``GET /metrics`` (Prometheus)."""
    config = state.config

    @app.get("/execution-parameters", summary="What SageMaker batch transform should send")
    async def execution_parameters() -> dict[str, Any]:
        return {
            # Enough concurrent requests to fill a batch in every worker.
            "MaxConcurrentTransforms": config.max_batch_size * config.workers,
            "BatchStrategy": "SINGLE_RECORD",  # one image per request: images do not split
            "MaxPayloadInMB": max(1, math.floor(config.max_body_mb)),
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)


def _add_offline_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI served from the ``swagger-ui-bundle`` package, no CDN needed.

    Without that package ``/docs`` is a page linking to ``/openapi.json``.
    """
    from fastapi.responses import HTMLResponse

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None

    if swagger_ui_path is None:

        @app.get("/docs", include_in_schema=False)
        async def docs_link() -> HTMLResponse:
            return HTMLResponse(
                "<!doctype html><title>visiontune endpoint</title>"
                '<p>The API description is at <a href="/openapi.json">/openapi.json</a> '
                "(install swagger-ui-bundle for an interactive page).</p>"
            )

        return

    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


DOCS_ASSETS = "/docs-assets"


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` once, before the model is loaded, so a busy port fails in a second.

    Raises:
        UserError: the address is in use or cannot be bound.
    """
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # The same option uvicorn sets: a port in TIME_WAIT is free, a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(
                f"cannot listen on {host}:{port}: {e.strerror or e}; is another server using "
                "it? Stop it or choose another --port"
            ) from None


def create_app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes: the config travels as JSON in the environment."""
    _log_to_stderr()  # a spawned worker starts with no logging set up
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))


def _log_to_stderr() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def serve(config: ServeConfig) -> None:
    """Check ``config`` and run the endpoint until SIGTERM/SIGINT (graceful: requests finish).

    Raises:
        UserError: a bad option, a missing handler or not a model directory.
    """
    import uvicorn

    config.check()
    check_port_free(config.host, config.port)
    _log_to_stderr()
    common = {
        "host": config.host,
        "port": config.port,
        "access_log": False,  # ours is structured and carries the request id and batch size
        "log_level": "info",
        "timeout_graceful_shutdown": config.graceful_timeout_s,
        "timeout_keep_alive": 75,  # longer than typical load-balancer idle timeouts
        "limit_concurrency": config.max_connections,
        # A string, not the class: worker processes import it (a class would be pickled).
        "http": "visiontune.serving.protocol:JsonErrorProtocol",
    }
    # Worker processes build their app from it, and the HTTP protocol reads its timeouts there.
    os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    if config.workers == 1:
        uvicorn.run(create_app(config), **common)
        return
    uvicorn.run(
        "visiontune.serving.app:create_app_from_env", factory=True, workers=config.workers, **common
    )
