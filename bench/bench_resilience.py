"""What the resilience path costs (issue 3), measured against real servers.

1. Healthy overhead: the OpenAI provider called directly (a) versus the same
   provider instance behind the `Guard` the app builds (`build_upstreams`), with an
   in-memory breaker store (b) and with the Redis one (c: `FailoverBreakerStore`
   over `RedisBreakerStore`), against the fake OpenAI with a small fixed delay.
   Sequential calls (the variants interleaved call by call) and concurrent ones
   (batch by batch, rotating), so that drift on a shared machine hits all alike.
2. Open breaker: the fake answers 500 until the breaker opens; then the time the
   `Guard` takes to refuse (both stores), and POST /v1/stories through the whole
   app (in-process, over ASGI) answered by the offline rung.
3. Redis black-holed: the app with `REDIS_URL` pointing at a `FaultProxy` in front
   of the real Redis; POST /v1/stories per proxy mode, the first request after
   each switch reported apart from the rest; before each fault the app is given
   time to leave every in-process fallback, so each fault starts from "healthy".

Run from the project root (figures are printed, nothing is asserted about time):

    python -m bench.bench_resilience --quick    # under a minute
    python -m bench.bench_resilience            # the full run (a few minutes)

Everything runs in this one process: the fake OpenAI and the fault proxy are
threads with their own event loops, so their CPU shares the GIL with the client
and the app. Read differences between variants measured in the same run, not
absolute figures. Redis database 14 (`--redis-url`) is flushed before, between
phases and after. The app's JSON logs go to a temporary file (`--log-file` keeps
them); the warnings seen during each phase are summarised.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis

from app.core.resilience import BreakerState, LoggingObserver, ResilienceError
from app.core.resilience.stores import FailoverBreakerStore
from app.lifespan import redis_from_settings
from app.platform.config import RateLimitSettings, Settings
from app.platform.logs import JsonFormatter
from app.providers.base import ProviderError, StoryRequest
from app.providers.openai import OpenAIStoryProvider
from app.providers.registry import Upstreams, build_upstreams
from app.providers.resilient import Guard, ResilientStoryProvider
from tests.fakes.fault_proxy import FaultProxy
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.support import STORY_BODY, make_settings, serve

COMPLETIONS = "/v1/chat/completions"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
STORY = StoryRequest(
    prompt="a dragon who is afraid of the dark", age=6, length="short", language="en"
)
# A request slower than this is recorded as "timeout": the run never hangs.
REQUEST_TIMEOUT_SECONDS = 10.0
# FailoverBreakerStore's default retry_interval_seconds (not a setting).
BREAKER_STORE_RETRY_SECONDS = 1.0

Call = Callable[[], Awaitable[object]]


# --- parameters -------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    quick: bool
    upstream_delay_ms: float
    rounds: int
    sequential: int  # per variant
    concurrent: int  # per variant, split into `rounds` batches
    concurrency: int
    open_calls: int  # Guard refusals timed per store
    http_calls: int  # POST /v1/stories per app phase
    proxy_calls: int  # POST /v1/stories per proxy mode and cycle
    proxy_cycles: int
    proxy_faults: tuple[str, ...]
    proxy_latency_ms: float
    redis_url: str
    database_url: str | None
    time_limit_seconds: float
    log_file: Path | None
    parts: frozenset[int]

    def describe(self) -> str:
        return (
            f"mode={'quick' if self.quick else 'full'} "
            f"upstream_delay_ms={self.upstream_delay_ms:g} rounds={self.rounds} "
            f"sequential={self.sequential}/variant concurrent={self.concurrent}/variant "
            f"concurrency={self.concurrency} open_calls={self.open_calls} "
            f"http_calls={self.http_calls}/phase proxy_calls={self.proxy_calls}/mode "
            f"proxy_cycles={self.proxy_cycles} proxy_faults={','.join(self.proxy_faults)} "
            f"proxy_latency_ms={self.proxy_latency_ms:g} "
            f"time_limit_s={self.time_limit_seconds:g} "
            f"parts={','.join(str(part) for part in sorted(self.parts))}"
        )


def parse_params(argv: Sequence[str] | None = None) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_resilience",
        description="Print latency figures of the resilience path (issue 3).",
    )
    parser.add_argument("--quick", action="store_true", help="short run, under a minute")
    parser.add_argument("--upstream-delay-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, help="concurrent batches per variant in part 1")
    parser.add_argument("--sequential", type=int, help="sequential calls per variant")
    parser.add_argument("--concurrent", type=int, help="concurrent calls per variant")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--open-calls", type=int, help="refusals timed per breaker store")
    parser.add_argument("--http-calls", type=int, help="POST /v1/stories per app phase")
    parser.add_argument("--proxy-calls", type=int, help="POST /v1/stories per proxy mode")
    parser.add_argument("--proxy-cycles", type=int, help="repeats of the proxy fault sequence")
    parser.add_argument("--proxy-latency-ms", type=float, default=200.0)
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="a Redis database this benchmark may flush (default: db 14)",
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL URL of a scratch database (default: a temporary SQLite file)",
    )
    parser.add_argument("--time-limit", type=float, help="seconds of sampling, all phases")
    parser.add_argument(
        "--log-file", type=Path, help="keep the app's JSON logs here (default: a temporary file)"
    )
    parser.add_argument(
        "--only",
        type=int,
        choices=(1, 2, 3),
        action="append",
        help="run only this part (repeatable; default: all three)",
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick

    def pick(value: float | None, quick_value: float, full_value: float) -> float:
        return float(value) if value is not None else (quick_value if quick else full_value)

    return Params(
        quick=quick,
        upstream_delay_ms=args.upstream_delay_ms,
        rounds=max(1, int(pick(args.rounds, 4, 10))),
        sequential=int(pick(args.sequential, 200, 2000)),
        concurrent=int(pick(args.concurrent, 384, 3200)),
        concurrency=max(1, args.concurrency),
        open_calls=int(pick(args.open_calls, 300, 2000)),
        http_calls=int(pick(args.http_calls, 50, 300)),
        proxy_calls=max(2, int(pick(args.proxy_calls, 20, 60))),
        proxy_cycles=max(1, int(pick(args.proxy_cycles, 1, 3))),
        proxy_faults=("blackhole", "latency") if quick else ("blackhole", "latency", "down"),
        proxy_latency_ms=args.proxy_latency_ms,
        redis_url=args.redis_url,
        database_url=args.database_url,
        time_limit_seconds=pick(args.time_limit, 40, 400),
        log_file=args.log_file,
        parts=frozenset(args.only or (1, 2, 3)),
    )


# --- measuring and printing -------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Latency summary in milliseconds."""

    n: int
    p50: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = [s * 1000 for s in seconds]
        if not ms:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        if len(ms) == 1:
            return cls(1, ms[0], ms[0], ms[0], ms[0])
        cuts = statistics.quantiles(ms, n=100, method="inclusive")
        return cls(len(ms), cuts[49], cuts[98], statistics.fmean(ms), max(ms))

    def cells(self) -> list[str]:
        return [str(self.n), ms(self.p50), ms(self.p99), ms(self.mean), ms(self.max)]


