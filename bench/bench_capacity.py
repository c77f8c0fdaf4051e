"""Benchmark: capacity at real upstream latency (issue 10). Does a healthy upstream
serve the stories, or does load turn into fallbacks?

For each upstream latency (`--latencies`, default 0.02, 2 and 8 s) and number of
closed-loop callers (`--callers`, default 50, 200 and 1000), each caller sending
story requests with distinct prompts for `--seconds` (per latency; then the
requests in flight get up to 40 s to finish, and are cancelled after), it prints:

- stories per second by provider and `degraded`, over the steady window (from
  two round trips of the upstream in, or half the run, to the end of sending);
- p50 / p99 of the client-measured latency of every answered request;
- the app's peak RSS (psutil, sampled every 0.5 s);
- the share of answers that came from the healthy upstream (`openai`, not
  degraded), and its rate against the ideal `callers / latency`;

for the service (`python -m app`, one uvicorn worker, defaults but the rate limits,
Redis and PostgreSQL when they answer, else embedded SQLite) and for the same
numbers through a bare FastAPI endpoint calling the same OpenAI SDK client
(`app.providers.openai.openai_client`, no guards): the baseline.

Then the memory of requests in flight: the service against an upstream answering
in `--memory-delay` seconds (90; the request deadline 2.5 times that and the
SDK's read timeout twice, so that what is measured is memory, not how long a
busy machine takes to accept 1000 requests), with `OPENAI_MAX_CONCURRENCY` and
the initial limit at 1000 so every request is really out at the upstream; 250,
then 500, then 1000 requests at once; the RSS at 0, 250, 500 and 1000 in flight
(once the app holds that many client connections and has that many calls out at
the upstream, counted with psutil), and how all of them were answered.

The fake OpenAI server (`tests/fakes/openai_fake.py`, the delay fault on
completions; moderations answer at once) runs in a process of its own, the app
in another, the load here: three processes on the same cores. Every process is
stopped by its process id. Redis at `--redis-url` (db 11 by default) is FLUSHED
before each run. PostgreSQL: a scratch database created through
`--database-url` (default `POSTGRES_TEST_URL`) and dropped at the end.

    python -m bench.bench_capacity --quick   # 2 s x 200 callers and 0.02 s x 50, ~2 min
    python -m bench.bench_capacity           # the full table and the memory run, ~15 min
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import psutil
from fastapi import FastAPI
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.platform.config import OpenAISettings  # noqa: E402
from app.providers.base import StoryRequest  # noqa: E402
from app.providers.openai import openai_client  # noqa: E402
from app.providers.prompting import system_prompt, user_prompt  # noqa: E402
from bench.scratch import create_database, drop_database  # noqa: E402
from tests.support import free_port, server_process, stop  # noqa: E402

COMPLETIONS = "/v1/chat/completions"
DRAIN_SECONDS = 40.0

# --- the baseline: a bare endpoint calling the same SDK ------------------------------


@asynccontextmanager
async def _bare_lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = OpenAISettings(
        _env_file=None,
        api_key=SecretStr("sk-bench"),
        base_url=os.environ.get("BENCH_OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
        max_concurrency=10_000,
        max_connections=10_000,
    )
    app.state.client = openai_client(settings)
    yield
    await app.state.client.close()


bare_app = FastAPI(lifespan=_bare_lifespan)


@bare_app.get("/bare")
async def bare_live() -> dict[str, str]:
    return {"status": "pass"}


@bare_app.post("/bare")
async def bare_story(body: dict[str, object]) -> dict[str, object]:
    request = StoryRequest(str(body["prompt"]), int(str(body["age"])), "short", "en")
    completion = await bare_app.state.client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": system_prompt(request)},
            {"role": "user", "content": user_prompt(request)},
        ],
    )
    return {"provider": "openai", "degraded": False, "id": completion.id}


# --- the fake upstream, in a process of its own ---------------------------------------


# Imports only the fake (not the app and its SDKs): it starts in a second on a busy machine.
FAKE_SCRIPT = """
import signal, sys, threading
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
fake = FakeOpenAI(port=int(sys.argv[1]))
fake.start()
if float(sys.argv[2]) > 0:
    fake.set_fault(Fault.delay(float(sys.argv[2])), path="/v1/chat/completions")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
while not stop.wait(0.2):
    pass
