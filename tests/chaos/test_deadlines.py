"""Hanging upstreams against the request deadline: two server processes, one Redis, one PostgreSQL.

Each server is a real `uvicorn app.main:app` child process (stopped by its PID)
on the same Redis (shared breakers, cache) and the same PostgreSQL database;
the upstreams are the fakes from `tests/fakes/`, told to hang (accept the
request, never answer). Requests alternate between the two processes, a few at
a time, each with its own `Idempotency-Key` and `X-Request-ID`.

What is asserted is behaviour only: which rung answered, that every request is
accounted for (the history check below), that a hanging upstream's breaker
opens. Time is measured, never asserted (the machine is shared): each request's
latency is taken on the client side and the worst overrun past the deadline is
printed (`pytest -s`, and in the failure output), next to the margin the
service states (`LadderBudget.grace_seconds` past the deadline).

History check: every request was either answered 201 and stored exactly once
(its story row exists once and its key is `done` with that story), or refused
with `application/problem+json` (a 4xx, or the documented 503) and stored not at
all; nothing else was stored; no other 5xx, no request left unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from app.services.ladder import LadderBudget
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate
from tests.fakes.server import Fault
from tests.support import STORY_BODY, Server, free_port, server_process

pytestmark = pytest.mark.slow

COMPLETIONS = "/v1/chat/completions"
REPLICATE_CREATE = "/v1/models/"
DEADLINE_SECONDS = 3.0
# The margin the service states: a rung is cut at most this long after its deadline.
GRACE_SECONDS = LadderBudget().grace_seconds
# A request still unanswered this long is recorded as lost (the test never hangs).
CLIENT_TIMEOUT_SECONDS = DEADLINE_SECONDS + 20.0
PRIMED_PROMPT = "a lighthouse keeper who collects lost socks"


def server_env(
    fake_openai: FakeOpenAI,
    fake_replicate: FakeReplicate,
    redis_url: str,
    database_url: str,
    **extra: str,
) -> dict[str, str]:
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "REPLICATE_API_TOKEN": "r8_test",
        "REPLICATE_BASE_URL": fake_replicate.base_url,
        "REPLICATE_POLL_INTERVAL_SECONDS": "0.05",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REQUEST_DEADLINE_SECONDS": f"{DEADLINE_SECONDS:g}",
        # The floors plus the reserve must fit in the deadline (the settings refuse
        # otherwise): 0.5 + 0.5 + 0.5 <= 3. With 3 s, OpenAI's rung gets 1.5 s and
        # Replicate's what is left of the rest, about 1 s.
        "OPENAI_FLOOR_SECONDS": "0.5",
        "REPLICATE_FLOOR_SECONDS": "0.5",
        "RESILIENCE_LADDER_RESERVE_SECONDS": "0.5",
        "RESILIENCE_RETRY_BASE_DELAY_SECONDS": "0.01",
        "RESILIENCE_RETRY_MAX_DELAY_SECONDS": "0.05",
        "RATE_LIMIT_CREATE_STORY": "10000/minute",
        "RATE_LIMIT_DEFAULT": "10000/minute",
        # As in test_shared_state: on a loaded box event-loop lag alone can outlast
        # the 50 ms production budget and send a call to in-process state.
        "REDIS_SOCKET_TIMEOUT_MS": "500",
        "RATE_LIMIT_REDIS_BUDGET_MS": "500",
        # INFO: the access log line of each request (its id, status, latency).
        "LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


@contextlib.contextmanager
def two_servers(env: Mapping[str, str]) -> Iterator[list[Server]]:
    """Two `uvicorn app.main:app` processes with the same environment (started one
    after the other, so the first has migrated the database before the second starts)."""
    with contextlib.ExitStack() as stack:
        servers = []
        for _ in range(2):
            port = free_port()
            args = ["-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
            servers.append(stack.enter_context(server_process(args, env, port=port)))
        yield servers


# --- requests and what became of them --------------------------------------------


@dataclass
class Outcome:
    n: int
    server: int  # index of the process that got it
    request_id: str
    key: str
    prompt: str
    seconds: float  # measured by the client
    status: int | None  # None: no answer (timeout, connection error)
    content_type: str = ""
    body: Any = None
    error: str = ""

    @property
    def provider(self) -> str | None:
        return self.body.get("provider") if self.status == 201 else None

    @property
    def story_id(self) -> str | None:
        return self.body.get("id") if self.status == 201 else None

    @property
    def refused(self) -> bool:
        """Refused as the API documents it: a problem+json 4xx, or a problem+json 503."""
        return (
            self.status is not None
            and (400 <= self.status < 500 or self.status == 503)
            and self.content_type.startswith("application/problem+json")
        )

    def describe(self) -> str:
        what = self.provider if self.status == 201 else (self.error or str(self.status))
        return f"#{self.n} {self.request_id} -> {self.status} {what} in {self.seconds:.3f} s"


async def post_story(
    client: httpx.AsyncClient, servers: Sequence[Server], n: int, tag: str, prompt: str
) -> Outcome:
    index = n % len(servers)
    request_id = f"deadline-{tag}-{n}"
    key = f"deadline-{tag}-{n}"
    started = time.perf_counter()
    try:
        response = await client.post(
            f"{servers[index].url}/v1/stories",
            json={**STORY_BODY, "prompt": prompt},
            headers={"Idempotency-Key": key, "X-Request-ID": request_id},
        )
    except httpx.HTTPError as error:
        elapsed = time.perf_counter() - started
        return Outcome(n, index, request_id, key, prompt, elapsed, None, error=repr(error))
    elapsed = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return Outcome(
        n,
        index,
        request_id,
        key,
        prompt,
        elapsed,
        response.status_code,
        response.headers.get("content-type", ""),
        body,
    )


async def run_waves(
    servers: Sequence[Server],
    tag: str,
    *,
    waves: int,
    concurrency: int,
    pause: float,
    prompt_of: Any,
    first: int = 0,
) -> list[Outcome]:
    """`waves` rounds of `concurrency` concurrent requests, `pause` seconds apart."""
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_SECONDS) as client:
        for wave in range(waves):
            numbers = range(first + wave * concurrency, first + (wave + 1) * concurrency)
            outcomes += await asyncio.gather(
                *(post_story(client, servers, n, tag, prompt_of(n)) for n in numbers)
            )
            await asyncio.sleep(pause)
    return outcomes


# --- the history check ------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    stories: list[str]  # story ids, one per row
    keys: dict[str, tuple[str, str | None]]  # key -> (state, story id)


async def read_stored(database_url: str) -> Stored:
    conn = await asyncpg.connect(database_url)
    try:
        stories = await conn.fetch("SELECT id FROM stories")
        keys = await conn.fetch("SELECT key, state, story_id FROM idempotency_keys")
    finally:
        await conn.close()
    return Stored(
        [str(row["id"]) for row in stories],
        {
            row["key"]: (row["state"], str(row["story_id"]) if row["story_id"] else None)
            for row in keys
        },
    )


def history_problems(outcomes: Sequence[Outcome], stored: Stored) -> list[str]:
    """Every way the run failed to account for a request (empty when all is well)."""
    problems: list[str] = []
    stories = Counter(stored.stories)
    answered = 0
    for outcome in outcomes:
        if outcome.status == 201:
            answered += 1
            story_id = outcome.story_id
            times = stories[story_id or ""]
            if times != 1:
                problems.append(f"{outcome.describe()}: story stored {times} times")
            if stored.keys.get(outcome.key) != ("done", story_id):
                problems.append(
                    f"{outcome.describe()}: key is {stored.keys.get(outcome.key)}, "
                    f"not done with {story_id}"
                )
        elif outcome.refused:
            state = stored.keys.get(outcome.key)
            if state is not None and state[1] is not None:
                problems.append(f"{outcome.describe()}: refused, yet stored as {state[1]}")
        else:
            problems.append(f"{outcome.describe()}: lost ({outcome.content_type} {outcome.body!r})")
    if len(stored.stories) != answered:
        problems.append(f"{len(stored.stories)} stories stored for {answered} answered requests")
    return problems


# --- time: measured and printed, never asserted -------------------------------------


def access_lines(servers: Sequence[Server]) -> dict[str, list[dict[str, Any]]]:
    """The servers' JSON log lines, by request id."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for server in servers:
        for text in server.output().splitlines():
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict) and "request_id" in entry:
                lines.setdefault(str(entry["request_id"]), []).append(entry)
    return lines