STATS_HEADERS = ["n", "p50 ms", "p99 ms", "mean ms", "max ms"]


class TimeBox:
    """A phase's share of the time limit; loops stop sampling once it is used up."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._ends = time.monotonic() + seconds
        self.cut = False

    def over(self) -> bool:
        if not self.cut and time.monotonic() >= self._ends:
            self.cut = True
        return self.cut

    def report(self) -> None:
        if self.cut:
            print(f"  (time box of {self.seconds:.0f} s reached: fewer samples than asked)")


class LoopLag:
    """How late the event loop wakes a 5 ms sleeper while a block runs (seconds)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: list[float] = []

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        async def watch() -> None:
            while True:
                started = time.perf_counter()
                await asyncio.sleep(self.interval)
                self.samples.append(max(0.0, time.perf_counter() - started - self.interval))

        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def ratio(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base) or base <= 0:
        return "-"
    return f"{value / base:.2f}x"


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


class LogTap:
    """The app's JSON log lines go to a file; warnings per phase are counted from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stream: TextIO = path.open("a", encoding="utf-8")

    def offset(self) -> int:
        self.stream.flush()
        return self.path.stat().st_size

    @contextlib.contextmanager
    def counting(self) -> Iterator[collections.Counter[str]]:
        """Yields a Counter filled, when the block ends, with the warnings logged in it."""
        counts: collections.Counter[str] = collections.Counter()
        start = self.offset()
        try:
            yield counts
        finally:
            counts.update(self.warnings_since(start))

    def warnings_since(self, offset: int) -> collections.Counter[str]:
        self.stream.flush()
        with self.path.open("rb") as file:
            file.seek(offset)
            data = file.read().decode(errors="replace")
        counts: collections.Counter[str] = collections.Counter()
        for text in data.splitlines():
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
                message = str(entry.get("message", ""))
                counts[message if len(message) <= 60 else message[:57] + "..."] += 1
        return counts

    def close(self) -> None:
        logging.getLogger().handlers[:] = [logging.NullHandler()]
        self.stream.close()


def print_warnings(label: str, counts: collections.Counter[str]) -> None:
    if counts:
        listed = "; ".join(f"{n}x {message!r}" for message, n in counts.most_common(4))
        print(f"    log warnings, {label}: {listed}")


def describe_outcomes(outcomes: collections.Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in outcomes.most_common())


# --- helpers ----------------------------------------------------------------------


def app_settings(
    params: Params, fake: FakeOpenAI, redis_url: str | None, sqlite_path: Path
) -> Settings:
    """The app as an operator runs it (log level INFO, so access logs are written),
    with the tests' short retry waits and rate limits too high to ever answer 429."""
    return make_settings(
        sqlite_path=sqlite_path,
        database_url=params.database_url,
        redis_url=redis_url,
        openai_base_url=fake.openai_base_url,
        log_level="INFO",
        rate_limit=RateLimitSettings(
            _env_file=None, default="1000000/minute", create_story="1000000/minute"
        ),
    )


