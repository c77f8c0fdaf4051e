"""Benchmark (issue 10): three hot paths of one worker, each measured in one run.

1. `metrics`: API throughput (POST /v1/stories) alone, then the same load beside
   a flood of `/metrics` scrapes; the scrape size and rate; Redis commands per
   scrape (Redis `INFO commandstats` around scrapes with nothing else running).
2. `budget`: how often shared breaker state falls back to in-process ("Redis
   gate closed") while one worker is saturated with story requests although
   Redis answers in well under a millisecond; and, in this process, the same
   Redis call judged by a plain wall-clock `asyncio.timeout` next to
   `RedisBudget`, while a task blocks the event loop (`time.sleep`) again and again.
3. `sqlite`: the same load (POST /v1/stories, then GET /v1/stories and
   GET /v1/stories/{id}) on the embedded SQLite store and on PostgreSQL.
   `--profile` also writes a cProfile of the SQLite server (`--profile-out`).

Every server is a real `python -m app` (uvicorn, one worker) on loopback, in front
of the fake OpenAI from `tests/fakes/` (a thread of this process). Redis is a
private `redis-server` this benchmark starts on a free port (its command counts
are then this benchmark's alone); PostgreSQL is a scratch database created on
`--postgres-url` and dropped after. Every process started is stopped by its id.

    python -m bench.bench_hot_paths [--only metrics|budget|sqlite] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.models import StoryRecord  # noqa: E402
from bench.bench_health import Result  # noqa: E402
from tests.fakes.openai_fake import FakeOpenAI  # noqa: E402
from tests.fakes.server import Fault  # noqa: E402
from tests.support import STORY_BODY, free_port, server_process  # noqa: E402

COMPLETIONS = "/v1/chat/completions"


# --- processes -----------------------------------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of this benchmark's own on a free loopback port; its URL."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2),
            ):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def app_env(fake: FakeOpenAI, workdir: Path, **extra: str) -> dict[str, str]:
    return {
        "LOG_LEVEL": "WARNING",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": fake.openai_base_url,
        "MODERATION_MODE": "local",
        "DATABASE_SQLITE_PATH": str(workdir / f"{uuid.uuid4().hex}.sqlite3"),
        "RATE_LIMIT_CREATE_STORY": "100000000/minute",
        "RATE_LIMIT_DEFAULT": "100000000/minute",
        "RATE_LIMIT_PER_CLIENT": "100000000/minute",
        **extra,
    }


# The process id of each server by URL, to read its CPU time.
SERVER_PIDS: dict[str, int] = {}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def app_server(
    env: dict[str, str], *, profile_to: str | None = None, logs: list[str] | None = None
) -> Iterator[str]:
    port = free_port()
    args = ["-m", "app"]
    if profile_to:
        args = ["-m", "bench.profile_server", profile_to, "--port", str(port)]
    with server_process(args, {**env, "HOST": "127.0.0.1", "PORT": str(port)}, port=port) as s:
        SERVER_PIDS[s.url] = s.process.pid
        yield s.url
        if logs is not None:
            logs.extend(s.output().splitlines())


def warnings_by_cause(lines: list[str]) -> Counter[str]:
    """The app's JSON log lines at warning or above, by message and error type."""
    causes: Counter[str] = Counter()
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("level") in ("warning", "error") and "moderation" not in line:
                error = str(record.get("error", ""))[:60]
                causes[f"{record.get('message')} {error}".strip()] += 1
    return causes


# --- load ----------------------------------------------------------------------------------