def timing_report(title: str, outcomes: Sequence[Outcome], servers: Sequence[Server]) -> str:
    """Latency against the deadline, worst overrun, and the evidence for any request
    that overran by more than the stated margin."""
    seconds = sorted(o.seconds for o in outcomes)
    over = [o for o in outcomes if o.seconds > DEADLINE_SECONDS]
    beyond = [o for o in outcomes if o.seconds > DEADLINE_SECONDS + GRACE_SECONDS]
    worst = max(outcomes, key=lambda o: o.seconds)
    logs = access_lines(servers)

    def server_ms(outcome: Outcome) -> str:
        for entry in logs.get(outcome.request_id, []):
            if entry.get("message") == "request":
                return f"{entry.get('latency_ms')} ms"
        return "no access line"

    mix = Counter(o.provider or str(o.status) for o in outcomes)
    lines = [
        f"--- {title}: {len(outcomes)} requests, deadline {DEADLINE_SECONDS:g} s, "
        f"stated margin {DEADLINE_SECONDS + GRACE_SECONDS:g} s",
        f"    answered by: {dict(mix.most_common())}",
        f"    client latency: p50 {statistics.median(seconds):.3f} s, max {seconds[-1]:.3f} s",
        f"    overran the deadline: {len(over)}; past the stated margin: {len(beyond)}",
        f"    worst overrun: {worst.seconds - DEADLINE_SECONDS:+.3f} s "
        f"({worst.describe()}; server access log {server_ms(worst)})",
    ]
    for outcome in beyond:
        lines.append(f"    PAST THE MARGIN: {outcome.describe()}, server {server_ms(outcome)}")
        for entry in logs.get(outcome.request_id, [])[:12]:
            lines.append(f"      {json.dumps(entry)[:400]}")
    report = "\n".join(lines)
    print("\n" + report)
    return report


