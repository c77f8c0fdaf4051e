"""Benchmark: what the health endpoints cost, and whether a slow Redis slows unrelated requests.

Prints, measured in the same run on this machine (loopback only):

1. throughput and latency percentiles of a bare FastAPI endpoint (the floor),
   `/health/live` and `/health` of the real service (uvicorn, one worker, Redis
   configured, embedded database), and a rate-limited API read (`GET /v1/stories`);
2. the p99 of `/health/live` while other clients hammer the rate-limited API,
   first with Redis answering normally, then with Redis answering slowly (a fault
   proxy adding latency to every Redis round trip). With a limiter that blocked
   the event loop on Redis, the second p99 would be the Redis delay or worse.

Bounded: each phase stops after `--requests` requests or `--seconds` seconds. Every
process it starts is stopped by its process id. Redis at `--redis` (default
127.0.0.1:6379, db 15) is used if it answers; otherwise the Redis phases are skipped.

    python bench/bench_health.py [--requests 4000] [--concurrency 32] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from fastapi import FastAPI, Request
from slowapi import Limiter
from slowapi.util import get_remote_address

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.fault_proxy import FaultProxy  # noqa: E402  (needs ROOT on the path)
from tests.support import free_port, server_process  # noqa: E402

bare_app = FastAPI()


@bare_app.get("/bare")
async def bare() -> dict[str, str]:
    return {"status": "pass"}


# For comparison only: slowapi as documented (its own synchronous storage), which the
# service does not use. BENCH_SLOWAPI_STORAGE is set in the child process that serves it.
stock_limiter = Limiter(
    key_func=get_remote_address,
    storage_uri=os.environ.get("BENCH_SLOWAPI_STORAGE", "memory://"),
)
stock_slowapi_app = FastAPI()
stock_slowapi_app.state.limiter = stock_limiter


@stock_slowapi_app.get("/limited")
@stock_limiter.limit("100000000/minute")
async def stock_limited(request: Request) -> dict[str, str]:
    return {"status": "pass"}


@stock_slowapi_app.get("/bare")
async def stock_live() -> dict[str, str]:
    return {"status": "pass"}


# --- processes ---------------------------------------------------------------------------


def redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# --- load ----------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def row(self) -> str:
        rate = self.requests / self.seconds if self.seconds else 0.0
        return (
            f"{self.name:<44} {rate:>9.0f} {self.percentile(50):>8.2f} "
            f"{self.percentile(99):>8.2f} {self.errors:>7}"
        )


async def load(
    session: aiohttp.ClientSession,
    name: str,
    url: str,
    *,
    requests: int,
    concurrency: int,
    seconds: float,
) -> Result:
    """`concurrency` clients GET `url` until `requests` are done or `seconds` pass."""
    latencies: list[float] = []
    errors = 0
    remaining = requests
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal remaining, errors
        while remaining > 0 and time.perf_counter() < stop_at:
            remaining -= 1
            started = time.perf_counter()
            try:
                async with session.get(url) as response:
                    await response.read()
                    if response.status >= 500:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Result(name, len(latencies), time.perf_counter() - started, latencies, errors)


async def under_background_load(
    session: aiohttp.ClientSession,
    name: str,
    probe_url: str,
    background_url: str,
    *,
    requests: int,
    concurrency: int,
    seconds: float,
) -> Result:
    """Measure `probe_url` with a few clients while the others load `background_url`."""
    background = asyncio.ensure_future(
        load(
            session,
            "background",
            background_url,
            requests=requests * 4,
            concurrency=max(1, concurrency - 4),
            seconds=seconds,
        )
    )
    await asyncio.sleep(0.2)  # let the background load build up
    probe = await load(session, name, probe_url, requests=requests, concurrency=4, seconds=seconds)
    await background
    return probe


async def run(args: argparse.Namespace) -> None:
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "REPLICATE_", "DATABASE_", "REDIS_", "RATE_LIMIT_"))
    }
    base_env.update(
        {
            "LOG_LEVEL": "WARNING",
            "RATE_LIMIT_DEFAULT": "100000000/minute",
            "RATE_LIMIT_PER_CLIENT": "100000000/minute",
        }
    )
    redis_host, redis_port = args.redis.rsplit(":", 1)
    use_redis = redis_answers(redis_host, int(redis_port))
    proxy = FaultProxy(redis_host, int(redis_port), latency_ms=args.redis_latency_ms)
    results: list[Result] = []
    workdir = tempfile.TemporaryDirectory()
    bare_port, app_port = free_port(), free_port()
    bare_cmd = [
        "-m", "uvicorn", "bench_health:bare_app", "--app-dir", "bench",
        "--host", "127.0.0.1", "--port", str(bare_port), "--no-access-log",
        "--log-level", "warning",
    ]  # fmt: skip
    app_env = {
        **base_env,
        "HOST": "127.0.0.1",
        "PORT": str(app_port),
        "DATABASE_SQLITE_PATH": str(Path(workdir.name) / "bench.sqlite3"),
        # A budget far above the injected delay: the limiter really waits on the slow
        # Redis (instead of falling back to in-process counting) in the slow phase.
        "RATE_LIMIT_REDIS_BUDGET_MS": "2000",
        "REDIS_SOCKET_TIMEOUT_MS": "2000",
    }
    if use_redis:
        proxy.start()
        app_env["REDIS_URL"] = proxy.url_for(path="/15")
    try:
        with (
            server_process(bare_cmd, base_env, port=bare_port, ready_paths=("/bare",)) as bare,
            server_process(["-m", "app"], app_env, port=app_port) as app,
        ):
            bare_url, app_url = bare.url, app.url
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:
                common = {
                    "requests": args.requests,
                    "concurrency": args.concurrency,
                    "seconds": args.seconds,
                }
                # Warm up both servers (imports, pools, first samples).
                await load(session, "warm-up", f"{bare_url}/bare", **{**common, "requests": 200})
                await load(session, "warm-up", f"{app_url}/health", **{**common, "requests": 200})
                results.append(
                    await load(session, "bare FastAPI GET", f"{bare_url}/bare", **common)
                )
                results.append(
                    await load(session, "/health/live", f"{app_url}/health/live", **common)
                )
                results.append(await load(session, "/health", f"{app_url}/health", **common))
                api = f"{app_url}/v1/stories?limit=1"
                results.append(await load(session, "GET /v1/stories (rate-limited)", api, **common))
                if use_redis:
                    probe = {**common, "requests": max(200, args.requests // 4)}
                    live = f"{app_url}/health/live"
                    results.append(
                        await under_background_load(
                            session, "/health/live, API load, Redis normal", live, api, **probe
                        )
                    )
                    proxy.set_mode("latency")
                    name = f"/health/live, API load, Redis +{args.redis_latency_ms:g} ms"
                    results.append(await under_background_load(session, name, live, api, **probe))
                    slow_api = await load(
                        session, f"GET /v1/stories, Redis +{args.redis_latency_ms:g} ms", api,
                        **{**common, "requests": max(200, args.requests // 4)},
                    )  # fmt: skip
                    results.append(slow_api)
                    proxy.set_mode("pass")
        if use_redis:
            results += await stock_slowapi_rows(args, base_env, proxy)
    finally:
        proxy.stop()
        workdir.cleanup()

    print(
        f"\n{args.concurrency} concurrent clients, up to {args.requests} requests or "
        f"{args.seconds:g} s per row; client and servers share this machine's cores.\n"
    )
    print(f"{'endpoint':<44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for result in results:
        print(result.row())
    if not use_redis:
        print(f"\nRedis at {args.redis} did not answer: Redis phases skipped.")
    print(
        "\nThe fault proxy delays each chunk each way, so one Redis round trip costs about "
        f"{2 * args.redis_latency_ms:g} ms in the slow phase (the limiter's budget is "
        "RATE_LIMIT_REDIS_BUDGET_MS, 50 ms by default)."
    )


async def stock_slowapi_rows(
    args: argparse.Namespace, base_env: dict[str, str], proxy: FaultProxy
) -> list[Result]:
    """The same slow-Redis measurement against stock slowapi (synchronous Redis calls)."""
    port = free_port()
    command = [
        "-m", "uvicorn", "bench_health:stock_slowapi_app", "--app-dir", "bench",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    env = {**base_env, "BENCH_SLOWAPI_STORAGE": proxy.url_for(path="/15")}
    rows = []
    with server_process(command, env, port=port, ready_paths=("/bare",)) as stock:
        url = stock.url
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            probe = {
                "requests": max(200, args.requests // 4),
                "concurrency": args.concurrency,
                "seconds": args.seconds,
            }
            limited, live = f"{url}/limited", f"{url}/bare"
            rows.append(
                await under_background_load(
                    session, "stock slowapi: GET, load, Redis normal", live, limited, **probe
                )
            )
            proxy.set_mode("latency")
            name = f"stock slowapi: GET, load, Redis +{args.redis_latency_ms:g} ms"
            rows.append(await under_background_load(session, name, live, limited, **probe))
            proxy.set_mode("pass")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--redis", default="127.0.0.1:6379")
    parser.add_argument("--redis-latency-ms", type=float, default=15.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