async def closed_loop(
    session: aiohttp.ClientSession,
    name: str,
    method: str,
    url: str,
    *,
    concurrency: int,
    seconds: float,
    body: bool = False,
) -> tuple[Result, int]:
    """`concurrency` clients repeating one request for `seconds`; the result and bytes read."""
    latencies: list[float] = []
    errors = 0
    size = 0
    stop_at = time.perf_counter() + seconds
    counter = 0

    async def client() -> None:
        nonlocal errors, size, counter
        while time.perf_counter() < stop_at:
            counter += 1
            payload = {**STORY_BODY, "prompt": f"a story for bench number {counter}"}
            started = time.perf_counter()
            try:
                async with session.request(method, url, json=payload if body else None) as response:
                    data = await response.read()
                    size = len(data)
                    if response.status >= 400:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Result(name, len(latencies), time.perf_counter() - started, latencies, errors), size


def header() -> str:
    return f"{'':<48} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def redis_calls(url: str) -> int:
    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


# --- 1. metrics ----------------------------------------------------------------------------


async def bench_metrics(args: argparse.Namespace, fake: FakeOpenAI, workdir: Path) -> None:
    print("\n== Metrics scrapes: API throughput alone and beside a scrape flood ==")
    with private_redis() as redis_url:
        env = app_env(fake, workdir, REDIS_URL=redis_url)
        with app_server(env) as url:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                stories = f"{url}/v1/stories"
                common = {"concurrency": args.concurrency, "seconds": args.seconds, "body": True}
                await closed_loop(session, "warm-up", "POST", stories, **{**common, "seconds": 3})
                alone, _ = await closed_loop(session, "POST /v1/stories alone", "POST",
                                             stories, **common)  # fmt: skip
                flood = asyncio.ensure_future(
                    closed_loop(session, "  /metrics flood (beside the API)", "GET",
                                f"{url}/metrics", concurrency=args.scrapers,
                                seconds=args.seconds)
                )  # fmt: skip
                beside, _ = await closed_loop(
                    session,
                    f"POST /v1/stories + {args.scrapers} scrapers",
                    "POST",
                    stories,
                    **common,
                )
                scrapes, size = await flood
                # The reference: the same flood on the cheapest endpoint there is.
                live_flood = asyncio.ensure_future(
                    closed_loop(session, "  /health/live flood (beside the API)", "GET",
                                f"{url}/health/live", concurrency=args.scrapers,
                                seconds=args.seconds)
                )  # fmt: skip
                beside_live, _ = await closed_loop(
                    session, f"POST /v1/stories + {args.scrapers} /health/live", "POST",
                    stories, **common,
                )  # fmt: skip
                lives, _ = await live_flood
                # Redis commands per scrape, nothing else running.
                before = await redis_calls(redis_url)
                quiet, _ = await closed_loop(
                    session, "/metrics alone, 1 client", "GET", f"{url}/metrics",
                    concurrency=1, seconds=min(3.0, args.seconds),
                )  # fmt: skip
                per_scrape = (await redis_calls(redis_url) - before) / max(1, quiet.requests)
                async with session.get(f"{url}/metrics") as response:
                    text = await response.text()
        print(header())
        for row in (alone, beside, scrapes, beside_live, lives, quiet):
            print(row.row())
        rate = alone.requests / alone.seconds
        for what, row in (("/metrics", beside), ("/health/live", beside_live)):
            ratio = row.requests / row.seconds / max(1e-9, rate)
            print(f"API throughput beside the {what} flood / alone: {ratio:.2f}")
        print(f"scrape size: {size / 1024:.1f} KiB; Redis commands per scrape: {per_scrape:.2f}")
        print(
            "Redis errors counted by the app:"
            f" {metric_sum(text, 'story_dependency_errors_total', dependency='redis'):g};"
            f" breaker store fallbacks: {metric_sum(text, 'story_breaker_store_fallbacks_total'):g}"
        )


# --- 2. the Redis budget under CPU load ------------------------------------------------------


