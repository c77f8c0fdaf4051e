"""Benchmark: what an in-flight or orphaned Idempotency-Key costs (PostgreSQL).

Prints, for the code importable from the current directory (so the same file,
copied into an older checkout and run there, measures that checkout):

1. **Burst.** `--duplicates` requests with the same Idempotency-Key and body at
   once against the real app (served in-process over ASGI, PostgreSQL at
   `--database-url`), the fake OpenAI answering after `--upstream-delay`
   seconds; then one request alone, for comparison. For each: the statuses,
   the upstream calls, and the database transactions the app ran over its whole
   life (start, requests, stop): `xact_commit + xact_rollback` of the app's
   database in `pg_stat_database`, read from a connection to the `postgres`
   database before the app starts and after its last connection has closed
   (a backend flushes its counts when it exits). The difference between the
   two is what the waiting duplicates cost.
2. **Killed worker.** `python -m app` (a real server process) on the same
   database; a request with a key; the server's process group SIGKILLed while
   the upstream is answering (`--kill-delay`); a freshly started process; the
   client retries with the same key, honouring `Retry-After` on 409, until 201
   or `--retry-for` seconds. Prints how long the story took after the kill,
   each attempt's status and duration, and the upstream calls the retries made.

Bounded: the burst ends with the app's own wait (`IDEMPOTENCY_WAIT_SECONDS`) or
the upstream's delay; the retries stop after `--retry-for`. Every server
process is stopped by its process id. Rows are written under a fresh owner and
key per run and deleted at the end; the tables stay (migrations are idempotent).
Other sessions on the database add to the count: the script prints those it
sees.

    python -m bench.bench_idempotency [--duplicates 20] [--upstream-delay 12]
        [--database-url postgresql://postgres@127.0.0.1:5432/test] [--skip-kill]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import logging
import os
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import Fault
from tests.ops.servers import app_server
from tests.support import STORY_BODY, make_settings, serve

COMPLETIONS = "/v1/chat/completions"
APP_NAME = "bench_idempotency"


@dataclass(frozen=True)
class Params:
    database_url: str
    duplicates: int
    upstream_delay: float
    kill_delay: float
    retry_for: float
    skip_kill: bool


def parse_params(argv: Sequence[str] | None = None) -> Params:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("POSTGRES_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL database the app uses and whose transactions are counted",
    )
    parser.add_argument("--duplicates", type=int, default=20, help="requests in the burst")
    parser.add_argument(
        "--upstream-delay", type=float, default=12.0, help="seconds the fake OpenAI takes"
    )
    parser.add_argument(
        "--kill-delay",
        type=float,
        default=2.0,
        help="killed-worker phase: the fake's delay; the worker dies halfway through it",
    )
    parser.add_argument(
        "--retry-for", type=float, default=120.0, help="killed-worker phase: give up after"
    )
    parser.add_argument("--skip-kill", action="store_true", help="only the burst")
    args = parser.parse_args(argv)
    if args.duplicates < 1:
        parser.error("--duplicates must be at least 1")
    return Params(
        database_url=args.database_url,
        duplicates=args.duplicates,
        upstream_delay=args.upstream_delay,
        kill_delay=args.kill_delay,
        retry_for=args.retry_for,
        skip_kill=args.skip_kill,
    )


def with_application_name(url: str) -> str:
    """The URL with `application_name` set, so the app's sessions can be told apart."""
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=f"{query}application_name={APP_NAME}"))


def maintenance_url(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/postgres", query=""))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


class TransactionCounter:
    """`xact_commit + xact_rollback` of one database, read from another database."""

    def __init__(self, conn: asyncpg.Connection, database: str) -> None:
        self._conn = conn
        self.database = database

    @classmethod
    async def open(cls, url: str) -> TransactionCounter:
        return cls(await asyncpg.connect(maintenance_url(url)), database_name(url))

    async def read(self) -> int:
        await self._conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await self._conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            self.database,
        )
        return int(value)

    async def sessions(self) -> tuple[int, int]:
        """(the app's sessions, other sessions) now connected to the database."""
        rows = await self._conn.fetch(
            "SELECT application_name = $2 AS ours, count(*) AS n FROM pg_stat_activity "
            "WHERE datname = $1 GROUP BY 1",
            self.database,
            APP_NAME,
        )
        counts = {row["ours"]: row["n"] for row in rows}
        return counts.get(True, 0), counts.get(False, 0)

    async def settled(self, within: float = 10.0) -> int:
        """The count once no session of the app is left (each flushes its figures on exit)."""
        for _attempt in range(round(within / 0.05)):
            ours, _ = await self.sessions()
            if not ours:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        return await self.read()

    async def close(self) -> None:
        await self._conn.close()


@dataclass
class Burst:
    label: str
    requests: int
    statuses: collections.Counter[int]
    upstream_calls: int
    transactions: int
    seconds: float
    others_seen: int


async def run_burst(
    params: Params, fake: FakeOpenAI, counter: TransactionCounter, owner: str, requests: int
) -> Burst:
    fake.reset()
    fake.set_fault(Fault.delay(params.upstream_delay), path=COMPLETIONS)
    settings = make_settings(
        database_url=with_application_name(params.database_url),
        openai_base_url=fake.openai_base_url,
        anonymous_principal=owner,
        log_level="WARNING",
    )
    headers = {"Idempotency-Key": f"burst-{secrets.token_hex(6)}"}
    others = (await counter.sessions())[1]
    before = await counter.settled()
    started = time.perf_counter()
    async with serve(settings) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/stories", json=STORY_BODY, headers=headers, timeout=120)
                for _ in range(requests)
            )
        )
    seconds = time.perf_counter() - started
    others = max(others, (await counter.sessions())[1])
    after = await counter.settled()
    return Burst(
        label=f"{requests} request(s), one key",
        requests=requests,
        statuses=collections.Counter(r.status_code for r in responses),
        upstream_calls=fake.count(path=COMPLETIONS),
        transactions=after - before,
        seconds=seconds,
        others_seen=others,
    )


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def statuses(counter: collections.Counter[int]) -> str:
    return ", ".join(f"{n}x {code}" for code, n in sorted(counter.items()))


