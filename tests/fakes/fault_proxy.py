"""A TCP proxy with switchable faults, run in a background thread.

Put it in front of Redis (or any TCP service) to simulate a slow, silent or dead peer:

* ``pass``: forward both ways.
* ``latency``: like pass, plus ``latency_ms`` of delay per chunk, each way.
* ``blackhole``: accept connections and read from them, but never forward or answer;
  existing connections go silent too (data in either direction is dropped).
* ``reset``: new connections are accepted and aborted at once (TCP RST); existing
  connections are aborted when the mode is set.
* ``down``: the listening socket is closed (connection refused) and existing
  connections are aborted; any other mode listens again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

MODES = frozenset({"pass", "latency", "blackhole", "reset", "down"})
_CHUNK = 65536

T = TypeVar("T")


def _abort(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0)."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        _abort(self.client)
        if self.upstream is not None:
            self.upstream.transport.abort()


class FaultProxy:
    """``FaultProxy(target_host, target_port)``; see the module docstring for the modes."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 100.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self._port = port
        #: delay added per chunk, each way, in "latency" mode
        self.latency_ms = latency_ms
        #: connections accepted so far (in any mode)
        self.accepted = 0
        #: the path `url_for` puts on URLs (a Redis database number, e.g. "/15")
        self.default_path = "/15"
        self._mode = "pass"
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- public API ----------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("FaultProxy was never started")
        return self._port

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    def url_for(self, scheme: str = "redis", path: str | None = None) -> str:
        return f"{scheme}://{self.host}:{self.port}{self.default_path if path is None else path}"

    def start(self) -> None:
        """Start listening (idempotent)."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="FaultProxy-loop", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        mode = self._mode
        try:
            self._run(self._apply_mode("pass"))  # bind first, so the port is known
            if mode != "pass":
                self._run(self._apply_mode(mode))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._run(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = None
            self._thread = None

    def set_mode(self, mode: str) -> None:
        """Switch mode; when this returns the new mode is in effect."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        if self._loop is None:
            self._mode = mode
            return
        self._run(self._apply_mode(mode))

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- inside the proxy's loop ---------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _apply_mode(self, mode: str) -> None:
        self._mode = mode
        if mode in ("reset", "down"):
            for connection in list(self._connections):
                connection.abort()
            self._connections.clear()
        if mode == "down":
            await self._close_listener()
        elif self._server is None:
            self._server = await asyncio.start_server(
                self._on_client, self.host, self._port, reuse_address=True
            )
            self._port = int(self._server.sockets[0].getsockname()[1])

    async def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1)

    async def _shutdown(self) -> None:
        await self._close_listener()
        for connection in list(self._connections):
            connection.abort()
        self._connections.clear()
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.accepted += 1
        if self._mode in ("reset", "down"):
            _abort(writer)
            return
        connection = _Connection(writer)
        self._connections.add(connection)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                _abort(writer)
                return
            connection.upstream = up_writer
            if connection not in self._connections:  # aborted while connecting
                up_writer.transport.abort()
                return
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, writer)),
            ]
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            up_writer.close()
            writer.close()
        finally:
            self._connections.discard(connection)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                if self._mode == "blackhole":
                    continue
                if self._mode == "latency" and self.latency_ms > 0:
                    await asyncio.sleep(self.latency_ms / 1000)
                if self._mode in ("blackhole", "reset", "down"):
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return