async def blocked_loop_judges(redis_url: str, calls: int, block_ms: float) -> None:
    """The same Redis call judged as before (plain wall clock) and now, on a blocked loop."""
    from app.platform.redis import RedisBudget, RedisGate, open_redis

    def client(allowance: float) -> aioredis.Redis:
        return open_redis(redis_url, timeout_seconds=0.05, connect_timeout_seconds=1.0,
                          max_connections=8, lag_allowance_seconds=allowance)  # fmt: skip

    stop = asyncio.Event()

    async def hog() -> None:  # a CPU-bound request handler, as the loop sees it
        while not stop.is_set():
            time.sleep(block_ms / 1000)  # noqa: ASYNC251 - the point: a blocked loop
            await asyncio.sleep(0)

    async def local() -> bool:
        return False

    print(f"in-process, loop blocked {block_ms:g} ms at a time, {calls} calls, budget 50 ms:")
    for label, allowance in (("before: wall-clock budget", 0.0), ("now: loop-fair budget", 1.0)):
        redis = client(allowance)
        script = redis.register_script("return redis.call('PING')")
        budget = RedisBudget(
            budget_seconds=0.05,
            retry_seconds=0.0,
            gate=RedisGate(0.0, lag_allowance_seconds=allowance),
        )
        await redis.ping()
        stop.clear()
        task = asyncio.ensure_future(hog())
        failures = 0
        try:
            for _ in range(calls):
                # Four concurrent calls, as a request's parts make them.
                call = functools.partial(script, keys=["k"])
                results = await asyncio.gather(*(budget.run(call, local) for _ in range(4)))
                failures += sum(1 for _, from_redis in results if not from_redis)
        finally:
            stop.set()
            await task
            await redis.aclose()
        print(f"  {label:<28} Redis judged failed in {failures} of {4 * calls} calls")


async def saturate(
    args: argparse.Namespace, fake: FakeOpenAI, workdir: Path, redis_url: str, allowance: str
) -> None:
    env = app_env(
        fake,
        workdir,
        REDIS_URL=redis_url,
        MODERATION_MODE="openai",
        REDIS_LOOP_LAG_ALLOWANCE_MS=allowance,
    )
    logs: list[str] = []
    with app_server(env, logs=logs) as url:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            stories = f"{url}/v1/stories"
            await closed_loop(session, "warm-up", "POST", stories, concurrency=8,
                              seconds=2, body=True)  # fmt: skip
            async with session.get(f"{url}/metrics") as response:
                before = await response.text()
            label = "wall clock" if allowance == "0" else f"loop-fair, allowance {allowance} ms"
            load, _ = await closed_loop(
                session, f"{label}: POST /v1/stories, {args.saturate} callers", "POST",
                stories, concurrency=args.saturate, seconds=args.seconds, body=True,
            )  # fmt: skip
            async with session.get(f"{url}/metrics") as response:
                after = await response.text()
    print(load.row())
    for name, labels in (
        ("story_breaker_store_fallbacks_total", {}),
        ("story_rate_limit_storage_fallbacks_total", {}),
        ("story_dependency_errors_total", {"dependency": "redis"}),
    ):
        delta = metric_sum(after, name, **labels) - metric_sum(before, name, **labels)
        print(f"    {name}{labels or ''}: +{delta:g}")
    for cause, count in warnings_by_cause(logs).most_common(6):
        print(f"    log: {count} x {cause}")


async def bench_budget(args: argparse.Namespace, fake: FakeOpenAI, workdir: Path) -> None:
    print("\n== Redis budget under CPU load: shared breaker state while one worker saturates ==")
    with private_redis() as redis_url:
        print(header())
        for allowance in args.allowances.split(","):
            await saturate(args, fake, workdir, redis_url, allowance)
        await blocked_loop_judges(redis_url, args.blocked_calls, args.block_ms)


# --- 3. SQLite against PostgreSQL ------------------------------------------------------------


