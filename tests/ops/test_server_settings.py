"""`python -m app`: which proxies uvicorn believes, the metrics directory it prepares, and
how it bounds request heads and slow or idle connections (on a real server process)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from app.__main__ import ServerSettings, prepare_multiprocess_metrics
from app.http.server import READ_TIMEOUT_ENV, read_timeout_seconds
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.ops.servers import app_server
from tests.support import STORY_BODY, Server

IDLE_CONNECTIONS = 500


def server(**values: Any) -> ServerSettings:
    return ServerSettings(_env_file=None, **values)


# --- proxies -------------------------------------------------------------------------


def test_with_no_proxy_configured_uvicorn_believes_no_forwarding_header() -> None:
    options = server().uvicorn_options()

    assert options["proxy_headers"] is False


def test_uvicorn_believes_the_same_proxies_as_the_app() -> None:
    options = server(trusted_proxies="10.0.0.0/8, 192.0.2.7").uvicorn_options()

    assert options["proxy_headers"] is True
    believed = options["forwarded_allow_ips"].split(",")
    assert {"10.0.0.0/8", "192.0.2.7"} <= set(believed)


def test_ipv4_proxies_are_also_believed_in_their_ipv4_mapped_ipv6_form() -> None:
    # On a dual-stack socket an IPv4 proxy connects as ::ffff:a.b.c.d; the app
    # normalises that to the IPv4 address, so uvicorn must believe it too.
    believed = server(trusted_proxies="10.0.0.0/8").uvicorn_options()["forwarded_allow_ips"]

    assert "::ffff:10.0.0.0/104" in believed.split(",")


def test_forwarded_allow_ips_overrides_the_app_list_for_uvicorn_verbatim() -> None:
    options = server(forwarded_allow_ips=" 10.1.1.1 ,10.1.1.2", trusted_proxies="10.0.0.0/8")

    assert options.uvicorn_options()["forwarded_allow_ips"] == "10.1.1.1,10.1.1.2"
    assert options.uvicorn_options()["proxy_headers"] is True


def test_blank_proxy_lists_trust_nobody() -> None:
    assert (
        server(forwarded_allow_ips="  ", trusted_proxies=" , ").uvicorn_options()["proxy_headers"]
        is False
    )


# --- multiprocess metrics directory ----------------------------------------------------


def test_the_metrics_directory_is_created_when_missing(tmp_path: Path) -> None:
    directory = tmp_path / "metrics" / "multiproc"

    found = prepare_multiprocess_metrics(server(), {"PROMETHEUS_MULTIPROC_DIR": str(directory)})

    assert found == directory
    assert directory.is_dir()


def test_the_metrics_directory_is_emptied_of_dead_workers_values_at_start(
    tmp_path: Path,
) -> None:
    stale = ["counter_4242.db", "gauge_livesum_4242.db", "histogram_17.db"]
    for name in stale:
        (tmp_path / name).write_bytes(b"\0" * 16)

    prepare_multiprocess_metrics(server(), {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})

    assert list(tmp_path.iterdir()) == []


def test_several_workers_without_a_metrics_directory_start_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.__main__"):
        prepare_multiprocess_metrics(server(web_concurrency=2), {})

    assert any("PROMETHEUS_MULTIPROC_DIR" in r.getMessage() for r in caplog.records)


def test_one_worker_without_a_metrics_directory_starts_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.__main__"):
        prepare_multiprocess_metrics(server(web_concurrency=1), {})

    assert caplog.records == []


def test_only_metric_files_are_removed_from_the_metrics_directory(tmp_path: Path) -> None:
    # A mistaken PROMETHEUS_MULTIPROC_DIR (/tmp, the app directory) loses nothing else.
    (tmp_path / "counter_1.db").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("not prometheus-client's")

    prepare_multiprocess_metrics(server(), {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})

    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- bounded request heads, slow and idle clients --------------------------------------


def test_uvicorn_serves_h11_with_the_head_bound_and_keep_alive_configured() -> None:
    options = server(max_request_head_bytes=8192, keep_alive_timeout_seconds=7).uvicorn_options()

    assert options["http"] == "app.http.server:DeadlineH11Protocol"
    assert options["h11_max_incomplete_event_size"] == 8192
    assert options["timeout_keep_alive"] == 7


def test_the_defaults_bound_every_connection() -> None:
    options = server().uvicorn_options()

    assert options["h11_max_incomplete_event_size"] == 16 * 1024
    assert options["timeout_keep_alive"] == 5
    assert server().request_read_timeout_seconds == 10.0


def test_the_read_deadline_reaches_the_worker_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(READ_TIMEOUT_ENV, "2.5")
    assert read_timeout_seconds() == 2.5
    monkeypatch.setenv(READ_TIMEOUT_ENV, "nonsense")
    assert read_timeout_seconds() == 10.0


READ_TIMEOUT = 1.0
KEEP_ALIVE = 2
HEAD_BYTES = 8192
GET_LIVE = b"GET /health/live HTTP/1.1\r\nHost: story\r\n\r\n"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI) -> Iterator[Server]:
    """`python -m app` with short deadlines, OpenAI on the fake (to make the app slow)."""
    env = {
        "DATABASE_SQLITE_PATH": str(tmp_path_factory.mktemp("live") / "stories.sqlite3"),
        "REQUEST_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
        "KEEP_ALIVE_TIMEOUT_SECONDS": str(KEEP_ALIVE),
        "MAX_REQUEST_HEAD_BYTES": str(HEAD_BYTES),
        "MAX_HEADER_BYTES": "4096",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "OPENAI_FLOOR_SECONDS": "0.1",
        "RESILIENCE_RETRY_MAX_RETRIES": "0",
    }
    with app_server(env) as started:
        yield started


def connect(server: Server) -> socket.socket:
    url = urlsplit(server.url)
    return socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=5)


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took (s)."""
    started = time.monotonic()
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"still open after {within} s; received {received[:200]!r}")
    return received, time.monotonic() - started


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and a Content-Length body) from a kept-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_connection_that_never_speaks_is_closed_after_the_read_timeout(live: Server) -> None:
    with connect(live) as sock:
        received, waited = read_until_closed(sock, within=READ_TIMEOUT + 3)

    assert received == b""
    assert READ_TIMEOUT - 0.2 < waited < READ_TIMEOUT + 2


