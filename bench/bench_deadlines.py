"""Does the request deadline hold when upstreams hang? Measured against real server processes.

`python -m app` with two uvicorn workers (`WEB_CONCURRENCY=2`), as the container
runs it, on a real Redis and a scratch PostgreSQL database, in front of the fake
OpenAI and Replicate servers from `tests/fakes/` given the latencies real ones
have (OpenAI about 2 s; Replicate 1-3 s: the create delayed 0-2 s, then the
polls, 0.5 s apart, that a prediction needs). For each request deadline
(`REQUEST_DEADLINE_SECONDS`: 5 s, and 30 s in the full run), four scenarios,
each on freshly started servers:

1. healthy;
2. OpenAI hanging (accepts the request, never answers);
3. OpenAI and Replicate both hanging;
4. OpenAI hanging while Redis is black-holed by a `FaultProxy` (connections
   accepted, nothing ever answered) after the workers have connected.

Everything else is the app's defaults (retry policy, breakers: 3 failures open
one for 120 s, the Redis budget of 50 ms, the ladder reserve of 0.5 s and rung
share of 60 %), but the rate limits (out of the way) and the floors: the
defaults (OpenAI 2 s, Replicate 4 s) where they fit the deadline; at 5 s they
do not (2 + 4 + 0.5 > 5), so `--short-floors` (default 2 s each) is used. The
rung budgets that follow are printed above each deadline's tables.

Closed-loop clients (`--concurrency`) send `--requests` story requests per
scenario, each with its own `Idempotency-Key` and `X-Request-ID`. Printed per
scenario: requests sent, who answered them (rung, or refused / lost), stories
stored (checked against the answers in PostgreSQL), p50 / p99 / max latency
measured by the client, how many requests overran the deadline and the worst
overrun, next to the margin the service states (deadline +
`LadderBudget.grace_seconds`, 0.25 s); the server's own latency (its access
log) for the slowest request; and, for any request past the margin, its log
lines. Nothing is asserted: the machine is shared and noisy.

    python -m bench.bench_deadlines --quick    # deadline 5 s, under a minute
    python -m bench.bench_deadlines            # deadlines 5 s and 30 s, under 5 minutes

Redis database 13 (`--redis-url`) is flushed before each deadline's run and at
the end; between scenarios every key but the story cache's is deleted (so the
both-hanging scenario can answer from the cache what the healthy one wrote).
PostgreSQL: a scratch database is created through `--database-url` (default
`POSTGRES_TEST_URL`, else the `test` database) and dropped at the end. Every
server process is stopped by its process id. Each scenario stops sending after
its time box; each request gives up `CLIENT_GRACE_SECONDS` after the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import platform
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import redis.asyncio as aioredis

from app.services.ladder import LadderBudget
from bench.scratch import create_database, drop_database
from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate
from tests.fakes.server import Fault
from tests.ops.servers import app_server
from tests.support import STORY_BODY, Server

COMPLETIONS = "/v1/chat/completions"
REPLICATE_CREATE = "/v1/models/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
CACHE_PREFIX = "story:cache:"
GRACE_SECONDS = LadderBudget().grace_seconds
# A request unanswered this long after the deadline is recorded as lost.
CLIENT_GRACE_SECONDS = 15.0
# The app's defaults (app.platform.config), printed beside the figures.
RESERVE_SECONDS = 0.5
RUNG_SHARE = 0.6
DEFAULT_FLOORS = (2.0, 4.0)  # OPENAI_FLOOR_SECONDS, REPLICATE_FLOOR_SECONDS
# Replicate: the poll interval (the default) and the polls a prediction needs.
POLL_INTERVAL_SECONDS = 0.5
POLLS = 2
SCENARIOS = ("healthy", "openai hangs", "both hang", "openai hangs, redis black-holed")
# Half the prompts are shared by every scenario (the cache may know them), half new.
SHARED_PROMPTS = (
    "a dragon who is afraid of the dark",
    "a lighthouse keeper who collects lost socks",
    "a snail who wants to win a race",
    "a cloud that cannot stop raining",
)


# --- parameters -------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    quick: bool
    deadlines: tuple[float, ...]
    requests: int
    concurrency: int
    openai_delay: float
    replicate_latency: tuple[float, float]
    short_floors: tuple[float, float]
    redis_url: str
    database_url: str
    seed: int
    scenarios: tuple[str, ...]
    keep_logs: Path | None

    def floors(self, deadline: float) -> tuple[float, float]:
        """The defaults where they fit in the deadline; else `--short-floors`."""
        if sum(DEFAULT_FLOORS) + RESERVE_SECONDS <= deadline:
            return DEFAULT_FLOORS
        return self.short_floors

    def time_box(self, deadline: float) -> float:
        """Seconds a scenario may keep sending (a first wave cut at the deadline,
        then the rest at upstream speed)."""
        return (15.0 if self.quick else 40.0) + 1.5 * deadline

    def describe(self) -> str:
        lo, hi = self.replicate_latency
        return (
            f"mode={'quick' if self.quick else 'full'} "
            f"deadlines={','.join(f'{d:g}' for d in self.deadlines)} s "
            f"requests={self.requests}/scenario concurrency={self.concurrency} "
            f"openai_delay={self.openai_delay:g} s replicate_latency={lo:g}-{hi:g} s "
            f"short_floors={self.short_floors[0]:g},{self.short_floors[1]:g} s "
            f"seed={self.seed} redis={self.redis_url} "
            f"scenarios={','.join(str(SCENARIOS.index(s) + 1) for s in self.scenarios)}"
        )


def parse_params(argv: Sequence[str] | None = None) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_deadlines",
        description="Print how well the request deadline holds when upstreams hang.",
    )
    parser.add_argument("--quick", action="store_true", help="deadline 5 s only, under a minute")
    parser.add_argument(
        "--deadline",
        type=float,
        action="append",
        help="REQUEST_DEADLINE_SECONDS to measure (repeatable; default 5, and 30 in full)",
    )
    parser.add_argument("--requests", type=int, help="story requests per scenario")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--openai-delay", type=float, default=2.0, help="fake OpenAI, seconds")
    parser.add_argument(
        "--replicate-latency",
        type=float,
        nargs=2,
        default=(1.0, 3.0),
        metavar=("LOW", "HIGH"),
        help="fake Replicate, seconds from create to a finished prediction (uniform)",
    )
    parser.add_argument(
        "--short-floors",
        type=float,
        nargs=2,
        default=(1.5, 1.5),
        metavar=("OPENAI", "REPLICATE"),
        help="OPENAI_/REPLICATE_FLOOR_SECONDS for deadlines the defaults (2, 4) do not fit "
        "(default 1.5 1.5: with the reserve and three content checks, 5 s; the app "
        "refuses to start with floors its deadline cannot hold)",
    )
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help="a Redis database this may flush"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL to create (and drop) the scratch database through",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the Replicate latencies")
    parser.add_argument(
        "--scenario",
        type=int,
        choices=range(1, len(SCENARIOS) + 1),
        action="append",
        help="run only this scenario (1-4, repeatable; default: all)",
    )
    parser.add_argument(
        "--keep-logs", type=Path, help="write each scenario's server log into this directory"
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    lo, hi = args.replicate_latency
    if not POLLS * POLL_INTERVAL_SECONDS <= lo <= hi:
        parser.error(f"--replicate-latency needs {POLLS * POLL_INTERVAL_SECONDS:g} <= LOW <= HIGH")
    deadlines = tuple(args.deadline or ((5.0,) if quick else (5.0, 30.0)))
    return Params(
        quick=quick,
        deadlines=deadlines,
        requests=max(1, args.requests or (24 if quick else 64)),
        concurrency=max(1, args.concurrency),
        openai_delay=args.openai_delay,
        replicate_latency=(lo, hi),
        short_floors=(args.short_floors[0], args.short_floors[1]),
        redis_url=args.redis_url,
        database_url=args.database_url,
        seed=args.seed,
        scenarios=tuple(SCENARIOS[i - 1] for i in sorted(set(args.scenario or [1, 2, 3, 4]))),
        keep_logs=args.keep_logs,
    )


# --- what one request did ----------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    n: int
    request_id: str
    key: str
    seconds: float
    status: int | None  # None: no answer within the client's timeout
    content_type: str = ""
    provider: str | None = None
    story_id: str | None = None
    error: str = ""

    @property
    def outcome(self) -> str:
        if self.status == 201:
            return self.provider or "?"
        problem = self.content_type.startswith("application/problem+json")
        if problem and self.status is not None and (400 <= self.status < 500 or self.status == 503):
            return "refused"
        return "lost"


@dataclass
class Result:
    scenario: str
    deadline: float
    samples: list[Sample]
    wall_seconds: float
    start_seconds: float
    openai_calls: int
    replicate_creates: int
    stored: int
    history_problems: list[str]
    server_latency: dict[str, float]  # request id -> seconds, from the access log
    log_lines: dict[str, list[str]]  # request id -> its log lines
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)
    time_box_hit: bool = False


def quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[round(q * 100) - 1]


# --- the parts ---------------------------------------------------------------------


def prompt_of(scenario: str, n: int) -> str:
    if n % 2 == 0:
        return SHARED_PROMPTS[(n // 2) % len(SHARED_PROMPTS)]
    return f"{scenario}: story number {n}"


async def send(client: httpx.AsyncClient, url: str, scenario: str, tag: str, n: int) -> Sample:
    request_id = f"{tag}-{n}"
    started = time.perf_counter()
    try:
        response = await client.post(
            f"{url}/v1/stories",
            json={**STORY_BODY, "prompt": prompt_of(scenario, n)},
            headers={"Idempotency-Key": request_id, "X-Request-ID": request_id},
        )
    except httpx.HTTPError as error:
        elapsed = time.perf_counter() - started
        return Sample(n, request_id, request_id, elapsed, None, error=type(error).__name__)
    elapsed = time.perf_counter() - started
    content_type = response.headers.get("content-type", "")
    if response.status_code == 201:
        body = response.json()
        return Sample(
            n,
            request_id,
            request_id,
            elapsed,
            201,
            content_type,
            str(body.get("provider")),
            str(body.get("id")),
        )
    return Sample(n, request_id, request_id, elapsed, response.status_code, content_type)


async def closed_loop(
    url: str, scenario: str, tag: str, params: Params, deadline: float
) -> tuple[list[Sample], bool]:
    """`params.requests` requests from `params.concurrency` clients; stops sending
    once the scenario's time box is used up. Returns the samples and whether it was."""
    numbers = iter(range(params.requests))
    samples: list[Sample] = []
    ends = time.monotonic() + params.time_box(deadline)
    cut = False
    limits = httpx.Limits(max_connections=params.concurrency)
    async with httpx.AsyncClient(timeout=deadline + CLIENT_GRACE_SECONDS, limits=limits) as client:

        async def worker() -> None:
            nonlocal cut
            for n in numbers:
                if time.monotonic() >= ends:
                    cut = True
                    return
                samples.append(await send(client, url, scenario, tag, n))

        await asyncio.gather(*(worker() for _ in range(params.concurrency)))
    return sorted(samples, key=lambda s: s.n), cut