@contextlib.asynccontextmanager
async def app_client(settings: Settings, logs: LogTap) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, lifespan started, reached in-process over ASGI. The lifespan
    binds its log handler to sys.stdout at startup: here, to the log file."""
    async with contextlib.AsyncExitStack() as stack:
        with contextlib.redirect_stdout(logs.stream):
            client = await stack.enter_async_context(serve(settings))
        yield client


def openai_rung(upstreams: Upstreams) -> ResilientStoryProvider:
    for provider in upstreams.story_providers:
        if isinstance(provider, ResilientStoryProvider) and provider.name == "openai":
            return provider
    raise RuntimeError("build_upstreams built no OpenAI provider")


def wrap(direct: OpenAIStoryProvider, upstreams: Upstreams) -> ResilientStoryProvider:
    """`direct` behind the guard `build_upstreams` made for openai:chat."""
    return ResilientStoryProvider(direct, openai_rung(upstreams).guard)


@dataclass(frozen=True)
class Sample:
    seconds: float
    outcome: str  # "201 openai", "201 offline", "HTTP 503", "timeout", ...


async def post_story(client: httpx.AsyncClient, prompt: str) -> Sample:
    body = {**STORY_BODY, "prompt": prompt}
    started = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
            response = await client.post("/v1/stories", json=body)
    except TimeoutError:
        return Sample(time.perf_counter() - started, "timeout")
    elapsed = time.perf_counter() - started
    if response.status_code == 201:
        return Sample(elapsed, f"201 {response.json().get('provider', '?')}")
    return Sample(elapsed, f"HTTP {response.status_code}")


async def timed_concurrent(call: Call, n: int, workers: int, out: list[float]) -> float:
    """`n` calls made by `workers` concurrent tasks; returns the batch's wall time."""
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            out.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - started


