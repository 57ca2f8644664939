"""The four inference steps, SageMaker style: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

visiontune has a default for each step. A user's ``inference.py`` that defines any of them
overrides that step only, as SageMaker's PyTorch inference toolkit does (a ``transform_fn``
replaces input, predict and output together).

Default steps:

* ``model_fn(model_dir)`` loads a visiontune model directory with the chosen runtime.
* ``input_fn(body, content_type)`` decodes images (``image/jpeg``, ``image/png``,
  ``application/x-image``, ``application/octet-stream``), JSON (``{"instances": [{"b64": ...}]}``)
  or ``application/x-npy`` (an already preprocessed ``(3,S,S)`` / ``(N,3,S,S)`` float array) into
  one preprocessed ``(N, 3, S, S)`` batch.
* ``predict_fn(batch, model)`` returns probabilities ``(N, C)``.
* ``output_fn(prediction, accept)`` encodes the top-k per image as JSON (or the probabilities
  as ``application/x-npy``).

Batching: when ``model_fn``, ``input_fn``, ``predict_fn`` and ``transform_fn`` are all the
defaults, requests go through the dynamic batcher (``output_fn`` may still be custom: it gets
each request's own rows). A handler that overrides any of those steps runs the steps per
request, one request at a time per worker process, like a SageMaker model-server worker: its
code never sees concurrent calls and never sees a batch that mixes requests.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import dataclasses
import importlib.util
import io
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visiontune.data.transforms import Preprocess, decode_size_hint
from visiontune.errors import UserError

STEPS = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")
JSON = "application/json"
NPY = "application/x-npy"
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")

# The top-k asked for by the request being handled (a custom output_fn has no argument for it).
current_top_k: contextvars.ContextVar[int] = contextvars.ContextVar("top_k", default=5)


class ServingError(Exception):
    """An error with an HTTP status; its message tells the caller what to fix."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ServingError):
    status = 400


class PayloadTooLarge(ServingError):
    status = 413


class UnsupportedContentType(ServingError):
    status = 415


class NotAcceptable(ServingError):
    status = 406


class ClientClosedRequest(ServingError):
    """The client hung up before sending its whole body (nginx's 499: not a server error)."""

    status = 499


class ModelError(ServingError):
    status = 500


class NotReady(ServingError):
    status = 503


class RequestTimeout(ServingError):
    status = 504


# ------------------------------------------------------------------------------- decoding


DEFAULT_MAX_INSTANCES = 64
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000


class Cancelled(ServingError):
    """The request timed out (or its client left) while it was being decoded."""

    status = 504


