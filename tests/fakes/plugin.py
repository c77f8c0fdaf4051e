"""pytest fixtures for the fake upstreams (loaded by tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate

_FAKES = ("fake_openai", "fake_replicate")


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    """A running fake OpenAI API for the whole session (reset before each test using it)."""
    server = FakeOpenAI()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fake_replicate() -> Iterator[FakeReplicate]:
    """A running fake Replicate API for the whole session (reset before each test using it)."""
    server = FakeReplicate()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _reset_fakes(request: pytest.FixtureRequest) -> None:
    """Reset the fakes a test uses (directly or through other fixtures), and only those."""
    for name in _FAKES:
        if name in request.fixturenames:
            fake = request.getfixturevalue(name)
            assert isinstance(fake, FakeOpenAI | FakeReplicate)
            fake.reset()


@pytest.fixture
def fault_proxy_redis(redis_url: str) -> Iterator[FaultProxy]:
    """A started FaultProxy (mode "pass") in front of the test Redis."""
    target = urlsplit(redis_url)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
    # The same database as the test's own clients (REDIS_TEST_URL), which it flushes.
    proxy.default_path = target.path or "/0"
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
