"""The HTTP/1.1 connection as `python -m app` serves it: uvicorn's h11 protocol, with a deadline
for reading each request.

uvicorn cuts a connection only when it has been idle *between* requests for
`timeout_keep_alive`. A connection that never sends a byte, or sends its request
head (or body) one byte every few seconds, is held for as long as the client
likes: each one a socket, a protocol object and its buffers (slowloris). Here every
request must have arrived in full within `REQUEST_READ_TIMEOUT_SECONDS`, counted
from the connection opening or from the request's first byte: otherwise the client
gets a plain 408 (when it had started a request) and the connection is closed.

The request head (request line and headers) is bounded too: above
`MAX_REQUEST_HEAD_BYTES` the client gets a plain 431 and the connection is closed
before h11 parses anything. h11's own bound (`h11_max_incomplete_event_size`, the
same figure) only counts a head still incomplete after a read, so a larger head
arriving in one read (up to 256 KiB) would pass it. h11 rather than httptools
(uvicorn's default when installed): httptools bounds nothing and took a 1 MB header.

uvicorn builds protocols itself, in every worker process, from `http=` given as an
import string; the deadline travels in the environment (`python -m app` sets it).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: Set by `python -m app` from REQUEST_READ_TIMEOUT_SECONDS, read by each worker.
READ_TIMEOUT_ENV = "STORY_SERVER_REQUEST_READ_TIMEOUT"
DEFAULT_READ_TIMEOUT_SECONDS = 10.0
IMPORT_PATH = "app.http.server:DeadlineH11Protocol"
# h11's default, used when no bound is configured.
DEFAULT_MAX_HEAD_BYTES = 16 * 1024


def _plain_response(status: str, text: str) -> bytes:
    body = text.encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


_REQUEST_TIMEOUT = _plain_response("408 Request Timeout", "The request did not arrive in time.")
_HEAD_TOO_LARGE = _plain_response(
    "431 Request Header Fields Too Large", "The request headers are too large."
)
# h11 ends a head at an empty line, with or without carriage returns.
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def read_timeout_seconds() -> float:
    try:
        value = float(os.environ.get(READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT_SECONDS))
    except ValueError:
        return DEFAULT_READ_TIMEOUT_SECONDS
    return value if value > 0 else DEFAULT_READ_TIMEOUT_SECONDS


class DeadlineH11Protocol(H11Protocol):
    """`H11Protocol` plus a deadline on receiving each request (head and body)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout_seconds()
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_request()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self._stop_deadline()
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()
            return
        super().data_received(data)
        self._watch_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the request head being received (buffered + `data`) is over the bound."""
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_HEAD_BYTES
        received = self.conn.trailing_data[0] + data
        end = _HEAD_END.search(received, 0, limit + 4)
        return (end.start() if end else len(received)) > limit

    def _watch_request(self) -> None:
        """Deadline armed while a request is owed or arriving; cleared once it is all in.

        Between requests uvicorn's keep-alive timer is the one running: it is
        cancelled by the next request's first byte, which arms this deadline.
        """
        arriving = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
        if self.transport.is_closing() or not arriving:
            self._stop_deadline()
        elif self._read_deadline is None and self.timeout_keep_alive_task is None:
            self._read_deadline = self.loop.call_later(self.read_timeout, self._on_read_deadline)

    def _stop_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _on_read_deadline(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        receiving_body = self.conn.their_state is h11.SEND_BODY
        cycle = self.cycle
        if receiving_body and cycle is not None and cycle.response_started:
            if not cycle.response_complete:
                return  # the app is still answering; the client's next byte re-arms this
            self.transport.close()  # answered already: the rest of the body is not awaited
            return
        if receiving_body or self.conn.trailing_data[0]:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()
