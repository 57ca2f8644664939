"""uvicorn's HTTP protocol, answering malformed requests with JSON like every other error.

uvicorn writes its own ``400 Invalid HTTP request received.`` as text/plain before the app sees
anything; :class:`JsonErrorProtocol` keeps uvicorn's parser and only changes that answer. It is
named to uvicorn by its import path, so worker processes import it themselves.
"""

from __future__ import annotations

import json
import uuid

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # httptools is optional for uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base  # type: ignore[assignment]


class JsonErrorProtocol(_Base):  # type: ignore[misc, valid-type]
    """uvicorn's fastest available HTTP/1.1 protocol with a JSON 400 for unparsable requests."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(
            {
                "error": f"{msg.rstrip('.')}: the request is not valid HTTP/1.1",
                "request_id": uuid.uuid4().hex,
            }
        ).encode()
        head = (
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()