async def db_rows(
    args: argparse.Namespace, session: aiohttp.ClientSession, url: str, label: str
) -> tuple[list[Result], list[float]]:
    """The three loads' results, and the server's CPU ms per request in each."""
    stories = f"{url}/v1/stories"
    common = {"concurrency": args.concurrency, "seconds": args.seconds}
    pid = SERVER_PIDS[url]
    await closed_loop(session, "warm-up", "POST", stories, concurrency=8, seconds=2, body=True)
    async with session.get(f"{stories}?limit=1") as response:
        story_id = (await response.json())["items"][0]["id"]
    loads = (
        (f"{label}: POST /v1/stories", "POST", stories, True),
        (f"{label}: GET /v1/stories?limit=10", "GET", f"{stories}?limit=10", False),
        (f"{label}: GET /v1/stories/{{id}}", "GET", f"{stories}/{story_id}", False),
    )
    results: list[Result] = []
    cpu_ms: list[float] = []
    for name, method, target, body in loads:
        before = cpu_seconds(pid)
        result, _ = await closed_loop(session, name, method, target, body=body, **common)
        cpu_ms.append((cpu_seconds(pid) - before) * 1000 / max(1, result.requests))
        results.append(result)
    return results, cpu_ms


async def bench_sqlite(args: argparse.Namespace, fake: FakeOpenAI, workdir: Path) -> None:
    print("\n== SQLite path: the same load on the embedded store and on PostgreSQL ==")
    base, _, _ = args.postgres_url.rpartition("/")
    name = f"bench_sqlite_{os.getpid()}"
    admin = await asyncpg.connect(args.postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    rows: dict[str, list[Result]] = {"sqlite": [], "postgres": []}
    cpu: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    envs = {
        "sqlite": app_env(fake, workdir),
        "postgres": app_env(fake, workdir, DATABASE_URL=f"{base}/{name}"),
    }
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for round_ in range(args.rounds):
                # Alternate which goes first: the machine's load drifts during a run.
                order = ("sqlite", "postgres") if round_ % 2 == 0 else ("postgres", "sqlite")
                for backend in order:
                    env = {**envs[backend]}
                    if backend == "sqlite":  # a fresh file each round
                        env["DATABASE_SQLITE_PATH"] = str(workdir / f"{uuid.uuid4().hex}.sqlite3")
                    profile = args.profile_out if args.profile and backend == "sqlite" else None
                    with app_server(env, profile_to=profile) as url:
                        results, cpu_ms = await db_rows(args, session, url, backend)
                    rows[backend] += results
                    cpu[backend] += cpu_ms
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(header())
    for backend_rows in rows.values():
        for row in backend_rows:
            print(row.row())
    for i, what in enumerate(("POST", "GET list", "GET one")):
        rate = {
            backend: sum(r.requests for r in got[i::3]) / sum(r.seconds for r in got[i::3])
            for backend, got in rows.items()
        }
        ratio = rate["sqlite"] / max(1e-9, rate["postgres"])
        mean_cpu = {backend: sum(got[i::3]) / len(got[i::3]) for backend, got in cpu.items()}
        print(
            f"sqlite / postgres throughput, {what} (all rounds): {ratio:.2f};"
            f" app server CPU ms per request: sqlite {mean_cpu['sqlite']:.2f},"
            f" postgres {mean_cpu['postgres']:.2f} (PostgreSQL's own CPU not counted)"
        )
    if args.profile:
        print(f"cProfile of the SQLite server: {args.profile_out} (python -m pstats)")


def story_record() -> StoryRecord:
    return StoryRecord(
        id=uuid.uuid4(), owner="bench", title="t", paragraphs=("a", "b"), prompt="p", age=6,
        length="short", language="en", provider="offline", model="m", degraded=False,
        illustration_url=None, prompt_tokens=1, completion_tokens=2, generation_ms=3,
        created_at=datetime.now(UTC), illustrate=False, moderated_locally=None,
    )  # fmt: skip


async def repository_ops(module: Any, label: str, busy: int, workdir: Path, n: int) -> None:
    """Sequential add / get / list_page latency of one SQLite repository module, with
    `busy` tasks taking 2 ms of CPU per turn of the loop (as request handlers do)."""
    repo = await module.SqliteStoryRepository.open(workdir / f"{uuid.uuid4().hex}.sqlite3")
    await repo.migrate()
    stop = asyncio.Event()

    async def hog() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            while time.perf_counter() - started < 0.002:
                pass
            await asyncio.sleep(0)

    hogs = [asyncio.ensure_future(hog()) for _ in range(busy)]
    figures = []
    try:
        records = [story_record() for _ in range(n)]
        ops: list[Callable[[StoryRecord], Awaitable[object]]] = [
            lambda r: repo.add(r),
            lambda r: repo.get(r.id, "bench"),
            lambda r: repo.list_page("bench", 10),
        ]
        for op in ops:
            started = time.perf_counter()
            for record in records:
                await op(record)
            figures.append((time.perf_counter() - started) / n * 1000)
    finally:
        stop.set()
        await asyncio.gather(*hogs)
        await repo.close()
    add, get, page = figures
    print(f"  {label:<34} {busy} busy tasks: add {add:6.2f}  get {get:6.2f}  list {page:6.2f} ms")


async def bench_sqlite_ops(args: argparse.Namespace, fake: FakeOpenAI, workdir: Path) -> None:
    print("\n== SQLite repository, in this process: ms per operation, idle and busy loop ==")
    import app.db.sqlite as current

    modules: list[tuple[str, Any]] = [("now", current)]
    if args.baseline_sqlite:  # the module before a change (same repository.py, migrations)
        spec = importlib.util.spec_from_file_location("baseline_sqlite", args.baseline_sqlite)
        assert spec is not None
        assert spec.loader is not None
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        modules.insert(0, (f"baseline {Path(args.baseline_sqlite).name}", baseline))
    for busy in (0, 4):
        for _ in range(2):  # interleaved: the machine's load drifts
            for label, module in modules:
                await repository_ops(module, label, busy, workdir, args.ops)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", action="append", choices=["metrics", "budget", "sqlite", "sqlite-ops"]
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--scrapers", type=int, default=16)
    parser.add_argument("--saturate", type=int, default=100, help="callers in `budget`")
    parser.add_argument("--upstream-delay-ms", type=float, default=5.0)
    parser.add_argument("--blocked-calls", type=int, default=200)
    parser.add_argument(
        "--allowances", default="0,1000", help="`budget`: REDIS_LOOP_LAG_ALLOWANCE_MS values"
    )
    parser.add_argument("--block-ms", type=float, default=80.0)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--rounds", type=int, default=2, help="`sqlite`: rounds of both")
    parser.add_argument("--ops", type=int, default=200, help="`sqlite-ops`: per operation")
    parser.add_argument("--baseline-sqlite", help="`sqlite-ops`: an older app/db/sqlite.py")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--profile-out", default=str(Path(tempfile.gettempdir()) / "bench_sqlite.prof")
    )
    args = parser.parse_args(argv)
    parts = args.only or ["metrics", "budget", "sqlite", "sqlite-ops"]
    load1, load5, _ = os.getloadavg()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    machine += f", {platform.system()} {platform.release()}"
    print(f"machine: {machine}, load {load1:.2f}/{load5:.2f}, Python {platform.python_version()}")
    print(f"parameters: {vars(args)}")
    fake = FakeOpenAI()
    with fake, tempfile.TemporaryDirectory() as tmp:
        if args.upstream_delay_ms > 0:
            fake.set_fault(Fault.delay(args.upstream_delay_ms / 1000), path=COMPLETIONS)
        for part in parts:
            run = {
                "metrics": bench_metrics,
                "budget": bench_budget,
                "sqlite": bench_sqlite,
                "sqlite-ops": bench_sqlite_ops,
            }[part]
            await run(args, fake, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