async def both_workers_started(server: Server, within: float = 60.0) -> None:
    """Until both workers have logged their startup (the server answers as soon as one has)."""
    ends = time.monotonic() + within
    while server.output().count("Application startup complete") < 2:
        if time.monotonic() > ends:
            raise RuntimeError(f"2 workers not started within {within:g} s:\n{server.output()}")
        await asyncio.sleep(0.1)


async def warm_up(url: str, n: int) -> None:
    """GETs on fresh connections, so both workers have opened their Redis and database
    connections before a fault is switched on."""

    async def one() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await client.get(f"{url}/v1/stories", params={"limit": 1})

    await asyncio.gather(*(one() for _ in range(n)))


def server_env(
    params: Params,
    deadline: float,
    owner: str,
    fakes: tuple[FakeOpenAI, FakeReplicate],
    redis_url: str,
    database_url: str,
    metrics_dir: str,
) -> dict[str, str]:
    openai_floor, replicate_floor = params.floors(deadline)
    fake_openai, fake_replicate = fakes
    return {
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        "LOG_LEVEL": "INFO",
        "SHUTDOWN_GRACE_SECONDS": "5",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "REPLICATE_API_TOKEN": "r8_bench",
        "REPLICATE_BASE_URL": fake_replicate.base_url,
        "REPLICATE_POLL_INTERVAL_SECONDS": f"{POLL_INTERVAL_SECONDS:g}",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REQUEST_DEADLINE_SECONDS": f"{deadline:g}",
        "OPENAI_FLOOR_SECONDS": f"{openai_floor:g}",
        "REPLICATE_FLOOR_SECONDS": f"{replicate_floor:g}",
        "RATE_LIMIT_CREATE_STORY": "1000000/minute",
        "RATE_LIMIT_DEFAULT": "1000000/minute",
        "RATE_LIMIT_PER_CLIENT": "1000000/minute",
        # Each scenario's stories under an owner of their own, to count them.
        "ANONYMOUS_PRINCIPAL": owner,
    }