fake.stop()
"""


@contextlib.contextmanager
def fake_process(delay: float) -> Iterator[str]:
    """The fake OpenAI in a process of its own, completions delayed by `delay` s.
    (Ready when its port accepts: every path it serves wants a bearer token.)"""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-c", FAKE_SCRIPT, str(port), str(delay)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            for _ in range(1200):
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"fake OpenAI exited: {log.read().decode()}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                    break
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            stop(process)


# --- load ----------------------------------------------------------------------------


@dataclass
class Answer:
    started: float
    ended: float
    status: int
    provider: str
    degraded: bool


@dataclass
class Run:
    target: str
    latency: float
    callers: int
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_seconds: float = 0.0
    warnings: str = ""
    admission: str = ""
    cancelled: int = 0
    peak_rss: int = 0

    def window(self) -> tuple[float, float]:
        return min(2 * self.latency, self.seconds / 2), self.seconds

    def rates(self) -> Counter[str]:
        start, end = self.window()
        counts: Counter[str] = Counter()
        for answer in self.answers:
            if start <= answer.ended <= end and answer.status == 201:
                key = f"{answer.provider}{'*' if answer.degraded else ''}"
                counts[key] += 1
        return Counter({key: round(n / (end - start), 1) for key, n in counts.items()})

    def healthy_share(self) -> float:
        total = len(self.answers) + sum(self.errors.values())
        healthy = sum(1 for a in self.answers if a.provider == "openai" and not a.degraded)
        return healthy / total if total else 0.0

    def percentile(self, p: float) -> float:
        times = sorted(a.ended - a.started for a in self.answers)
        return times[min(len(times) - 1, int(p / 100 * len(times)))] if times else float("nan")

    def row(self) -> str:
        rates = self.rates()
        healthy = rates.get("openai", 0.0)
        ideal = self.callers / self.latency
        by_provider = ", ".join(f"{k} {v:g}" for k, v in sorted(rates.items())) or "-"
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "0"
        cpu_ms = 1000 * self.cpu_seconds / max(1, len(self.answers))
        return (
            f"| {self.target} | {self.latency:g} | {self.callers} | {by_provider} | "
            f"{self.percentile(50):.2f} | {self.percentile(99):.2f} | "
            f"{self.peak_rss / 2**20:.0f} | {self.healthy_share():.1%} | "
            f"{healthy / ideal:.2f}x | {cpu_ms:.1f} | {errors} |"
        )


HEADER = (
    "| target | upstream s | callers | stories/s by provider (* degraded) | p50 s | p99 s "
    "| peak RSS MiB | healthy share | healthy / (callers/latency) | server CPU ms/story "
    "| errors |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def story_body(caller: int, number: int) -> dict[str, object]:
    return {
        "prompt": f"a lighthouse keeper's cat, caller {caller} story {number}",
        "age": 2 + (caller + number) % 11,
        "length": "short",
        "language": "en",
        "illustrate": False,
    }


async def closed_loop(session: aiohttp.ClientSession, url: str, run: Run, pid: int | None) -> None:
    began = time.perf_counter()
    stop_at = began + run.seconds

    async def caller(index: int) -> None:
        number = 0
        while time.perf_counter() < stop_at:
            number += 1
            started = time.perf_counter()
            try:
                async with session.post(url, json=story_body(index, number)) as response:
                    body = await response.json(content_type=None)
                    status = response.status
            except (aiohttp.ClientError, ValueError) as error:
                run.errors[type(error).__name__] += 1
                continue
            ended = time.perf_counter()
            if status != (200 if url.endswith("/bare") else 201):
                run.errors[str(status)] += 1
                continue
            provider = str(body.get("provider", "?")) if isinstance(body, dict) else "?"
            degraded = bool(body.get("degraded")) if isinstance(body, dict) else True
            run.answers.append(Answer(started - began, ended - began, 201, provider, degraded))

    async def sample_rss() -> None:
        while pid is not None:
            with contextlib.suppress(psutil.Error):
                run.peak_rss = max(run.peak_rss, psutil.Process(pid).memory_info().rss)
            await asyncio.sleep(0.5)

    cpu_before = cpu_of(pid)
    sampler = asyncio.create_task(sample_rss())
    tasks = [asyncio.create_task(caller(i)) for i in range(run.callers)]
    _, pending = await asyncio.wait(tasks, timeout=run.seconds + DRAIN_SECONDS)
    for task in pending:
        task.cancel()
    run.cancelled = len(pending)
    await asyncio.gather(*pending, return_exceptions=True)
    sampler.cancel()
    run.cpu_seconds = cpu_of(pid) - cpu_before


def cpu_of(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far."""
    if pid is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    return 0.0


# --- servers ---------------------------------------------------------------------------