@dataclass(frozen=True)
class DecodeOptions:
    """What the default ``input_fn`` needs: the model's preprocessing and the request's limits.

    Attributes:
        preprocess: the model's preprocessing.
        max_pixels: the most pixels of one image (decompression bombs); ``None``: Pillow's.
        max_instances: the most images in one request.
        max_request_pixels: the most pixels of all a request's images together, read from the
            image headers before anything is decoded.
        cancel: set when the request timed out: decoding stops before the next image.
    """

    preprocess: Preprocess = field(default_factory=Preprocess)
    max_pixels: int | None = None
    max_instances: int = DEFAULT_MAX_INSTANCES
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    cancel: threading.Event | None = field(default=None, compare=False)

    def for_request(self, cancel: threading.Event) -> DecodeOptions:
        """These options with a request's own cancel flag."""
        return dataclasses.replace(self, cancel=cancel)

    def check_cancelled(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the request timed out before its images were decoded")


def _declared_pixels(data: bytes) -> int:
    """Width x height from an image's header (nothing decoded); 0 when Pillow cannot tell."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # not an image: the real decode says why, with the usual 400
        return 0
    return int(width) * int(height)


def _check_instances(count: int, opts: DecodeOptions) -> None:
    if count > opts.max_instances:
        raise PayloadTooLarge(
            f"{count} images in one request is over the limit of {opts.max_instances} "
            "(--max-instances); send them in several requests"
        )


def _image_to_batch(data: bytes, opts: DecodeOptions) -> torch.Tensor:
    from visiontune.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
    from visiontune.inference import preprocess_batch

    opts.check_cancelled()
    limit = opts.max_pixels if opts.max_pixels is not None else DEFAULT_MAX_PIXELS
    try:
        image = load_image(data, decode_size=decode_size_hint(opts.preprocess), max_pixels=limit)
    except ImageDecodeError as e:
        raise BadRequest(f"cannot decode the image: {e.reason}") from None
    return preprocess_batch([image], opts.preprocess)


def decode_image_body(body: bytes, opts: DecodeOptions) -> torch.Tensor:
    """One encoded image (any format Pillow reads) -> a ``(1, 3, S, S)`` batch."""
    if not body:
        raise BadRequest("the request body is empty; send the image bytes")
    return _image_to_batch(body, opts)


def decode_json_body(body: bytes, opts: DecodeOptions) -> torch.Tensor:
    """``{"instances": [{"b64": "<base64 image>"}, ...]}`` -> an ``(N, 3, S, S)`` batch."""
    shape = 'send {"instances": [{"b64": "<base64-encoded image>"}, ...]}'
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e}); {shape}") from None
    except RecursionError:
        raise BadRequest(f"the JSON body is nested too deeply; {shape}") from None
    instances = doc.get("instances") if isinstance(doc, dict) else None
    if not isinstance(instances, list) or not instances:
        raise BadRequest(f"no images in the JSON body; {shape}")
    _check_instances(len(instances), opts)
    images = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or not isinstance(instance.get("b64"), str):
            raise BadRequest(f'instances[{i}] has no "b64" string; {shape}')
        try:
            data = base64.b64decode(instance["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"instances[{i}].b64 is not valid base64") from None
        if not data:
            raise BadRequest(f"instances[{i}].b64 is empty; it must hold the image bytes")
        images.append(data)
    # The whole request's pixels, from the headers, before a single image is decoded.
    pixels = sum(_declared_pixels(data) for data in images)
    if pixels > opts.max_request_pixels:
        raise PayloadTooLarge(
            f"the images hold {pixels:,} pixels together, over the limit of "
            f"{opts.max_request_pixels:,} per request (--max-request-pixels); send smaller "
            "images or fewer per request"
        )
    tensors = []
    for i, data in enumerate(images):
        try:
            tensors.append(_image_to_batch(data, opts))
        except BadRequest as e:
            raise BadRequest(f"instances[{i}]: {e}") from None
    return torch.cat(tensors)


def decode_npy_body(body: bytes, opts: DecodeOptions) -> torch.Tensor:
    """An already preprocessed float array ``(3, S, S)`` or ``(N, 3, S, S)`` -> a batch."""
    size = opts.preprocess.input_size
    expected = f"(3, {size}, {size}) or (N, 3, {size}, {size})"
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError... for a bad file
        raise BadRequest(f"the body is not a .npy array ({e}); send numpy.save() output") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
        raise BadRequest(f"the array must hold floats, got dtype {getattr(array, 'dtype', '?')}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim == 4:
        _check_instances(int(array.shape[0]), opts)
    if array.ndim != 4 or tuple(array.shape[1:]) != (3, size, size) or array.shape[0] == 0:
        raise BadRequest(
            f"array shape {tuple(array.shape)} does not fit this model; expected {expected} "
            f"(normalised with mean {list(opts.preprocess.mean)}, std {list(opts.preprocess.std)})"
        )
    # Cast first: a float64 1e300 is finite, and infinite as the float32 the model reads.
    with np.errstate(over="ignore"):  # the overflow is the check below, not a warning
        array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise BadRequest("the array holds NaN or infinite values (as float32)")
    return torch.from_numpy(array)


# Content type -> decoder. A new input format is one entry here.
DECODERS: dict[str, Callable[[bytes, DecodeOptions], torch.Tensor]] = {
    **dict.fromkeys(IMAGE_TYPES, decode_image_body),
    JSON: decode_json_body,
    NPY: decode_npy_body,
}


def media_type(header: str | None) -> str:
    """``"image/JPEG; q=1"`` -> ``"image/jpeg"``; a missing header means raw image bytes."""
    if not header:
        return "application/octet-stream"
    return header.split(";", 1)[0].strip().lower()


def check_content_type(content_type: str) -> None:
    """Raise 415 unless the default ``input_fn`` reads ``content_type``."""
    if content_type not in DECODERS:
        raise UnsupportedContentType(
            f"content type {content_type!r} is not supported; use one of {', '.join(DECODERS)}"
        )


# ------------------------------------------------------------------------------- encoding


def _check_finite(probs: torch.Tensor, info) -> None:
    """A request whose probabilities are not finite is refused, never answered with NaN.

    The weights are finite (checked when the model is loaded), so only an input overflows
    the network: an ``.npy`` body of huge values (1e38 passes the NaN/inf check) gave 200 with
    ``"probability": NaN``, which is not JSON to strict parsers.
    """
    if not bool(torch.isfinite(probs).all()):
        raise BadRequest(
            "the model's answer for this input is not finite (the input overflowed it); an "
            f".npy body must be normalised with mean {list(info.preprocess.mean)}, "
            f"std {list(info.preprocess.std)}"
        )


def _json_predictions(probs: torch.Tensor, info, top_k: int) -> bytes:
    from visiontune.inference import topk

    _check_finite(probs, info)
    return json.dumps(
        {
            "model": info.name,
            "version": info.version,
            "predictions": topk(probs, info.class_ids, info.class_names, top_k),
        }
    ).encode()


def _npy_predictions(probs: torch.Tensor, info, top_k: int) -> bytes:
    _check_finite(probs, info)
    buffer = io.BytesIO()
    np.save(buffer, probs.float().numpy(), allow_pickle=False)
    return buffer.getvalue()


# Accept type -> encoder of probabilities. JSON first: it is what */* gets.
ENCODERS: dict[str, Callable[[torch.Tensor, Any, int], bytes]] = {
    JSON: _json_predictions,
    NPY: _npy_predictions,
}


def default_accept(accept: str | None) -> str:
    """The Accept a handler's ``output_fn`` sees: a missing or ``*/*`` one means JSON.

    SageMaker's inference toolkit does the same, so a seed-style ``output_fn`` that checks
    ``accept == "application/json"`` works with curl, which sends ``*/*``.
    """
    if not accept or not accept.strip():
        return JSON
    ranges = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    if ranges <= {"*/*", ""}:
        return JSON
    return accept


def negotiate(accept: str | None) -> str:
    """Pick the response type for an ``Accept`` header; raise 406 when none is supported.

    Missing, ``*/*`` and ``application/*`` give JSON. Alternatives are tried by their ``q``.
    """
    if not accept or not accept.strip():
        return JSON
    options = []
    for position, part in enumerate(accept.split(",")):
        pieces = [p.strip() for p in part.split(";")]
        quality = 1.0
        for param in pieces[1:]:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        options.append((-quality, position, pieces[0].lower()))
    for negative_q, _, kind in sorted(options):
        if negative_q >= 0:
            continue
        if kind in ("*/*", "application/*"):
            return JSON
        if kind in ENCODERS:
            return kind
    raise NotAcceptable(
        f"cannot answer with {accept!r}; accept one of {', '.join(ENCODERS)} (or */*)"
    )


# ------------------------------------------------------------------------------- the handler


# Handlers imported in this process, by resolved path: a module runs its top level once.
_USER_MODULES: dict[Path, Any] = {}


def load_user_module(path: str | os.PathLike) -> Any:
    """Import a user's ``inference.py`` once per process (its folder goes on ``sys.path``).

    Checking the options and building the app both need the module; importing it twice would
    run its top level (often a slow model download or a print) twice.
    """
    path = Path(path).resolve()
    if path in _USER_MODULES:
        return _USER_MODULES[path]
    if not path.is_file():
        raise UserError(f"handler file not found: {path}")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"visiontune_user_handler_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    if not any(callable(getattr(module, step, None)) for step in STEPS):
        raise UserError(f"{path} defines none of {', '.join(STEPS)}; nothing to override")
    _USER_MODULES[path] = module
    return module


class Handler:
    """The steps in use (defaults plus a user's overrides) and the model they serve.

    Args:
        model_dir: the directory given to ``model_fn``.
        module: a user's imported ``inference.py``, or ``None`` for all defaults.
        runtime: the default ``model_fn``'s runtime name (``auto``, ``torch`` or ``onnx``).
        device, precision, threads: passed to the runtime.
        max_pixels: the image pixel limit of the default ``input_fn``.
        top_k: default number of classes per image in answers.
        max_instances, max_request_pixels: the default ``input_fn``'s per-request limits.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        module: Any = None,
        *,
        runtime: str = "auto",
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        max_pixels: int | None = None,
        top_k: int = 5,
        max_instances: int = DEFAULT_MAX_INSTANCES,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    ):
        self.model_dir = str(model_dir)
        self.runtime_name = runtime
        self.runtime_options = {"device": device, "precision": precision, "threads": threads}
        self.top_k = top_k
        self.decode = DecodeOptions(
            max_pixels=max_pixels,
            max_instances=max_instances,
            max_request_pixels=max_request_pixels,
        )
        self.overridden = {
            step for step in STEPS if module is not None and callable(getattr(module, step, None))
        }
        steps = {step: getattr(module, step) for step in self.overridden}
        self.model_fn = steps.get("model_fn", self.default_model_fn)
        self.input_fn = steps.get("input_fn", self.default_input_fn)
        self.predict_fn = steps.get("predict_fn", self.default_predict_fn)
        self.output_fn = steps.get("output_fn", self.default_output_fn)
        self.transform_fn = steps.get("transform_fn")
        self.model: Any = None
        self.info = None

    @property
    def batched(self) -> bool:
        """True when requests may share batches (no custom model/input/predict/transform step)."""
        return not (self.overridden & {"model_fn", "input_fn", "predict_fn", "transform_fn"})

    @property
    def custom_output(self) -> bool:
        return "output_fn" in self.overridden

    # -------------------------------------------------------------- defaults

    def default_model_fn(self, model_dir: str) -> Any:
        """Load a visiontune model directory with the configured runtime."""
        from visiontune.serving.runtimes import load_runtime

        return load_runtime(self.runtime_name, model_dir, **self.runtime_options)

    def default_input_fn(self, request_body: bytes, content_type: str) -> torch.Tensor:
        """Decode a request body into a preprocessed ``(N, 3, S, S)`` batch."""
        check_content_type(content_type)
        return DECODERS[content_type](request_body, self.decode)

    def default_predict_fn(self, input_data: Any, model: Any) -> Any:
        """Probabilities from a runtime; raw outputs from a plain ``nn.Module``."""
        if hasattr(model, "predict") and hasattr(model, "info"):
            return model.predict(input_data)
        with torch.inference_mode():
            return model(input_data)

    def default_output_fn(self, prediction: Any, accept: str) -> bytes:
        """Top-k JSON (or ``.npy`` probabilities) for a visiontune model; JSON for anything else."""
        kind = negotiate(accept)
        if self.info is not None and isinstance(prediction, torch.Tensor):
            return ENCODERS[kind](prediction, self.info, current_top_k.get())
        if kind != JSON:
            raise NotAcceptable(f"this model answers only {JSON}")
        if isinstance(prediction, torch.Tensor | np.ndarray):
            prediction = prediction.tolist()
        return json.dumps(prediction).encode()

    # -------------------------------------------------------------- running

    def load(self) -> None:
        """Run ``model_fn`` and learn the model's labels and preprocessing when it has them."""
        self.model = self.model_fn(self.model_dir)
        info = getattr(self.model, "info", None)
        if info is not None and hasattr(info, "preprocess"):
            self.info = info
            self.decode = dataclasses.replace(self.decode, preprocess=info.preprocess)

    def handle(self, body: bytes, content_type: str, accept: str) -> tuple[bytes, str]:
        """Run the steps for one request (the unbatched path) and return ``(body, type)``."""
        if self.transform_fn is not None:
            try:
                result = self.transform_fn(self.model, body, content_type, accept)
            except ServingError:
                raise
            except Exception as e:
                raise ModelError(f"error in transform_fn: {type(e).__name__}: {e}") from e
            return _sendable("transform_fn", result, accept)
        try:
            data = self.input_fn(body, content_type)
        except ServingError:
            raise
        except (ValueError, TypeError, OSError, RecursionError) as e:  # a handler's bad input
            raise BadRequest(f"input_fn rejected the request: {type(e).__name__}: {e}") from None
        except Exception as e:
            raise ModelError(f"error in input_fn: {type(e).__name__}: {e}") from e
        try:
            prediction = self.predict_fn(data, self.model)
        except ServingError:
            raise
        except Exception as e:
            raise ModelError(f"error in predict_fn: {type(e).__name__}: {e}") from e
        return self.encode(prediction, accept)

    def encode(self, prediction: Any, accept: str) -> tuple[bytes, str]:
        """Run ``output_fn`` and return ``(body, content type)``."""
        try:
            result = self.output_fn(prediction, accept)
        except ServingError:
            raise
        except Exception as e:
            raise ModelError(f"error in output_fn: {type(e).__name__}: {e}") from e
        if not self.custom_output:
            return result, negotiate(accept)
        return _sendable("output_fn", result, accept)


def _sendable(step: str, result: Any, accept: str) -> tuple[bytes, str]:
    """:func:`encode_output` of a custom step's return value; one it cannot send (a set, an
    object, a content type that is not a header value) is a 500 naming the step, like an
    exception raised inside it, instead of an anonymous internal error."""
    try:
        return encode_output(result, accept)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{step} returned what cannot be sent: {e}") from e


def encode_output(result: Any, accept: str) -> tuple[bytes, str]:
    """SageMaker toolkit semantics for a custom step's return value.

    A ``(body, content_type)`` tuple is used as is; ``str``/``bytes`` is the body with the
    request's Accept as its content type; anything else is sent as JSON.
    """
    content_type = accept if accept and "*" not in accept else JSON
    if isinstance(result, tuple) and len(result) == 2:
        result, content_type = result
        if not isinstance(content_type, str) or not content_type.isprintable():
            # None or an int is not a header value, and a CR/LF would split the response.
            raise TypeError(f"the content type {content_type!r} is not a one-line string")
    if isinstance(result, str):
        return result.encode(), content_type
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result), content_type
    if isinstance(result, torch.Tensor | np.ndarray):
        result = result.tolist()
    try:
        return json.dumps(result).encode(), JSON
    except TypeError as e:
        raise TypeError(
            f"{type(result).__name__} is not bytes, str or JSON-serialisable ({e})"
        ) from e