def set_upstream_faults(
    scenario: str, params: Params, fakes: tuple[FakeOpenAI, FakeReplicate], rng: random.Random
) -> None:
    fake_openai, fake_replicate = fakes
    fake_openai.reset()
    fake_replicate.reset()
    if scenario == "both hang":
        fake_replicate.set_fault(Fault.hang())
    else:
        # Each create waits its own time; the polls add the rest. Queued one-shot
        # faults come first; the persistent one is there should they run out.
        lo, hi = (t - POLLS * POLL_INTERVAL_SECONDS for t in params.replicate_latency)
        for _ in range(params.requests + params.concurrency):
            fake_replicate.fail_next(Fault.delay(rng.uniform(lo, hi)), path=REPLICATE_CREATE)
        fake_replicate.set_fault(Fault.delay((lo + hi) / 2), path=REPLICATE_CREATE)
    if scenario == "healthy":
        fake_openai.set_fault(Fault.delay(params.openai_delay), path=COMPLETIONS)
    else:
        fake_openai.set_fault(Fault.hang(), path=COMPLETIONS)


def read_logs(
    server: Server,
) -> tuple[dict[str, float], dict[str, list[str]], collections.Counter[str]]:
    """From the server's JSON log: each request's own latency, its lines, the warnings."""
    latency: dict[str, float] = {}
    lines: dict[str, list[str]] = collections.defaultdict(list)
    warnings: collections.Counter[str] = collections.Counter()
    for text in server.output().splitlines():
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        request_id = entry.get("request_id")
        if request_id:
            lines[str(request_id)].append(text)
            if entry.get("message") == "request" and "latency_ms" in entry:
                latency[str(request_id)] = float(entry["latency_ms"]) / 1000
        if entry.get("level") in ("warning", "error", "critical"):
            message = str(entry.get("message", ""))
            warnings[message if len(message) <= 60 else message[:57] + "..."] += 1
    return latency, dict(lines), warnings