# --- the tests ----------------------------------------------------------------------


async def test_both_upstreams_hanging_every_request_is_answered_by_the_cache_or_offline(
    fake_openai: FakeOpenAI,
    fake_replicate: FakeReplicate,
    redis_url: str,
    redis_client: Any,
    clean_postgres: str,
) -> None:
    """Both upstreams hang. Each request's upstream rungs are cut at their own
    deadlines (the cuts open both breakers; they half-open after 1 s, so a probe
    hangs again now and then), and the request is answered by the cache (the
    prompt an upstream wrote before) or the offline storyteller (any other)."""
    env = server_env(
        fake_openai,
        fake_replicate,
        redis_url,
        clean_postgres,
        RESILIENCE_BREAKER_RECOVERY_SECONDS="1",
        RESILIENCE_BREAKER_MAX_RECOVERY_SECONDS="2",
    )
    waves, concurrency = 9, 4
    total = waves * concurrency
    with two_servers(env) as servers:
        # Healthy first: each process writes the primed prompt's story to the
        # cache (Redis, and its own in-process tier).
        primed = await run_waves(
            servers, "prime", waves=1, concurrency=2, pause=0, prompt_of=lambda n: PRIMED_PROMPT
        )
        fake_openai.set_fault(Fault.hang(), path=COMPLETIONS)
        fake_replicate.set_fault(Fault.hang())
        outcomes = await run_waves(
            servers,
            "hang",
            waves=waves,
            concurrency=concurrency,
            pause=0.3,
            prompt_of=lambda n: PRIMED_PROMPT if n % 2 == 0 else f"story number {n}",
        )
        openai_calls = fake_openai.count(path=COMPLETIONS) - len(primed)
        replicate_creates = fake_replicate.count(path=REPLICATE_CREATE)
        report = timing_report("both upstreams hanging", outcomes, servers)
    print(f"    upstream calls: openai {openai_calls}, replicate creates {replicate_creates}")
    problems = history_problems([*primed, *outcomes], await read_stored(clean_postgres))

    assert problems == [], f"{problems}\n{report}"
    assert [o.provider for o in primed] == ["openai", "openai"], report
    expected = ["cache" if o.prompt == PRIMED_PROMPT else "offline" for o in outcomes]
    assert [o.provider for o in outcomes] == expected, report
    assert all(o.body["degraded"] for o in outcomes), report
    # The hangs were met (and cut), and the breakers kept most requests off them.
    assert 0 < openai_calls < total, report
    assert 0 < replicate_creates < total, report


async def test_openai_hanging_replicate_answers_and_openais_breaker_opens(
    fake_openai: FakeOpenAI,
    fake_replicate: FakeReplicate,
    redis_url: str,
    redis_client: Any,
    clean_postgres: str,
) -> None:
    """OpenAI hangs, Replicate is healthy. The first requests are cut at OpenAI's
    rung deadline and answered by Replicate in the time left; those cuts open
    OpenAI's breaker (shared through Redis), so later requests go straight to
    Replicate and the fake OpenAI sees fewer completions than there were requests."""
    env = server_env(fake_openai, fake_replicate, redis_url, clean_postgres)
    waves, concurrency = 10, 3
    total = waves * concurrency
    fake_openai.set_fault(Fault.hang(), path=COMPLETIONS)
    with two_servers(env) as servers:
        first_half = await run_waves(
            servers,
            "openai-hang",
            waves=waves // 2,
            concurrency=concurrency,
            pause=0.1,
            prompt_of=lambda n: f"story number {n}",
        )
        calls_at_half = fake_openai.count(path=COMPLETIONS)
        second_half = await run_waves(
            servers,
            "openai-hang",
            waves=waves - waves // 2,
            concurrency=concurrency,
            pause=0.1,
            prompt_of=lambda n: f"story number {n}",
            first=len(first_half),
        )
        openai_calls = fake_openai.count(path=COMPLETIONS)
        outcomes = [*first_half, *second_half]
        report = timing_report("OpenAI hanging, Replicate healthy", outcomes, servers)
    print(f"    upstream calls: openai {openai_calls} ({calls_at_half} in the first half)")
    problems = history_problems(outcomes, await read_stored(clean_postgres))
    providers = Counter(o.provider for o in outcomes)

    assert problems == [], f"{problems}\n{report}"
    assert set(providers) <= {"replicate", "cache", "offline"}, report
    assert providers["replicate"] > total // 2, report
    assert all(o.body["degraded"] for o in outcomes), report
    # OpenAI's breaker opened: fewer completions than requests, none in the second half.
    assert 0 < openai_calls < total, report
    assert openai_calls == calls_at_half, report