async def flush(admin: aioredis.Redis) -> None:
    await admin.flushdb()


# --- 1. healthy overhead ----------------------------------------------------------


@dataclass
class Variant:
    label: str
    call: Call
    seq: list[float] = field(default_factory=list)
    seq_cpu: float = 0.0
    conc: list[float] = field(default_factory=list)
    conc_cpu: float = 0.0
    conc_wall: float = 0.0
    lag: LoopLag = field(default_factory=LoopLag)


async def redis_ping_rtt(redis: aioredis.Redis, n: int = 200) -> Stats:
    samples: list[float] = []
    for _ in range(n):
        started = time.perf_counter()
        await redis.ping()
        samples.append(time.perf_counter() - started)
    return Stats.of(samples)


async def guard_alone(guards: Sequence[tuple[str, Guard]], n: int, box: TimeBox) -> None:
    """The guard around a coroutine that returns at once: its own cost, no upstream."""

    async def nothing() -> None:
        return None

    samples: dict[str, list[float]] = {label: [] for label, _ in guards}
    block = 100
    for _ in range(max(1, n // block)):
        if box.over():
            break
        for label, guard in guards:
            out = samples[label]
            for _ in range(block):
                started = time.perf_counter()
                await guard.run(nothing)
                out.append(time.perf_counter() - started)
    rows = []
    for label, _ in guards:
        s = Stats.of(samples[label])
        rows.append([label, str(s.n), *(f"{v * 1000:.1f}" for v in (s.p50, s.p99, s.mean))])
    print("\n  the guard alone, around a coroutine that returns at once (sequential):")
    print_table(["guard", "n", "p50 us", "p99 us", "mean us"], rows)


def rotated(variants: Sequence[Variant], by: int) -> list[Variant]:
    k = by % len(variants)
    return [*variants[k:], *variants[:k]]


async def run_healthy(
    params: Params,
    variants: Sequence[Variant],
    logs: LogTap,
    box: TimeBox,
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Fills the variants' samples; returns the log warnings of the two phases."""
    conc_per_round = max(params.concurrency, params.concurrent // params.rounds)
    # Warm-up: connection pools, the Lua script cache, first-call code paths.
    for variant in variants:
        for _ in range(20):
            await variant.call()
        await timed_concurrent(variant.call, params.concurrency * 2, params.concurrency, [])
    # Sequential: call by call, a b c, b c a, c a b, ... so drift hits all alike.
    # At most half the time box, so the concurrent batches still get their share.
    seq_box = TimeBox(box.seconds / 2)
    with logs.counting() as seq_warnings:
        for i in range(params.sequential):
            if seq_box.over() or box.over():
                box.cut = True
                break
            for variant in rotated(variants, i):
                cpu = time.process_time()
                started = time.perf_counter()
                await variant.call()
                variant.seq.append(time.perf_counter() - started)
                variant.seq_cpu += time.process_time() - cpu
    with logs.counting() as conc_warnings:
        for r in range(params.rounds):
            for variant in rotated(variants, r):
                if box.over():
                    break
                cpu = time.process_time()
                async with variant.lag.watching():
                    variant.conc_wall += await timed_concurrent(
                        variant.call, conc_per_round, params.concurrency, variant.conc
                    )
                variant.conc_cpu += time.process_time() - cpu
    return seq_warnings, conc_warnings


def report_healthy(
    params: Params,
    variants: Sequence[Variant],
    ping: Stats,
    warnings: tuple[collections.Counter[str], collections.Counter[str]],
) -> None:
    print(
        f"  Redis PING round trip, for context: p50 {ms(ping.p50)} ms, p99 {ms(ping.p99)} ms "
        f"(n={ping.n}); a healthy call through (c) makes 2 Lua calls (acquire, success)"
    )
    print(
        "  cpu ms/call = this process's CPU time (client, SDK, guard AND the fake's thread) / calls"
    )
    for concurrent, phase_warnings in zip((False, True), warnings, strict=True):
        title = f"{params.concurrency} concurrent" if concurrent else "sequential"
        print(f"\n  {title}:")
        rows: list[list[str]] = []
        stats: list[Stats] = []
        for v in variants:
            samples = v.conc if concurrent else v.seq
            s = Stats.of(samples)
            stats.append(s)
            cpu = (v.conc_cpu if concurrent else v.seq_cpu) / max(1, len(samples)) * 1000
            row = [v.label, *s.cells(), ms(cpu)]
            if concurrent:
                lag = Stats.of(v.lag.samples)
                rate = f"{len(samples) / v.conc_wall:.0f}" if v.conc_wall else "-"
                row += [rate, ms(lag.p99), ms(lag.max)]
            rows.append(row)
        headers = ["variant", *STATS_HEADERS, "cpu ms/call"]
        if concurrent:
            headers += ["calls/s", "loop lag p99", "lag max"]
        print_table(headers, rows)
        a = stats[0]
        diff_rows = [
            [
                f"{v.label[:1]} - a",
                f"{s.p50 - a.p50:+.2f}",
                f"{s.p99 - a.p99:+.2f}",
                f"{s.mean - a.mean:+.2f}",
                ratio(s.p50, a.p50),
                ratio(s.p99, a.p99),
                ratio(s.mean, a.mean),
            ]
            for v, s in zip(variants[1:], stats[1:], strict=True)
        ]
        print_table(
            ["added", "Δp50 ms", "Δp99 ms", "Δmean ms", "p50 ratio", "p99 ratio", "mean ratio"],
            diff_rows,
        )
        print_warnings(title, phase_warnings)


# --- 2. open breaker --------------------------------------------------------------


async def open_breaker(fake: FakeOpenAI, provider: ResilientStoryProvider) -> tuple[int, int]:
    """Calls until the guard refuses; returns (calls, upstream attempts) it took."""
    before = fake.count(path=COMPLETIONS)
    for calls in range(1, 21):
        try:
            await provider.generate(STORY)
        except ResilienceError:
            return calls, fake.count(path=COMPLETIONS) - before
        except ProviderError:
            continue
    raise RuntimeError("the breaker did not open within 20 calls")


async def time_refusals(
    fake: FakeOpenAI, call: Call, n: int, box: TimeBox
) -> tuple[Stats, collections.Counter[str], int]:
    before = fake.count(path=COMPLETIONS)
    samples: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        if box.over():
            break
        started = time.perf_counter()
        try:
            await call()
            outcomes["success"] += 1
        except (ProviderError, ResilienceError) as error:
            outcomes[type(error).__name__] += 1
        samples.append(time.perf_counter() - started)
    return Stats.of(samples), outcomes, fake.count(path=COMPLETIONS) - before


async def bench_open_guard(
    params: Params,
    fake: FakeOpenAI,
    direct: OpenAIStoryProvider,
    guarded: Sequence[tuple[str, Upstreams]],
    box: TimeBox,
) -> None:
    fake.set_fault(Fault.status(500), path=COMPLETIONS)
    rows: list[list[str]] = []
    try:
        stats, outcomes, upstream = await time_refusals(
            fake, functools.partial(direct.generate, STORY), min(params.open_calls, 100), box
        )
        rows.append(
            [
                "a direct SDK, upstream 500 (reference)",
                *stats.cells(),
                str(upstream),
                "",
                describe_outcomes(outcomes),
            ]
        )
        for label, upstreams in guarded:
            provider = wrap(direct, upstreams)
            calls, attempts = await open_breaker(fake, provider)
            stats, outcomes, upstream = await time_refusals(
                fake, functools.partial(provider.generate, STORY), params.open_calls, box
            )
            snapshot = await upstreams.breakers["openai:chat"].snapshot()
            store = upstreams.breaker_store
            where = "redis" if isinstance(store, FailoverBreakerStore) else "in-process"
            if snapshot.store_degraded:
                where = "in-process fallback (Redis store degraded!)"
            state = f"{snapshot.state} in {where}"
            rows.append(
                [
                    f"{label} (opened: {calls} call, {attempts} attempts)",
                    *stats.cells(),
                    str(upstream),
                    state,
                    describe_outcomes(outcomes),
                ]
            )
            assert snapshot.state is BreakerState.OPEN
    finally:
        fake.set_fault(Fault.delay(params.upstream_delay_ms / 1000), path=COMPLETIONS)
    print_table(["Guard call, breaker open", *STATS_HEADERS, "upstream", "breaker", "raised"], rows)


async def bench_open_http(
    params: Params,
    fake: FakeOpenAI,
    admin: aioredis.Redis,
    logs: LogTap,
    workdir: Path,
    box: TimeBox,
) -> None:
    rows: list[list[str]] = []
    notes: list[tuple[str, collections.Counter[str]]] = []
    backends: list[tuple[str, str | None]] = [("in-process", None), ("redis", params.redis_url)]
    for store, redis_url in backends:
        await flush(admin)  # the breaker in Redis is shared: start closed
        settings = app_settings(params, fake, redis_url, workdir / f"open-{store}.sqlite3")
        async with app_client(settings, logs) as client:
            for i in range(10):  # warm-up
                await post_story(client, f"warm-up {store} {i}")
            with logs.counting() as warnings:
                healthy = [
                    await post_story(client, f"healthy {store} {i}")
                    for i in range(params.http_calls)
                    if not box.over()
                ]
                fake.set_fault(Fault.status(500), path=COMPLETIONS)
                try:
                    opening: list[Sample] = []
                    for i in range(20):
                        before = fake.count(path=COMPLETIONS)
                        opening.append(await post_story(client, f"opening {store} {i}"))
                        if fake.count(path=COMPLETIONS) == before:
                            break
                    before = fake.count(path=COMPLETIONS)
                    # Fresh prompts: the cache rung misses, the offline rung answers.
                    refused = [
                        await post_story(client, f"while open {store} {i}")
                        for i in range(params.http_calls)
                        if not box.over()
                    ]
                    upstream = fake.count(path=COMPLETIONS) - before
                finally:
                    fake.set_fault(Fault.delay(params.upstream_delay_ms / 1000), path=COMPLETIONS)
            notes.append((f"app with {store} store", warnings))
        for label, samples, calls in (
            (f"{store} store: healthy", healthy, "-"),
            (f"{store} store: opening the breaker", opening, "-"),
            (f"{store} store: breaker open", refused, str(upstream)),
        ):
            stats = Stats.of([s.seconds for s in samples])
            outcomes = collections.Counter(s.outcome for s in samples)
            rows.append([label, *stats.cells(), calls, describe_outcomes(outcomes)])
    await flush(admin)
    print_table(["POST /v1/stories (in-process ASGI)", *STATS_HEADERS, "upstream", "answers"], rows)
    for label, counts in notes:
        print_warnings(label, counts)


# --- 3. Redis black-holed ---------------------------------------------------------


@dataclass
class ModeSamples:
    firsts: list[float] = field(default_factory=list)
    rest: list[float] = field(default_factory=list)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)


async def bench_redis_faults(
    params: Params,
    fake: FakeOpenAI,
    logs: LogTap,
    workdir: Path,
    box: TimeBox,
) -> None:
    target = urlsplit(params.redis_url)
    proxy = FaultProxy(
        target.hostname or "127.0.0.1",
        target.port or 6379,
        latency_ms=params.proxy_latency_ms,
    )
    proxy.start()
    results: dict[str, ModeSamples] = {}
    try:
        settings = app_settings(
            params, fake, proxy.url_for(path=target.path or "/0"), workdir / "redis-faults.sqlite3"
        )
        # Every in-process fallback (breaker store, limiter) tries Redis again after
        # this long: waiting it out in "pass" makes each fault start from healthy.
        settle = max(settings.rate_limit.redis_retry_seconds, BREAKER_STORE_RETRY_SECONDS) + 0.3
        print(
            f"  app REDIS_URL -> fault proxy 127.0.0.1:{proxy.port} -> {params.redis_url}; "
            f"Redis budget REDIS_SOCKET_TIMEOUT_MS={settings.redis.socket_timeout_ms}, "
            f"RATE_LIMIT_REDIS_BUDGET_MS={settings.rate_limit.redis_budget_ms}; "
            f"latency mode adds {params.proxy_latency_ms:g} ms per chunk each way; "
            f"{settle:.1f} s in pass mode before each fault"
        )
        per_mode = box.seconds / (1 + 2 * len(params.proxy_faults) * params.proxy_cycles)
        count = 0

        async def sample(label: str, mode: str) -> None:
            nonlocal count
            proxy.set_mode(mode)
            result = results.setdefault(label, ModeSamples())
            mode_box = TimeBox(per_mode)
            with logs.counting() as warnings:
                for i in range(params.proxy_calls):
                    if i > 0 and mode_box.over():
                        break
                    count += 1
                    got = await post_story(client, f"proxy {label} {count}")
                    (result.rest if i else result.firsts).append(got.seconds)
                    result.outcomes[got.outcome] += 1
            result.warnings.update(warnings)

        async with app_client(settings, logs) as client:
            for i in range(10):  # warm-up
                await post_story(client, f"warm-up proxy {i}")
            await sample("pass", "pass")
            for _ in range(params.proxy_cycles):
                for fault in params.proxy_faults:
                    proxy.set_mode("pass")
                    await asyncio.sleep(settle)
                    await sample(fault, fault)
                    await sample(f"pass, just after {fault}", "pass")
            proxy.set_mode("pass")
    finally:
        proxy.stop()
    rows: list[list[str]] = []
    for label, result in results.items():
        firsts = Stats.of(result.firsts)
        first = ms(firsts.p50) if firsts.n == 1 else f"{ms(firsts.p50)} (max {ms(firsts.max)})"
        rows.append(
            [label, first, *Stats.of(result.rest).cells(), describe_outcomes(result.outcomes)]
        )
    print_table(["proxy mode", "first ms", *STATS_HEADERS, "answers"], rows)
    print(
        f"  first = the first request after switching (median of {params.proxy_cycles} "
        "cycles, when several); n..max = the requests after it"
    )
    for label, result in results.items():
        print_warnings(label, result.warnings)


# --- main -------------------------------------------------------------------------


def versions() -> str:
    found = []
    for name in ("redis", "openai", "aiohttp", "httpx", "fastapi"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def print_context(params: Params) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("== story service: resilience path benchmark (issue 3) ==")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load}, {platform.platform()}, "
        f"Python {platform.python_version()}; {versions()}"
    )
    print(f"parameters: {params.describe()}")
    database = "PostgreSQL (--database-url)" if params.database_url else "temporary SQLite files"
    print(
        f"redis: {params.redis_url} (flushed before, between phases, after); "
        f"database: {database}; app logs: "
        f"{params.log_file or 'a temporary file'} (JSON lines; warnings summarised)"
    )
    print(
        "one process: client, app (in-process ASGI), fake OpenAI and fault proxy "
        "(threads); percentiles by statistics.quantiles (inclusive)"
    )


async def bench_guard(
    params: Params, fake: FakeOpenAI, admin: aioredis.Redis, logs: LogTap
) -> None:
    """Parts 1 and 2 (Guard): one provider instance, guards from `build_upstreams`."""
    limit = params.time_limit_seconds
    async with contextlib.AsyncExitStack() as stack:
        settings = app_settings(params, fake, params.redis_url, Path("unused.sqlite3"))
        direct = OpenAIStoryProvider.from_settings(settings.openai)
        stack.push_async_callback(direct.close)
        redis = redis_from_settings(settings)
        assert redis is not None
        stack.push_async_callback(redis.aclose)
        observer = LoggingObserver()

        async def upstreams(with_redis: bool) -> Upstreams:
            client = redis if with_redis else None
            return await build_upstreams(settings, client, stack, observer=observer)

        if 1 in params.parts:
            b = wrap(direct, await upstreams(False))
            c = wrap(direct, await upstreams(True))
            variants = [
                Variant(
                    "a direct SDK: OpenAIStoryProvider.generate", lambda: direct.generate(STORY)
                ),
                Variant("b Guard, in-memory breaker store", lambda: b.generate(STORY)),
                Variant("c Guard, Redis breaker store (failover)", lambda: c.generate(STORY)),
            ]
            print(
                "\n[1] healthy path: what the guard adds (fake OpenAI "
                f"+{params.upstream_delay_ms:g} ms; one provider instance; "
                "variants interleaved call by call, or batch by batch when concurrent)"
            )
            box = TimeBox(limit * 0.50)
            ping = await redis_ping_rtt(redis)
            warnings = await run_healthy(params, variants, logs, box)
            report_healthy(params, variants, ping, warnings)
            await guard_alone(
                [("b Guard, in-memory store", b.guard), ("c Guard, Redis store", c.guard)],
                n=params.sequential * 5,
                box=box,
            )
            box.report()

        if 2 in params.parts:
            print("\n[2] breaker open: time to answer (the fake answers 500 until it opens)")
            await flush(admin)
            box = TimeBox(limit * 0.10)
            fresh = [
                ("b Guard, in-memory store", await upstreams(False)),
                ("c Guard, Redis store", await upstreams(True)),
            ]
            await bench_open_guard(params, fake, direct, fresh, box)
            box.report()


async def run(params: Params, logs: LogTap, workdir: Path) -> None:
    started = time.monotonic()
    limit = params.time_limit_seconds
    admin = aioredis.Redis.from_url(params.redis_url, socket_timeout=2, socket_connect_timeout=2)
    await flush(admin)
    fake = FakeOpenAI()
    fake.start()
    try:
        fake.set_fault(Fault.delay(params.upstream_delay_ms / 1000), path=COMPLETIONS)
        if params.parts & {1, 2}:
            await bench_guard(params, fake, admin, logs)
        if 2 in params.parts:
            print()
            box = TimeBox(limit * 0.15)
            await bench_open_http(params, fake, admin, logs, workdir, box)
            box.report()
        if 3 in params.parts:
            print("\n[3] Redis black-holed versus healthy: POST /v1/stories, fake OpenAI healthy")
            await flush(admin)
            box = TimeBox(limit * 0.25)
            await bench_redis_faults(params, fake, logs, workdir, box)
    finally:
        fake.stop()
        with contextlib.suppress(Exception):
            await flush(admin)
        await admin.aclose()
    print(f"\ntotal {time.monotonic() - started:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    params = parse_params(argv)
    print_context(params)
    with tempfile.TemporaryDirectory(prefix="bench-resilience-") as tmp:
        workdir = Path(tmp)
        logs = LogTap(params.log_file or workdir / "app.log")
        handler = logging.StreamHandler(logs.stream)
        handler.setFormatter(JsonFormatter())
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger().setLevel(logging.INFO)
        try:
            asyncio.run(run(params, logs, workdir))
        finally:
            logs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
