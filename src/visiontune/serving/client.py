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
    """``http://host:8080`` or ``http://host:8080/invocations`` -> the invocations URL."""
    url = url.rstrip("/")
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

    def invoke(self, body: bytes, content_type: str, *, top_k: int | None = None) -> dict[str, Any]:
        """POST ``body`` to ``/invocations`` and return the decoded JSON answer.

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
                message, request_id = response.text or response.reason_phrase, None
            raise EndpointError(response.status_code, str(message), request_id)
        return response.json()

    def predict(
        self, image: str | os.PathLike | bytes, *, top_k: int | None = None
    ) -> list[dict[str, Any]]:
        """The top-k ``{label, class_id, probability}`` for one image (a path or its bytes).

        Raises:
            EndpointError: the endpoint refused the image or failed.
            FileNotFoundError: ``image`` is a path that does not exist.
        """
        if isinstance(image, bytes | bytearray):
            body, content_type = bytes(image), "application/x-image"
        else:
            body, content_type = Path(image).read_bytes(), _content_type(image)
        answer = self.invoke(body, content_type, top_k=top_k)
        return answer["predictions"][0]


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
        One dict per image: ``{"image": path, "predictions": [{label, class_id, probability}]}``
        or ``{"image": path, "error": "..."}`` when that image failed.

    Raises:
        UserError: the endpoint cannot be reached at all.
    """
    results: list[dict[str, Any]] = []
    with Predictor(url, top_k=top_k, timeout=timeout) as predictor:
        for image in images:
            try:
                results.append({"image": image, "predictions": predictor.predict(image)})
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
