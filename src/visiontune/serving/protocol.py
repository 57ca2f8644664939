"""uvicorn's HTTP protocol with what an exposed endpoint needs on top: JSON 400s, read timeouts.

* uvicorn writes its own ``400 Invalid HTTP request received.`` as text/plain before the app sees
  anything; here that answer is JSON like every other error.
* uvicorn has no timeout while a request is being received (its keep-alive timeout only covers
  idle connections), so a client that sends half a request holds a connection forever
  (slowloris). Here the headers must arrive within ``header_timeout_s`` (else 408 and the
  connection closes) and the body within ``body_timeout_s`` after them.

:class:`JsonErrorProtocol` is named to uvicorn by its import path, so worker processes import it
themselves; its timeouts come from the serve config in the environment (``CONFIG_ENV``).
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from asyncio import TimerHandle

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # httptools is optional for uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]

# httptools' parser calls on_message_begin / on_headers_complete; h11's does not.
_HAS_PARSER_HOOKS = hasattr(_Base, "on_headers_complete")
CONFIG_ENV = "VISIONTUNE_SERVE_CONFIG"
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 60.0


@functools.lru_cache(maxsize=4)
def _timeouts(raw: str) -> tuple[float, float]:
    try:
        config = json.loads(raw) if raw else {}
    except ValueError:
        config = {}
    return (
        float(config.get("header_timeout_s", DEFAULT_HEADER_TIMEOUT_S)),
        float(config.get("body_timeout_s", DEFAULT_BODY_TIMEOUT_S)),
    )


def _raw_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message, "request_id": uuid.uuid4().hex}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class JsonErrorProtocol(_Base):  # type: ignore[misc, valid-type]
    """uvicorn's fastest HTTP/1.1 protocol with JSON 400s and header/body read timeouts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.body_timeout_s = _timeouts(os.environ.get(CONFIG_ENV, ""))
        self._read_timer: TimerHandle | None = None
        self._reading_headers = False

    # -------------------------------------------------------------- read deadlines

    def _arm(self, seconds: float, headers: bool) -> None:
        self._disarm()
        self._reading_headers = headers
        self._read_timer = self.loop.call_later(seconds, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._reading_headers:
            # No request cycle exists yet: answer here, then hang up.
            self.transport.write(
                _raw_response(
                    "408 Request Timeout",
                    f"the request headers did not arrive within {self.header_timeout_s:g} s",
                )
            )
        # While a body is read the app owns the answer; it sees a disconnect (logged as 499).
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if _HAS_PARSER_HOOKS:
            self._arm(self.header_timeout_s, headers=True)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s, headers=True)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout_s, headers=False)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -------------------------------------------------------------- malformed requests

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(
            _raw_response(
                "400 Bad Request", f"{msg.rstrip('.')}: the request is not valid HTTP/1.1"
            )
        )
        self.transport.close()