def test_a_head_sent_too_slowly_gets_408_and_is_closed(live: Server) -> None:
    with connect(live) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: story\r\n")
        time.sleep(READ_TIMEOUT / 2)
        sock.sendall(b"X-Slow: 1\r\n")  # each byte in time, the whole head not
        received, _ = read_until_closed(sock, within=READ_TIMEOUT + 3)

    assert status_line(received) == b"HTTP/1.1 408 Request Timeout"


def test_a_body_sent_too_slowly_gets_408_and_is_closed(live: Server) -> None:
    head = b"POST /v1/stories HTTP/1.1\r\nHost: story\r\nContent-Type: application/json\r\n"
    with connect(live) as sock:
        sock.sendall(head + b'Content-Length: 200\r\n\r\n{"prompt": ')
        received, _ = read_until_closed(sock, within=READ_TIMEOUT + 3)

    assert status_line(received) == b"HTTP/1.1 408 Request Timeout"


def test_an_idle_keep_alive_connection_is_closed_but_a_prompt_one_is_served(
    live: Server,
) -> None:
    with connect(live) as sock:
        for _ in range(2):  # idle between requests longer than the read timeout, within keep-alive
            sock.sendall(GET_LIVE)
            assert status_line(read_response(sock)) == b"HTTP/1.1 200 OK"
            time.sleep(READ_TIMEOUT + 0.3)
        received, waited = read_until_closed(sock, within=KEEP_ALIVE + 3)

    assert received == b""
    assert waited < KEEP_ALIVE + 1


