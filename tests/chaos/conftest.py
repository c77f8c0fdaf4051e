"""Fixtures the chaos tests share: faults put between the service and its database."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.fakes.fault_proxy import FaultProxy


@pytest.fixture
def postgres_proxy(clean_postgres: str) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of the test database, and the URL that goes through it."""
    parts = urlsplit(clean_postgres)
    proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.start()
    netloc = (
        f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
    )
    try:
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
    finally:
        proxy.stop()
