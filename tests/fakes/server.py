"""Common base of the fake upstream HTTP servers used by the tests.

Each fake is a real aiohttp server bound to 127.0.0.1 on a port the OS picks, running
in its own thread with its own event loop, so any test (whatever its event loop) and
any subprocess of the app under test can reach it by URL.

Every request is recorded (under a lock) before any injected fault is applied, so
tests can assert the exact number of upstream attempts.

Fault semantics shared by all fakes:

* ``status`` / ``rate_limit``: the request is rejected before it is processed.
* ``delay``: the fake waits, then processes and answers normally.
* ``hang`` / ``reset`` / ``malformed``: the request IS processed (side effects such as
  a created prediction happen), then its response is withheld / the connection is
  aborted / the body is replaced by something that is not JSON. This models
  "the server did the work but the client lost the answer".
* ``bad_content`` / ``prediction_failed``: provider-specific, see the subclasses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FAULT_KINDS = frozenset(
    {
        "delay",
        "status",
        "rate_limit",
        "hang",
        "reset",
        "malformed",
        "wrong_shape",
        "bad_content",
        "prediction_failed",
    }
)

# Faults after which the request is still processed but the client never gets a
# usable answer.
LOST_RESPONSE_KINDS = frozenset({"hang", "reset", "malformed", "wrong_shape"})

MALFORMED_BODY = b'{"id": "truncated-by-fault-injection", "choices": [<html>502 Bad Gateway'
# Valid JSON that the SDKs accept without validating, in a shape no API sends.
WRONG_SHAPE_BODY = b'{"id": 42, "object": "chat.completion", "choices": [{"message": null}]}'


@dataclass(frozen=True)
class Fault:
    """An injected upstream failure. Build it with the static constructors."""

    kind: str
    seconds: float = 0.0
    status_code: int = 0
    message: str | None = None
    retry_after: str | None = None
    retry_after_ms: int | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    @staticmethod
    def delay(seconds: float) -> Fault:
        """Wait ``seconds``, then process and answer normally."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        return Fault("delay", seconds=seconds)

    @staticmethod
    def status(code: int, message: str | None = None) -> Fault:
        """Answer ``code`` with the provider's error body (default message per code)."""
        if not 400 <= code <= 599:
            raise ValueError("status faults need a 4xx or 5xx code")
        return Fault("status", status_code=code, message=message)

    @staticmethod
    def rate_limit(retry_after: str | None = "2", retry_after_ms: int | None = None) -> Fault:
        """429 with ``Retry-After`` (seconds or HTTP date) / ``retry-after-ms`` headers.

        A header is omitted when its value is None.
        """
        return Fault(
            "rate_limit", status_code=429, retry_after=retry_after, retry_after_ms=retry_after_ms
        )

    @staticmethod
    def hang() -> Fault:
        """Process the request and never answer (until reset() or stop())."""
        return Fault("hang")

    @staticmethod
    def reset() -> Fault:
        """Process the request, then abort the TCP connection (RST) with no response."""
        return Fault("reset")

    @staticmethod
    def malformed() -> Fault:
        """Process the request, then answer 200 application/json with a non-JSON body."""
        return Fault("malformed")

    @staticmethod
    def wrong_shape() -> Fault:
        """Process the request, then answer 200 with valid JSON of the wrong shape."""
        return Fault("wrong_shape")

    @staticmethod
    def bad_content() -> Fault:
        """A well-formed reply whose story content is not the story JSON."""
        return Fault("bad_content")

    @staticmethod
    def prediction_failed(error: str = "CUDA out of memory (injected fault)") -> Fault:
        """(Replicate) the prediction is created, then ends ``failed`` with ``error``."""
        return Fault("prediction_failed", error=error)


#: the fault (or None) chosen for a request, and its parsed JSON body, for the handlers
FAULT_KEY = web.RequestKey[Fault | None]("fault")
JSON_KEY = web.RequestKey[Any]("json")