async def burst_phase(params: Params, fake: FakeOpenAI, owner: str) -> None:
    counter = await TransactionCounter.open(params.database_url)
    # Once unmeasured, so that migrating the database is counted in neither run.
    async with serve(make_settings(database_url=params.database_url)):
        pass
    try:
        runs = [
            await run_burst(params, fake, counter, owner, params.duplicates),
            await run_burst(params, fake, counter, owner, 1),
        ]
    finally:
        await counter.close()
    print(f"\n## 1. Burst: transactions in database {counter.database!r}\n")
    print_table(
        ["run", "statuses", "upstream calls", "transactions", "wall s"],
        [
            [
                r.label,
                statuses(r.statuses),
                str(r.upstream_calls),
                str(r.transactions),
                f"{r.seconds:.1f}",
            ]
            for r in runs
        ],
    )
    burst, alone = runs
    extra = burst.transactions - alone.transactions
    if burst.requests > 1:
        per = extra / (burst.requests - 1)
        print(
            f"\nthe {burst.requests - 1} duplicates added {extra} transactions "
            f"({per:.1f} per waiting request)"
        )
    if any(r.others_seen for r in runs):
        print("note: other sessions were connected to the database; their work is counted too")


def post(url: str, key: str, timeout: float) -> tuple[int | str, float, httpx.Response | None]:
    started = time.perf_counter()
    try:
        response = httpx.post(
            f"{url}/v1/stories", json=STORY_BODY, headers={"Idempotency-Key": key}, timeout=timeout
        )
    except httpx.HTTPError as error:
        return type(error).__name__, time.perf_counter() - started, None
    return response.status_code, time.perf_counter() - started, response


async def count_stories(url: str, owner: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM stories WHERE owner = $1", owner))
    finally:
        await conn.close()


def kill_phase(params: Params, fake: FakeOpenAI, owner: str) -> None:
    fake.reset()
    fake.set_fault(Fault.delay(params.kill_delay), path=COMPLETIONS)
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake.openai_base_url,
        "DATABASE_URL": params.database_url,
        "ANONYMOUS_PRINCIPAL": owner,
        "RATE_LIMIT_CREATE_STORY": "100000/minute",
        "RATE_LIMIT_PER_CLIENT": "100000/minute",
    }
    key = f"killed-{secrets.token_hex(6)}"
    print("\n## 2. Killed worker, then retries with the same key\n")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with app_server(env) as doomed:
            first = pool.submit(post, doomed.url, key, 60)
            asyncio.run(fake.wait_for_count(1, path=COMPLETIONS, within=30))
            time.sleep(params.kill_delay / 2)
            os.killpg(doomed.process.pid, signal.SIGKILL)
            killed_at = time.perf_counter()
            doomed.process.wait(timeout=10)
        status, _, _ = first.result(timeout=30)
        print(f"first request: {status} (its worker was SIGKILLed mid-request)")
    calls_before_retry = fake.count(path=COMPLETIONS)
    attempts: list[tuple[int | str, float]] = []
    with app_server(env) as fresh:
        ready_after = time.perf_counter() - killed_at
        retry_started = time.perf_counter()
        while True:
            status, seconds, response = post(fresh.url, key, 60)
            attempts.append((status, seconds))
            if status == 201 or time.perf_counter() - killed_at > params.retry_for:
                break
            pause = float(response.headers.get("retry-after", "1")) if response else 1.0
            time.sleep(pause)
        story_after = time.perf_counter() - killed_at
        retrying = time.perf_counter() - retry_started
    stories = asyncio.run(count_stories(params.database_url, owner))
    print(f"fresh process answering {ready_after:.1f} s after the kill")
    print_table(
        ["attempt", "status", "seconds"],
        [[str(i), str(s), f"{d:.2f}"] for i, (s, d) in enumerate(attempts, 1)],
    )
    outcome = "got the story" if attempts[-1][0] == 201 else "gave up"
    print(
        f"\n{outcome} {story_after:.1f} s after the kill ({retrying:.1f} s of retrying, "
        f"{len(attempts)} attempt(s)); upstream calls by the retries: "
        f"{fake.count(path=COMPLETIONS) - calls_before_retry}; stories stored: {stories}"
    )


async def cleanup(url: str, owner: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for table in ("idempotency_keys", "stories"):
            await conn.execute(
                f"DELETE FROM {table} WHERE owner = $1 OR owner = $2",  # noqa: S608
                owner,
                f"{owner}-killed",
            )
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> None:
    params = parse_params(argv)
    logging.getLogger().setLevel(logging.WARNING)
    owner = f"bench-{secrets.token_hex(4)}"
    import app

    print(f"code under test: {Path(app.__file__).resolve().parent}")
    print(
        f"database: {database_name(params.database_url)}, duplicates: {params.duplicates}, "
        f"upstream delay: {params.upstream_delay} s, kill phase delay: {params.kill_delay} s, "
        f"CPUs: {os.cpu_count()}, load: {os.getloadavg()[0]:.2f}, owner: {owner}"
    )
    fake = FakeOpenAI()
    fake.start()
    try:
        asyncio.run(burst_phase(params, fake, owner))
        if not params.skip_kill:
            kill_phase(params, fake, f"{owner}-killed")
    finally:
        fake.stop()
        asyncio.run(cleanup(params.database_url, owner))


if __name__ == "__main__":
    main()