def test_a_slow_answer_is_not_cut_by_the_read_timeout(
    live: Server, fake_openai: FakeOpenAI
) -> None:
    fake_openai.set_fault(Fault.delay(READ_TIMEOUT + 0.5))
    response = httpx.post(f"{live.url}/v1/stories", json=STORY_BODY, timeout=10)

    assert response.status_code == 201
    assert response.json()["provider"] == "openai"


@pytest.mark.parametrize("pieces", [1, 64])
def test_a_head_above_the_server_bound_is_a_plain_431(live: Server, pieces: int) -> None:
    head = b"GET /health/live HTTP/1.1\r\nHost: story\r\nX-Big: " + b"a" * HEAD_BYTES + b"\r\n\r\n"
    size = -(-len(head) // pieces)
    with connect(live) as sock:
        for start in range(0, len(head), size):
            try:
                sock.sendall(head[start : start + size])
            except (BrokenPipeError, ConnectionResetError):
                break  # refused before the rest arrived
        received, _ = read_until_closed(sock, within=3)

    assert status_line(received) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"text/plain" in received


def test_a_head_within_the_server_bound_but_above_the_apps_is_a_431_problem(
    live: Server,
) -> None:
    response = httpx.get(f"{live.url}/health/live", headers={"X-Big": "a" * 5000})

    assert response.status_code == 431
    assert response.headers["content-type"] == "application/problem+json"


def _hold_idle_connections(env: dict[str, str], kind: str, cut_after: float) -> str:
    """`IDLE_CONNECTIONS` connections to a fresh `python -m app`, idle after one request
    ("idle keep-alive") or from the start ("silent"); asserts the server cuts them all
    within `cut_after` (+ slack) and a bounded memory cost each; returns the figures."""
    with app_server(env) as started:
        process = psutil.Process(started.process.pid)
        port = urlsplit(started.url).port

        def established() -> int:
            return sum(
                1
                for c in process.net_connections(kind="tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
            )

        for _ in range(50):  # warm up: first-request allocations are not per connection
            httpx.get(f"{started.url}/health/live")
        time.sleep(0.5)
        before = process.memory_info().rss
        opened = time.monotonic()
        sockets: list[socket.socket] = []
        try:
            sockets = [connect(started) for _ in range(IDLE_CONNECTIONS)]
            if kind == "idle keep-alive":  # one request each, all at once, then idle
                for sock in sockets:
                    sock.sendall(GET_LIVE)
                for sock in sockets:
                    assert status_line(read_response(sock)) == b"HTTP/1.1 200 OK"
            held = established()
            while held < IDLE_CONNECTIONS and time.monotonic() - opened < 3:
                time.sleep(0.1)  # connections still in the listen backlog, not yet accepted
                held = established()
            during = process.memory_info().rss
            for sock in sockets:
                read_until_closed(sock, within=max(0.1, opened + cut_after + 5 - time.monotonic()))
            cut = time.monotonic() - opened
        finally:
            for sock in sockets:
                sock.close()
        time.sleep(0.5)
        after = process.memory_info().rss
        left = established()
    per = (during - before) / IDLE_CONNECTIONS
    assert held >= IDLE_CONNECTIONS
    assert left == 0
    assert per < 64 * 1024
    return (
        f"{kind}: {held} held, RSS {before / 2**20:.1f} -> {during / 2**20:.1f} MiB "
        f"(+{per / 1024:.1f} KiB each), all cut by {cut:.1f} s, RSS after {after / 2**20:.1f} MiB"
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["idle keep-alive", "silent"])
def test_idle_connections_are_cut_and_their_memory_is_bounded(tmp_path: Path, kind: str) -> None:
    """With the default timeouts; prints the figures `docs/security.md` quotes (`-s`)."""
    defaults = ServerSettings(_env_file=None)
    cut_after = (
        defaults.keep_alive_timeout_seconds
        if kind == "idle keep-alive"
        else defaults.request_read_timeout_seconds
    )
    env = {"DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3")}
    print("\n" + _hold_idle_connections(env, kind, cut_after))
