"""Sentry: events reach the configured DSN, with no prompt, body, key or token in them.

The DSN points at a fake Sentry on 127.0.0.1 that keeps every envelope it receives.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from pydantic import SecretStr

from app.main import create_app
from app.platform.config import SentrySettings
from app.platform.sentry import FILTERED, scrub_event
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.ops.apps import ops_settings, running
from tests.support import STORY_BODY

PROMPT = "a shy unicorn named Zorbleflax who lives under the stairs"
OPENAI_KEY = "sk-live-4f9a8b7c6d5e"
REPLICATE_TOKEN = "r8_Q1w2E3r4T5y6U7i8"


class FakeSentry:
    """Accepts envelopes at /api/<project>/envelope/ and keeps their decoded bodies."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                received.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.server.server_address[1]}/1"

    def items(self, kind: str) -> list[dict[str, Any]]:
        """The payloads of every envelope item of type `kind` ("event", "transaction")."""
        found = []
        for body in self.bodies:
            lines = body.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == kind:
                    found.append(json.loads(payload))
        return found

    def raw(self) -> str:
        return b"\n".join(self.bodies).decode(errors="replace")


@pytest.fixture
def fake_sentry() -> Iterator[FakeSentry]:
    sentry = FakeSentry()
    sentry.thread.start()
    try:
        yield sentry
    finally:
        sentry.server.shutdown()
        sentry.server.server_close()
        sentry.thread.join(timeout=5)


async def explode(request: Request) -> None:
    payload = await request.json()
    prompt = payload["prompt"]  # a local holding the prompt, as real code would have
    raise RuntimeError(f"the upstream exploded ({len(prompt)} characters)")


async def test_an_unhandled_error_reaches_sentry_without_prompts_or_keys(
    tmp_path: Path, fake_sentry: FakeSentry
) -> None:
    sentry = SentrySettings(
        _env_file=None,
        dsn=SecretStr(fake_sentry.dsn),
        environment="staging",
        release="story-service@9.9.9",
        traces_sample_rate=1.0,
    )
    settings = ops_settings(tmp_path, sentry=sentry)
    app = create_app(settings)
    app.add_api_route("/v1/explode", explode, methods=["POST"])
    async with running(settings, app=app) as (_, client):
        response = await client.post(
            f"/v1/explode?prompt={PROMPT}",
            json={"prompt": PROMPT, "age": 6},
            headers={"Authorization": f"Bearer {OPENAI_KEY}", "X-Api-Key": REPLICATE_TOKEN},
        )
    # Leaving the app flushed the Sentry client.

    events = fake_sentry.items("event")
    assert response.status_code == 500
    assert events, f"no event reached the fake Sentry; got {fake_sentry.bodies!r}"
    event = events[0]
    assert event["environment"] == "staging"
    assert event["release"] == "story-service@9.9.9"
    assert "RuntimeError" in json.dumps(event["exception"])
    raw = fake_sentry.raw()
    for secret in (PROMPT, "Zorbleflax", OPENAI_KEY, REPLICATE_TOKEN):
        assert secret not in raw, f"{secret!r} was sent to Sentry"


async def test_an_upstream_failure_the_ladder_handled_sends_nothing_to_sentry(
    tmp_path: Path, fake_sentry: FakeSentry, fake_openai: FakeOpenAI
) -> None:
    fake_openai.set_fault(Fault.status(503))
    sentry = SentrySettings(_env_file=None, dsn=SecretStr(fake_sentry.dsn), traces_sample_rate=0.0)
    settings = ops_settings(tmp_path, sentry=sentry, openai_base_url=fake_openai.openai_base_url)
    async with running(settings) as (_, client):
        response = await client.post("/v1/stories", json=STORY_BODY)
    # Leaving the app flushed the Sentry client.

    assert response.status_code == 201
    assert response.json()["provider"] == "offline"  # OpenAI failed: the ladder served
    assert fake_openai.count(path="/v1/chat/completions") == 3
    assert fake_sentry.items("event") == []


def test_scrubbing_removes_bodies_credentials_and_prompts_at_any_depth() -> None:
    event: dict[str, Any] = {
        "message": f"calling upstream with {OPENAI_KEY}",
        "request": {
            "data": {"prompt": PROMPT},
            "cookies": {"session": "abc"},
            "query_string": f"prompt={PROMPT}",
            "headers": {"Authorization": f"Bearer {OPENAI_KEY}", "Accept": "application/json"},
        },
        "extra": {"payload": {"messages": [{"content": PROMPT}]}, "prompt": PROMPT},
        "breadcrumbs": {"values": [{"message": f"token={REPLICATE_TOKEN}"}]},
        "contexts": {"db": {"url": "postgresql://story:hunter2@db:5432/stories"}},
    }

    scrubbed = scrub_event(event)

    text = json.dumps(scrubbed)
    for secret in (PROMPT, OPENAI_KEY, REPLICATE_TOKEN, "hunter2"):
        assert secret not in text
    assert scrubbed["request"]["data"] == FILTERED
    assert scrubbed["request"]["headers"]["Authorization"] == FILTERED
    assert scrubbed["request"]["headers"]["Accept"] == "application/json"


@pytest.mark.parametrize(
    "text",
    [
        "redis://:hunter2@redis:6379/0",
        "rediss://:hunter2@cache.internal:6380",
        "redis://default:hunter2@redis:6379/0",
        "postgresql://story:hunter2@db:5432/stories",
        "Error 111 connecting to redis://:hunter2@127.0.0.1:6379. Connection refused.",
    ],
)
def test_passwords_in_urls_are_filtered_with_or_without_a_user(text: str) -> None:
    scrubbed = scrub_event({"message": text, "extra": {"detail": text}})

    assert "hunter2" not in json.dumps(scrubbed)


def test_pydantic_input_values_are_filtered_from_exception_messages() -> None:
    from pydantic import BaseModel, Field, ValidationError

    class Story(BaseModel):
        prompt: str = Field(max_length=10)
        age: int

    try:
        Story.model_validate({"prompt": PROMPT, "age": {"note": PROMPT}})
    except ValidationError as error:
        message = str(error)
    # What pydantic writes: the start and the end of the prompt, twice.
    assert message.count("a shy unicorn") == message.count("under the stairs") == 2
    event = {
        "exception": {"values": [{"type": "ValidationError", "value": message}]},
        "logentry": {"message": message},
    }

    text = json.dumps(scrub_event(event))

    assert "a shy unicorn" not in text
    assert "under the stairs" not in text
    assert "input_value=[Filtered]" in text
    assert "input_type=str" in text  # the rest of the message stays useful
    assert "string_too_long" in text


@pytest.mark.parametrize(
    "fragment",
    [
        "input_value='a shy Zorbleflax, input_type=str', input_type=str]",
        'input_value="it\'s Zorbleflax", input_type=str]',
        "input_value={'prompt': 'Zorbleflax'}, input_type=dict]",
        "input_value='Zorbleflax",  # cut off mid-value
    ],
)
def test_input_values_are_filtered_whatever_their_shape(fragment: str) -> None:
    text = json.dumps(scrub_event({"message": f"1 validation error [type=x, {fragment}"}))

    assert "Zorbleflax" not in text


def test_without_a_dsn_sentry_stays_off(tmp_path: Path) -> None:
    from app.platform.sentry import init_sentry

    assert init_sentry(ops_settings(tmp_path), "0.1.0") is False