async def stored_rows(
    database_url: str, owner: str
) -> tuple[list[str], dict[str, tuple[str, str | None]]]:
    conn = await asyncpg.connect(database_url)
    try:
        stories = await conn.fetch("SELECT id FROM stories WHERE owner = $1", owner)
        keys = await conn.fetch(
            "SELECT key, state, story_id FROM idempotency_keys WHERE owner = $1", owner
        )
    finally:
        await conn.close()
    return [str(row["id"]) for row in stories], {
        row["key"]: (row["state"], str(row["story_id"]) if row["story_id"] else None)
        for row in keys
    }


def history_problems(
    samples: Sequence[Sample], stories: Sequence[str], keys: dict[str, tuple[str, str | None]]
) -> list[str]:
    """Each request answered 201 and stored exactly once, or refused and not stored."""
    problems: list[str] = []
    counts = collections.Counter(stories)
    answered = 0
    for sample in samples:
        if sample.status == 201:
            answered += 1
            times = counts[sample.story_id or ""]
            if times != 1:
                problems.append(f"{sample.request_id}: stored {times} times")
            if keys.get(sample.key) != ("done", sample.story_id):
                problems.append(f"{sample.request_id}: key {keys.get(sample.key)}")
        elif sample.outcome == "refused":
            state = keys.get(sample.key)
            if state is not None and state[1] is not None:
                problems.append(f"{sample.request_id}: refused ({sample.status}) yet stored")
        else:
            problems.append(f"{sample.request_id}: lost ({sample.status} {sample.error})")
    if len(stories) != answered:
        problems.append(f"{len(stories)} stories stored for {answered} answers")
    return problems


async def clear_all_but_cache(admin: aioredis.Redis) -> None:
    doomed = [
        key async for key in admin.scan_iter(count=500) if not key.startswith(b"story:cache:")
    ]
    if doomed:
        await admin.delete(*doomed)