@dataclass(frozen=True)
class RecordedCall:
    """One request the fake received. Header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any | None
    at: float  # time.monotonic()
    query: str = ""
    fault: Fault | None = None


@dataclass(frozen=True)
class _Rule:
    fault: Fault
    path: str | None
    method: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path is None or path.startswith(self.path)

    def specificity(self) -> tuple[int, int]:
        return (len(self.path or ""), 1 if self.method else 0)


def http_date(seconds_from_now: float) -> str:
    """An RFC 7231 HTTP date, e.g. for ``Fault.rate_limit(retry_after=http_date(3))``."""
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


# --- deterministic story text shared by the LLM fakes -------------------------------

PARAGRAPHS_RE = re.compile(r"paragraphs:\s*(\d+)", re.IGNORECASE)
DEFAULT_PARAGRAPHS = 3
MAX_PARAGRAPHS = 100
TITLE_TOPIC_CHARS = 60


def requested_paragraphs(texts: Iterable[str]) -> int:
    """The last ``paragraphs: N`` found in ``texts`` (clamped to 0..100), else 3."""
    found: int | None = None
    for text in texts:
        for match in PARAGRAPHS_RE.finditer(text):
            found = int(match.group(1))
    if found is None:
        return DEFAULT_PARAGRAPHS
    return max(0, min(found, MAX_PARAGRAPHS))


def story_topic(text: str) -> str:
    """The prompt without ``paragraphs: N`` directives, whitespace collapsed, shortened."""
    cleaned = " ".join(PARAGRAPHS_RE.sub(" ", text).split())
    if len(cleaned) <= TITLE_TOPIC_CHARS:
        return cleaned
    cut = cleaned[:TITLE_TOPIC_CHARS]
    head, sep, _ = cut.rpartition(" ")
    return head if sep and head else cut


def make_story(text: str, paragraphs: int) -> dict[str, Any]:
    """The story the fakes produce for a prompt: ``{"title": ..., "paragraphs": [...]}``."""
    topic = story_topic(text) or "nothing in particular"
    return {
        "title": f"A Story About {topic}",
        "paragraphs": [
            f"Paragraph {i} of {paragraphs}: once upon a time there was {topic}, "
            f"and this is part {i} of what happened next."
            for i in range(1, paragraphs + 1)
        ],
    }


def make_story_json(text: str, paragraphs: int) -> str:
    return json.dumps(make_story(text, paragraphs))


def word_count(text: str) -> int:
    return len(text.split())


# --- the server ----------------------------------------------------------------------


class FakeServer:
    """A fake upstream: an aiohttp app served from a background thread."""

    #: fault kinds this fake understands (others are rejected by set_fault/fail_next)
    supported_faults: ClassVar[frozenset[str]] = frozenset(
        {"delay", "status", "rate_limit", "hang", "reset", "malformed", "wrong_shape"}
    )
    #: requests under these path prefixes need ``Authorization: Bearer <token>``
    auth_prefixes: ClassVar[tuple[str, ...]] = ("/v1/",)
    shutdown_timeout: ClassVar[float] = 2.0

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._calls: list[RecordedCall] = []
        self._persistent: dict[tuple[str | None, str | None], _Rule] = {}
        self._queued: collections.deque[_Rule] = collections.deque()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        # Set (in the server loop) to release hanging/delayed requests; replaced on reset.
        self._release: asyncio.Event | None = None

    # --- lifecycle ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError(f"{type(self).__name__} was never started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start serving (idempotent). A restart after stop() reuses the same port."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as error:  # reported to start()'s caller
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        thread = threading.Thread(target=run, name=f"{type(self).__name__}-loop", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise RuntimeError(f"{type(self).__name__} failed to start") from failure[0]
        self._loop = loop
        self._thread = thread

    async def _serve(self) -> None:
        self._release = asyncio.Event()
        app = web.Application(middlewares=[self._make_middleware()], client_max_size=16 << 20)
        app.add_routes(self.routes())
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=self.shutdown_timeout, handle_signals=False
        )
        await runner.setup()
        # A real API's front end accepts a burst of a thousand connections; aiohttp's
        # default backlog (128) refused them (the capacity benchmark's 1000 callers).
        site = web.TCPSite(runner, self.host, self._port, reuse_address=True, backlog=4096)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    def stop(self) -> None:
        """Stop serving (idempotent). Hanging and delayed requests are aborted."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            future.result(timeout=self.shutdown_timeout + 10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._thread = None
            self._loop = None

    async def _shutdown(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def __enter__(self) -> FakeServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- faults ------------------------------------------------------------------

    def _check_fault(self, fault: Fault) -> None:
        if fault.kind not in self.supported_faults:
            raise ValueError(f"{type(self).__name__} does not support {fault.kind!r} faults")

    def set_fault(
        self, fault: Fault | None, *, path: str | None = None, method: str | None = None
    ) -> None:
        """Install (or with None, clear) a persistent fault for matching requests.

        ``path`` is a prefix of the URL path, ``method`` an HTTP method; None matches all.
        One persistent fault is kept per (path, method); when several match a request,
        the most specific (longest path, then method-specific) wins. ``set_fault(None)``
        without path and method clears every persistent fault.
        """
        key = (path, method.upper() if method else None)
        with self._lock:
            if fault is None:
                if path is None and method is None:
                    self._persistent.clear()
                else:
                    self._persistent.pop(key, None)
                return
            self._check_fault(fault)
            self._persistent[key] = _Rule(fault, path, key[1])

    def fail_next(
        self, fault: Fault, *, times: int = 1, path: str | None = None, method: str | None = None
    ) -> None:
        """Queue ``times`` one-shot faults, consumed FIFO by matching requests.

        Queued faults take precedence over the persistent fault.
        """
        self._check_fault(fault)
        if times < 1:
            raise ValueError("times must be >= 1")
        rule = _Rule(fault, path, method.upper() if method else None)
        with self._lock:
            self._queued.extend([rule] * times)

    def pending_faults(self) -> int:
        """How many queued one-shot faults are not consumed yet."""
        with self._lock:
            return len(self._queued)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        # caller holds self._lock
        for index, rule in enumerate(self._queued):
            if rule.matches(method, path):
                del self._queued[index]
                return rule.fault
        matching = [rule for rule in self._persistent.values() if rule.matches(method, path)]
        if not matching:
            return None
        return max(matching, key=_Rule.specificity).fault

    # --- recording ---------------------------------------------------------------

    @property
    def calls(self) -> list[RecordedCall]:
        """A copy of every request received since the last reset(), oldest first."""
        with self._lock:
            return list(self._calls)

    def count(self, *, method: str | None = None, path: str | None = None) -> int:
        """How many recorded requests match ``method`` and the path prefix ``path``."""
        with self._lock:
            return sum(
                1
                for call in self._calls
                if (method is None or call.method == method.upper())
                and (path is None or call.path.startswith(path))
            )

    async def wait_for_count(
        self,
        n: int,
        *,
        method: str | None = None,
        path: str | None = None,
        within: float = 10.0,
    ) -> None:
        """Wait (on any event loop) until ``count(method=, path=)`` reaches ``n``.

        ``within`` is only a guard against a test hanging forever; it raises TimeoutError.
        """
        deadline = time.monotonic() + within
        while self.count(method=method, path=path) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{type(self).__name__} saw {self.count(method=method, path=path)} "
                    f"matching calls, expected {n}"
                )
            await asyncio.sleep(0.005)

    def reset(self) -> None:
        """Clear faults, recorded calls and per-test state; release hanging requests."""
        with self._lock:
            self._calls.clear()
            self._persistent.clear()
            self._queued.clear()
            self._reset_state()
        loop = self._loop
        if loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # loop closed concurrently by stop()
                asyncio.run_coroutine_threadsafe(self._release_waiters(), loop).result(timeout=10)

    async def _release_waiters(self) -> None:
        old, self._release = self._release, asyncio.Event()
        if old is not None:
            old.set()

    def _reset_state(self) -> None:
        """Subclasses clear their per-test state here (called with the lock held)."""

    # --- request pipeline --------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        """The subclass's routes."""
        return []

    def error_response(
        self, status: int, message: str | None = None, *, headers: dict[str, str] | None = None
    ) -> web.Response:
        """An error reply in the provider's error body format (overridden per provider)."""
        return web.json_response(
            {"error": message or f"HTTP {status}"}, status=status, headers=headers
        )

    def unauthorized_response(self) -> web.Response:
        return self.error_response(401, "missing or invalid Authorization bearer token")

    def _fault_response(self, fault: Fault) -> web.Response:
        if fault.kind == "rate_limit":
            headers: dict[str, str] = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = str(fault.retry_after_ms)
            return self.error_response(429, fault.message, headers=headers)
        return self.error_response(fault.status_code, fault.message)

    @staticmethod
    def _authorized(request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(token.strip())

    async def _wait_released(self, seconds: float | None) -> bool:
        """Wait until reset()/stop() releases waiters; False if ``seconds`` passed first."""
        release = self._release
        if release is None:
            return True
        try:
            await asyncio.wait_for(release.wait(), seconds)
        except TimeoutError:
            return False
        return True

    @staticmethod
    def _abort(request: web.Request) -> web.Response:
        """Abort the connection with a TCP RST; the returned response is never sent."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        # aiohttp fails to write this to the aborted transport and drops the connection.
        return web.Response(status=502)

    def _make_middleware(self) -> Any:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            raw = await request.read()
            try:
                body: Any | None = json.loads(raw) if raw else None
            except ValueError:
                body = None
            method, path = request.method.upper(), request.path
            with self._lock:
                fault = self._take_fault(method, path)
                self._calls.append(
                    RecordedCall(
                        method=method,
                        path=path,
                        headers={k.lower(): v for k, v in request.headers.items()},
                        json=body,
                        at=time.monotonic(),
                        query=request.query_string,
                        fault=fault,
                    )
                )
            request[FAULT_KEY] = fault
            request[JSON_KEY] = body
            if fault is not None:
                if fault.kind in ("status", "rate_limit"):
                    return self._fault_response(fault)
                if fault.kind == "delay" and await self._wait_released(fault.seconds):
                    return self._abort(request)  # reset()/stop() during the delay
            if path.startswith(self.auth_prefixes) and not self._authorized(request):
                return self.unauthorized_response()
            try:
                response = await handler(request)
            except web.HTTPException as error:  # unknown route, wrong method, ...
                response = self.error_response(error.status, error.reason)
            if fault is None:
                return response
            if fault.kind == "hang":
                await self._wait_released(None)
                return self._abort(request)
            if fault.kind == "reset":
                return self._abort(request)
            if fault.kind == "malformed":
                return web.Response(
                    status=200, body=MALFORMED_BODY, content_type="application/json"
                )
            if fault.kind == "wrong_shape":
                return web.Response(
                    status=200, body=WRONG_SHAPE_BODY, content_type="application/json"
                )
            return response

        return middleware
