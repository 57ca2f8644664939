"""Talking to a running endpoint (visiontune's or any SageMaker-contract container) with httpx."""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from typing import Any

import httpx

from visiontune.errors import UserError

_IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


class EndpointError(Exception):
    """The endpoint answered with an error; ``message`` is its explanation."""

    def __init__(self, status: int, message: str, request_id: str | None = None):
        self.status, self.message, self.request_id = status, message, request_id
        where = f" (request {request_id})" if request_id else ""
        super().__init__(f"HTTP {status}: {message}{where}")


def invocations_url(url: str) -> str:
    """``http://host:8080`` or ``http://host:8080/invocations`` -> the invocations URL.

    Raises:
        UserError: ``url`` is not an ``http(s)://HOST[:PORT]`` URL (httpx would raise
            ``InvalidURL``, which is not a transport error, from deep inside the first request).
    """
    url = url.rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise UserError(f"endpoint URL {url!r} is not valid ({e})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UserError(
            f"endpoint URL {url!r} is not valid; give http(s)://HOST:PORT, "
            "e.g. http://127.0.0.1:8080"
        )
    return url if url.endswith("/invocations") else f"{url}/invocations"


def _content_type(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    return _IMAGE_TYPES.get(suffix) or (mimetypes.guess_type(str(path))[0] or "application/x-image")


class Predictor:
    """A small SageMaker-``Predictor``-like client for one endpoint.

    Example:
        >>> with Predictor("http://127.0.0.1:8080") as p:  # doctest: +SKIP
        ...     p.predict("dog.jpg")[0]["label"]

    Args:
        url: the endpoint's base URL (or its ``/invocations`` URL).
        top_k: classes per image to ask for.
        timeout: seconds per request.
    """

    def __init__(self, url: str, *, top_k: int = 5, timeout: float = 30.0):
        self.url = invocations_url(url)
        self.base_url = self.url[: -len("/invocations")]
        self.top_k = top_k
        self.client = httpx.Client(timeout=timeout)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def ping(self) -> bool:
        """True when the endpoint is loaded and ready (``GET /ping`` answers 200)."""
        try:
            return self.client.get(f"{self.base_url}/ping").status_code == 200
        except httpx.TransportError:
            return False

    def invoke(self, body: bytes, content_type: str, *, top_k: int | None = None) -> Any:
        """POST ``body`` to ``/invocations`` and return the decoded JSON answer.

        A custom handler may answer any JSON (or text, returned as a string).

        Raises:
            EndpointError: the endpoint answered with an error status.
            httpx.TransportError: the endpoint could not be reached.
        """
        response = self.client.post(
            self.url,
            content=body,
            headers={
                "Content-Type": content_type,
                "Accept": "application/json",
                "X-Amzn-SageMaker-Custom-Attributes": f"top_k={top_k or self.top_k}",
            },
        )
        if response.status_code != 200:
            try:
                doc = response.json()
                message, request_id = doc.get("error", response.text), doc.get("request_id")
            except ValueError:
                message, request_id = _plain_error(response), None
            raise EndpointError(response.status_code, str(message), request_id)
        try:
            return response.json()
        except ValueError:  # a custom output_fn may answer CSV, text...
            return response.text

    def answer(self, image: str | os.PathLike | bytes, *, top_k: int | None = None) -> Any:
        """The endpoint's whole answer for one image (a path or its bytes), whatever its shape.

        Raises:
            EndpointError: the endpoint refused the image or failed.
            FileNotFoundError: ``image`` is a path that does not exist.
        """
        if isinstance(image, bytes | bytearray):
            body, content_type = bytes(image), "application/x-image"
        else:
            body, content_type = Path(image).read_bytes(), _content_type(image)
        return self.invoke(body, content_type, top_k=top_k)

    def predict(
        self, image: str | os.PathLike | bytes, *, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """The top-k ``{label, class_id, probability}`` for one image (a path or its bytes).

        Raises:
            EndpointError: the endpoint refused the image, failed, or answered in another shape
                than visiontune's (a custom handler: use :meth:`answer`).
            FileNotFoundError: ``image`` is a path that does not exist.
        """
        answer = self.answer(image, top_k=top_k)
        top = visiontune_predictions(answer)
        if top is None:
            raise EndpointError(200, f"the endpoint answered another shape: {_short(answer)}")
        return top


def _plain_error(response: httpx.Response, limit: int = 300) -> str:
    """One line for an error answer that is not JSON: a web server's HTML error page (the URL
    is not an endpoint) was printed whole, dozens of lines per image."""
    kind = response.headers.get("content-type", "")
    text = " ".join(response.text.split())
    if not text or "html" in kind.lower():
        return (
            f"{response.reason_phrase}; the server answered {kind or 'an empty body'}, not a "
            "SageMaker-contract error: is this URL an endpoint (visiontune serve)?"
        )
    return text if len(text) <= limit else text[:limit] + "..."


def visiontune_predictions(answer: Any) -> list[dict[str, Any]] | None:
    """The first image's top-k when ``answer`` has visiontune's shape, else ``None``."""
    if not isinstance(answer, dict) or not isinstance(answer.get("predictions"), list):
        return None
    rows = answer["predictions"]
    if len(rows) != 1 or not isinstance(rows[0], list):
        return None
    if not all(isinstance(p, dict) and {"label", "probability"} <= set(p) for p in rows[0]):
        return None
    return rows[0]


def _short(answer: Any, limit: int = 200) -> str:
    import json

    text = answer if isinstance(answer, str) else json.dumps(answer)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_result(result: dict[str, Any]) -> str:
    """One line for a :func:`predict_endpoint` result: top-k, the error, or the raw answer."""
    if "error" in result:
        return f"{result['image']}: error: {result['error']}"
    if "predictions" in result:
        best = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in result["predictions"])
        return f"{result['image']}: {best}"
    return f"{result['image']}: {_short(result['response'], 2000)}"


def predict_endpoint(
    images: list[str], url: str, top_k: int = 5, timeout: float = 30
) -> list[dict[str, Any]]:
    """Predict each image with a running endpoint (``visiontune predict --endpoint URL``).

    Args:
        images: local image paths.
        url: the endpoint's base URL or its ``/invocations`` URL.
        top_k: classes per image.
        timeout: seconds per request.

    Returns:
        One dict per image: ``{"image": path, "predictions": [{label, class_id, probability}]}``,
        ``{"image": path, "response": <the answer>}`` when the endpoint is not visiontune's
        shape (a custom handler), or ``{"image": path, "error": "..."}`` when that image failed.

    Raises:
        UserError: the endpoint cannot be reached at all.
    """
    results: list[dict[str, Any]] = []
    with Predictor(url, top_k=top_k, timeout=timeout) as predictor:
        for image in images:
            try:
                answer = predictor.answer(image)
                top = visiontune_predictions(answer)
                if top is not None:
                    results.append({"image": image, "predictions": top})
                else:
                    results.append({"image": image, "response": answer})
            except EndpointError as e:
                results.append({"image": image, "error": str(e)})
            except OSError as e:
                results.append(
                    {"image": image, "error": f"cannot read the file: {e.strerror or e}"}
                )
            except httpx.TimeoutException:
                results.append({"image": image, "error": f"no answer within {timeout:g} s"})
            except httpx.TransportError as e:
                raise UserError(
                    f"cannot reach the endpoint {predictor.url} ({type(e).__name__}: {e}); "
                    "is `visiontune serve` running there?"
                ) from None
    return results