async def run_scenario(
    scenario: str,
    deadline: float,
    params: Params,
    fakes: tuple[FakeOpenAI, FakeReplicate],
    admin: aioredis.Redis,
    database_url: str,
    rng: random.Random,
) -> Result:
    fake_openai, fake_replicate = fakes
    await clear_all_but_cache(admin)
    tag = f"dl{deadline:g}-s{SCENARIOS.index(scenario) + 1}-{secrets.token_hex(2)}"
    owner = f"bench-deadlines-{tag}"
    blackhole = "black-holed" in scenario
    target = urlsplit(params.redis_url)
    with contextlib.ExitStack() as stack:
        redis_url = params.redis_url
        proxy = None
        if blackhole:
            proxy = stack.enter_context(
                FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
            )
            redis_url = proxy.url_for(path=target.path or "/0")
        metrics_dir = stack.enter_context(tempfile.TemporaryDirectory())
        # Fakes without faults while the servers start and warm up (nothing of the
        # previous scenario left); the scenario's faults come after the warm-up.
        fake_openai.reset()
        fake_replicate.reset()
        env = server_env(params, deadline, owner, fakes, redis_url, database_url, metrics_dir)
        started = time.perf_counter()
        server = stack.enter_context(app_server(env, ready_within=60))
        await both_workers_started(server)
        start_seconds = time.perf_counter() - started
        await warm_up(server.url, 4 * 2)
        set_upstream_faults(scenario, params, fakes, rng)
        if proxy is not None:
            proxy.set_mode("blackhole")
        began = time.perf_counter()
        samples, cut = await closed_loop(server.url, scenario, tag, params, deadline)
        wall = time.perf_counter() - began
        openai_calls = fake_openai.count(path=COMPLETIONS)
        replicate_creates = fake_replicate.count(path=REPLICATE_CREATE)
        if proxy is not None:
            proxy.set_mode("pass")  # so the shutdown does not wait on a silent Redis
        latency, lines, warnings = read_logs(server)
        if params.keep_logs is not None:
            params.keep_logs.mkdir(parents=True, exist_ok=True)
            (params.keep_logs / f"{tag}.log").write_text(server.output())
    # Servers stopped: release whatever the fakes still hold.
    fake_openai.reset()
    fake_replicate.reset()
    stories, keys = await stored_rows(database_url, owner)
    return Result(
        scenario=scenario,
        deadline=deadline,
        samples=samples,
        wall_seconds=wall,
        start_seconds=start_seconds,
        openai_calls=openai_calls,
        replicate_creates=replicate_creates,
        stored=len(stories),
        history_problems=history_problems(samples, stories, keys),
        server_latency=latency,
        log_lines=lines,
        warnings=warnings,
        time_box_hit=cut,
    )


# --- printing ----------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        return ("  " + "  ".join(parts)).rstrip()

    print(line(headers))
    for row in rows:
        print(line(row))