def app_env(params: argparse.Namespace, openai_url: str, **extra: str) -> dict[str, str]:
    env = {
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "WARNING",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": openai_url,
        "RATE_LIMIT_CREATE_STORY": "100000000/minute",
        "RATE_LIMIT_DEFAULT": "100000000/minute",
        "RATE_LIMIT_PER_CLIENT": "100000000/minute",
        "DATABASE_SQLITE_PATH": str(Path(params.tmp) / f"bench-{secrets.token_hex(3)}.sqlite3"),
    }
    if params.redis_url:
        env["REDIS_URL"] = params.redis_url
    if params.scratch_url:
        env["DATABASE_URL"] = params.scratch_url
    env.update(extra)
    env.update(item.split("=", 1) for item in params.env)
    return env


async def flush_redis(url: str | None) -> None:
    if not url:
        return
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_timeout=5)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


async def measure(
    params: argparse.Namespace, target: str, latency: float, callers: int, openai_url: str
) -> Run:
    await flush_redis(params.redis_url)
    port = free_port()
    run = Run(target, latency, callers, params.seconds_for(latency))
    if target == "service":
        args, path, ready = ["-m", "app"], "/v1/stories", "/health/live"
        env = app_env(params, openai_url, HOST="127.0.0.1", PORT=str(port))
    else:
        args = ["-m", "uvicorn", "bench.bench_capacity:bare_app", "--host", "127.0.0.1"]
        args += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
        env, path, ready = {"BENCH_OPENAI_BASE_URL": openai_url}, "/bare", "/bare"
    with server_process(args, env, port=port, ready_paths=(ready,), ready_within=120) as server:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=DRAIN_SECONDS + 30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            url = server.url + path
            async with session.post(url, json=story_body(-1, 0)) as warm:
                await warm.read()
            await closed_loop(session, url, run, server.process.pid)
            if target == "service":
                run.admission = await admission_state(session, server.url)
        run.warnings = warnings_of(server.output())
    print(run.row(), flush=True)
    if run.admission:
        print(f"  (after the run: {run.admission}; app warnings: {run.warnings})", flush=True)
    return run


ADMISSION = re.compile(
    r"^(story_admission_limit|story_admission_shed_total|story_quota_refusals_total)"
    r"\{([^}]*openai:chat[^}]*)\} ([0-9.e+]+)$",
    re.M,
)


async def admission_state(session: aiohttp.ClientSession, url: str) -> str:
    """The openai:chat limit and sheds by reason, from the app's /metrics."""
    try:
        async with session.get(url + "/metrics") as response:
            text = await response.text()
    except aiohttp.ClientError as error:
        return f"/metrics failed: {error!r}"
    found = [
        f"{name}{{{labels}}} {float(value):g}" for name, labels, value in ADMISSION.findall(text)
    ]
    return "; ".join(found) or "no admission metrics"


# --- memory in flight ---------------------------------------------------------------------


def warnings_of(output: str) -> str:
    """The app's warning and error log lines, counted by message (start of it)."""
    counts: Counter[str] = Counter()
    for line in output.splitlines():
        if '"level": "warning"' in line or '"level": "error"' in line:
            match = re.search(r'"message": "([^"]{0,60})', line)
            error = re.search(r'"error": "([^"]{0,50})', line)
            key = match.group(1) if match else line[:60]
            counts[f"{key} ({error.group(1)})" if error else key] += 1
    return "; ".join(f"{n} x {message}" for message, n in counts.most_common(6)) or "none"


def connections(process: psutil.Process, port: int, *, local: bool) -> int:
    """The process's established TCP connections on `port` (its own, or the peer's)."""
    found = 0
    with contextlib.suppress(psutil.Error):
        for conn in process.net_connections(kind="tcp"):
            address = conn.laddr if local else conn.raddr
            if conn.status == psutil.CONN_ESTABLISHED and address and address.port == port:
                found += 1
    return found


