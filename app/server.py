"""uvicorn's httptools protocol with a bound on the request head: 431 past ``max_header_bytes``.

Why: httptools (llhttp) sets no limit on a request line or header, and uvicorn's protocol
buffers whatever arrives until the head is complete, so one connection could make the API hold
any amount of memory before a route, a middleware or the authentication gate ever ran (a
150 MiB header line to ``/healthz`` was answered 200). h11 has such a bound
(``h11_max_incomplete_event_size``) but answers 400, and is slower; the bound here is the same
setting, given to the protocol through uvicorn's config.

The head is counted as it arrives: the bytes of every chunk read while a request's head is
incomplete. Once past the bound the connection gets a 431 problem+json, its write side is
closed, and anything more the client sends is read and dropped until it hangs up (closing a
socket with unread data would reset the connection, and the client could lose the answer);
after ``DRAIN_S`` the connection is closed regardless. Memory stays within the bound plus one
read (at most 256 KiB).

Every server entry point uses it: ``clipguard serve`` (and so the image and docker-compose).
uvicorn's own command line can only name built-in protocols; run the API through
``clipguard serve`` to have the bound.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("clipguard.api")
DRAIN_S = 10.0
"""How long a refused connection is read (and dropped) so the client can read the 431 before it closes."""


def _answer_431(limit: int) -> bytes:
    body = json.dumps(
        {
            "type": "/problems/header-too-large",
            "title": "Request Header Fields Too Large",
            "status": 431,
            "detail": f"the request line and headers exceed {limit} bytes",
        }
    ).encode()
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/problem+json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that refuses a request head over ``config.h11_max_incomplete_event_size``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_limit: int = self.config.h11_max_incomplete_event_size or 65536
        self._in_head = False
        self._head_bytes = 0
        self._refused = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # drained: the answer is out, nothing more is parsed or kept
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.head_limit:
                self._refuse()

    def _refuse(self) -> None:
        self._refused = True
        log.warning("request head from %s over %d bytes: answered 431", self.client, self.head_limit)
        self.transport.write(_answer_431(self.head_limit))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(DRAIN_S, self.transport.close)