def secs(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def print_ladder(params: Params, deadline: float) -> None:
    openai_floor, replicate_floor = params.floors(deadline)
    budget = LadderBudget(
        reserve_seconds=RESERVE_SECONDS,
        share=RUNG_SHARE,
        floors={"openai": openai_floor, "replicate": replicate_floor},
    )
    names = ["openai", "replicate"]
    first = budget.for_rung(names, 0, deadline)
    after_cut = budget.for_rung(names, 1, deadline - first)
    alone = budget.for_rung(names, 1, deadline)
    print(
        f"\n== REQUEST_DEADLINE_SECONDS={deadline:g}: stated margin {deadline + GRACE_SECONDS:g} s "
        f"(deadline + {GRACE_SECONDS:g}); floors openai {openai_floor:g} s, replicate "
        f"{replicate_floor:g} s, reserve {RESERVE_SECONDS:g} s"
    )
    skipped = " (at most: below its floor, skipped)" if after_cut <= replicate_floor else ""
    print(
        f"   rung budgets: openai {first:.2f} s; replicate {after_cut:.2f} s after an openai "
        f"cut{skipped}, {alone:.2f} s with openai's breaker open"
    )


def print_results(results: Sequence[Result]) -> None:
    deadline = results[0].deadline
    margin = deadline + GRACE_SECONDS
    rungs = ("openai", "replicate", "cache", "offline")
    rows = []
    for r in results:
        outcomes = collections.Counter(s.outcome for s in r.samples)
        rows.append(
            [
                r.scenario,
                str(len(r.samples)),
                *(str(outcomes[name]) for name in rungs),
                str(outcomes["refused"]),
                str(outcomes["lost"]),
                str(r.stored),
                "ok" if not r.history_problems else f"{len(r.history_problems)} problems",
                f"{r.openai_calls}/{r.replicate_creates}",
                f"{r.wall_seconds:.1f}",
            ]
        )
    print("\n  answers")
    print_table(
        ["scenario", "sent", *rungs, "refused", "lost", "stored", "history", "calls o/r", "wall s"],
        rows,
    )
    rows = []
    for r in results:
        seconds = sorted(s.seconds for s in r.samples)
        over = [s for s in r.samples if s.seconds > deadline]
        beyond = [s for s in r.samples if s.seconds > margin]
        worst = max(r.samples, key=lambda s: s.seconds, default=None)
        server_worst = max(r.server_latency.values(), default=math.nan)
        rows.append(
            [
                r.scenario,
                secs(quantile(seconds, 0.5)),
                secs(quantile(seconds, 0.99)),
                secs(seconds[-1] if seconds else math.nan),
                str(len(over)),
                f"{worst.seconds - deadline:+.3f}" if worst else "-",
                f"{margin:g}",
                str(len(beyond)),
                secs(server_worst),
            ]
        )
    print(f"\n  time (client side; deadline {deadline:g} s)")
    print_table(
        [
            "scenario",
            "p50 s",
            "p99 s",
            "max s",
            "overran",
            "worst overrun s",
            "margin s",
            "past margin",
            "server max s",
        ],
        rows,
    )
    for r in results:
        extra = []
        if r.time_box_hit:
            extra.append("time box reached: fewer requests than asked")
        if r.warnings:
            listed = "; ".join(f"{n}x {m!r}" for m, n in r.warnings.most_common(4))
            extra.append(f"log warnings: {listed}")
        extra.append(f"server start {r.start_seconds:.1f} s")
        print(f"    {r.scenario}: " + "; ".join(extra))
        for problem in r.history_problems[:10]:
            print(f"      HISTORY: {problem}")
        beyond = sorted(
            (s for s in r.samples if s.seconds > margin), key=lambda s: s.seconds, reverse=True
        )
        for s in beyond[:5]:
            server = r.server_latency.get(s.request_id, math.nan)
            print(
                f"      PAST THE MARGIN: {s.request_id} client {s.seconds:.3f} s, "
                f"server {secs(server)} s, answered {s.outcome}"
            )
            for text in r.log_lines.get(s.request_id, [])[:8]:
                print(f"        {text[:300]}")


def print_machine(params: Params) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load}, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    print(f"params: {params.describe()}")
    lo, hi = params.replicate_latency
    print(
        f"upstreams: fake OpenAI answers after {params.openai_delay:g} s; fake Replicate "
        f"creates after U({lo - POLLS * POLL_INTERVAL_SECONDS:g}, "
        f"{hi - POLLS * POLL_INTERVAL_SECONDS:g}) s, then {POLLS} polls "
        f"{POLL_INTERVAL_SECONDS:g} s apart (about {lo:g}-{hi:g} s); 'hang' = never answers"
    )


# --- the run -----------------------------------------------------------------------


@contextlib.contextmanager
def fake_upstreams() -> Iterator[tuple[FakeOpenAI, FakeReplicate]]:
    fake_openai, fake_replicate = FakeOpenAI(), FakeReplicate()
    with fake_openai, fake_replicate:
        yield fake_openai, fake_replicate


async def main(params: Params) -> None:
    print_machine(params)
    rng = random.Random(params.seed)
    admin = aioredis.Redis.from_url(params.redis_url, socket_timeout=5)
    name, database_url = await create_database(params.database_url, "bench_deadlines")
    started = time.perf_counter()
    try:
        with fake_upstreams() as fakes:
            for deadline in params.deadlines:
                await admin.flushdb()
                print_ladder(params, deadline)
                results = []
                for scenario in params.scenarios:
                    results.append(
                        await run_scenario(
                            scenario, deadline, params, fakes, admin, database_url, rng
                        )
                    )
                print_results(results)
    finally:
        await admin.flushdb()
        await admin.aclose()
        await drop_database(params.database_url, name)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    asyncio.run(main(parse_params()))