async def memory_run(params: argparse.Namespace) -> None:
    delay = params.memory_delay
    print(f"\n## Memory in flight (upstream answers in {delay:g} s)\n", flush=True)
    await flush_redis(params.redis_url)
    with fake_process(delay) as openai_url:
        port = free_port()
        extra = {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "OPENAI_MAX_CONCURRENCY": "1000",
            "RESILIENCE_CONCURRENCY_INITIAL": "1000",
            "REQUEST_DEADLINE_SECONDS": f"{2.5 * delay:g}",
            "OPENAI_READ_TIMEOUT_SECONDS": f"{2 * delay:g}",
        }
        env = app_env(params, openai_url, **extra)
        with server_process(["-m", "app"], env, port=port, ready_within=120) as server:
            process = psutil.Process(server.process.pid)
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=3 * delay + 60)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                url = server.url + "/v1/stories"
                upstream_port = int(urlsplit(openai_url).port or 0)
                rows = [(0, 0, 0, process.memory_info().rss)]
                tasks: list[asyncio.Task[tuple[int, str]]] = []

                async def one(n: int) -> tuple[int, str]:
                    try:
                        async with session.post(url, json=story_body(n, 0)) as response:
                            body = await response.json(content_type=None)
                            degraded = "*" if body.get("degraded") else ""
                            what = body.get("provider") or body.get("title")
                            return response.status, f"{what}{degraded}"
                    except (aiohttp.ClientError, ValueError) as error:
                        return 0, type(error).__name__

                for target in (250, 500, 1000):
                    tasks += [asyncio.create_task(one(n)) for n in range(len(tasks), target)]
                    held = upstream = 0
                    give_up = time.monotonic() + delay / 2
                    while time.monotonic() < give_up:  # until it holds them all, sent on
                        await asyncio.sleep(0.5)
                        held = connections(process, port, local=True)
                        upstream = connections(process, upstream_port, local=False)
                        if held >= target and upstream >= target:
                            break  # (upstream: story calls and moderation checks)
                    rows.append((target, held, upstream, process.memory_info().rss))
                answers = await asyncio.gather(*tasks)
            log = warnings_of(server.output())
    print(
        "| requests sent | client connections held | connections to the upstream | RSS MiB "
        "| RSS over idle, KiB per request |\n|---|---|---|---|---|"
    )
    idle = rows[0][3]
    for sent, held, upstream, rss in rows:
        per = f"{(rss - idle) / sent / 1024:.0f}" if sent else "-"
        print(f"| {sent} | {held} | {upstream} | {rss / 2**20:.0f} | {per} |")
    statuses = Counter(f"{status} {provider}" for status, provider in answers)
    print(f"\nanswers: {dict(statuses)}\napp warnings: {log}", flush=True)


# --- main -------------------------------------------------------------------------------


async def scratch_database(admin_url: str) -> tuple[str, str] | None:
    try:
        return await create_database(admin_url, "bench_capacity")
    except (OSError, asyncpg.PostgresError) as error:
        print(f"PostgreSQL not reachable ({error!r}): embedded SQLite instead")
        return None


def redis_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


async def main(params: argparse.Namespace) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load}, {platform.platform()}, "
        f"Python {platform.python_version()}"
    )
    if not redis_answers(params.redis_url):
        print(f"Redis not reachable at {params.redis_url}: running without Redis")
        params.redis_url = None
    scratch = await scratch_database(params.database_url) if params.database_url else None
    params.scratch_url = scratch[1] if scratch else None
    print(
        f"service: python -m app, 1 worker, Redis {params.redis_url or 'none'}, "
        f"{'PostgreSQL (scratch database)' if scratch else 'SQLite'}; "
        f"window: from min(2 x latency, half the run) to the end of sending"
    )
    try:
        if not params.memory_only:
            print("\n## Capacity\n")
            print(HEADER, flush=True)
            targets = ("service",) if params.no_baseline else ("service", "bare SDK")
            for latency in dict.fromkeys(latency for latency, _ in params.pairs):
                with fake_process(latency) as openai_url:
                    for callers in (n for lat, n in params.pairs if lat == latency):
                        for target in targets:
                            await measure(params, target, latency, callers, openai_url)
        if not params.quick and not params.no_memory:
            await memory_run(params)
    finally:
        if scratch:
            await drop_database(params.database_url, scratch[0])


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s x 200 and 0.02 s x 50 only")
    parser.add_argument("--latencies", default="0.02,2,8", help="upstream latencies, seconds")
    parser.add_argument("--callers", default="50,200,1000", help="closed-loop callers")
    parser.add_argument("--seconds", type=float, help="sending time per run (default by latency)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11", help="FLUSHED")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL to create (and drop) a scratch database through; '' for SQLite",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a setting of the app"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare SDK runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory run")
    parser.add_argument("--memory-only", action="store_true", help="only the memory run")
    parser.add_argument("--memory-delay", type=float, default=90.0, help="seconds")
    params = parser.parse_args(argv)
    latencies = [float(x) for x in params.latencies.split(",")]
    callers = [int(x) for x in params.callers.split(",")]
    params.pairs = [(latency, n) for latency in latencies for n in callers]
    if params.quick:
        params.pairs = [(2.0, 200), (0.02, 50)]
    fixed, quick = params.seconds, params.quick

    def seconds_for(latency: float) -> float:
        if fixed:
            return float(fixed)
        if latency < 1:
            return 8.0 if quick else 15.0
        return 16.0 if quick or latency < 5 else 40.0

    params.seconds_for = seconds_for
    params.tmp = tempfile.gettempdir()
    return params


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
