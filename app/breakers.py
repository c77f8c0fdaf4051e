"""`python -m app.breakers`: see and override the circuit breakers of every replica.

    python -m app.breakers status
    python -m app.breakers open openai:chat --for 30m --reason "garbled replies, INC-42"
    python -m app.breakers close replicate:text --for 10m --reason "known 400s, not an outage"
    python -m app.breakers clear openai:chat      # end an override
    python -m app.breakers reset openai:chat      # end it and forget the failures: closed

Acts through Redis (`REDIS_URL`, read like the service reads it), where every
worker and replica shares breaker state and reads the overrides every second:
the change holds everywhere within about a second. An override always ends by
itself (`--for`, at most 24 h). Without Redis there is nothing shared to act on:
each process keeps its own state (restart it to reset). Exit status: 0 done,
2 refused (settings, breaker name, duration, Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time

from pydantic import ValidationError
from redis.exceptions import RedisError

from app.core.resilience import CircuitBreaker
from app.core.resilience.observer import BreakerState
from app.core.resilience.overrides import (
    MAX_OVERRIDE_SECONDS,
    BreakerOverrides,
    Override,
    OverridingBreakerStore,
    read_overrides,
    write_override,
)
from app.core.resilience.stores import RedisBreakerStore
from app.lifespan import redis_from_settings
from app.platform.config import BREAKER_NAMES, Settings

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smh]?)$")


def duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError("a duration such as 90s, 30m or 2h")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if not 0 < seconds <= MAX_OVERRIDE_SECONDS:
        raise argparse.ArgumentTypeError(f"more than 0 and at most {MAX_OVERRIDE_SECONDS:g} s")
    return seconds


async def run(args: argparse.Namespace, settings: Settings) -> int:
    redis = redis_from_settings(settings, timeout_seconds=5.0, max_connections=2)
    if redis is None:
        print(
            "REDIS_URL is not set: breakers are per process, nothing is shared to override",
            file=sys.stderr,
        )
        return 2
    store = RedisBreakerStore(redis)
    try:
        if args.command in ("open", "close"):
            state = BreakerState.OPEN if args.command == "open" else BreakerState.CLOSED
            override = Override(state, time.time() + args.seconds, args.reason)
            await write_override(redis, args.name, override)
            print(f"{args.name}: {override.describe(time.time())}")
        elif args.command == "clear":
            await write_override(redis, args.name, None)
            print(f"{args.name}: override cleared")
        elif args.command == "reset":
            await write_override(redis, args.name, None)
            await redis.delete(store.key(args.name))
            print(f"{args.name}: override cleared and state reset (closed, no failures)")
        else:
            overrides = BreakerOverrides()
            overrides.replace_all(await read_overrides(redis))
            effective = OverridingBreakerStore(store, overrides)
            for name in BREAKER_NAMES:
                snapshot = await CircuitBreaker(name, effective).snapshot()
                line = f"{name}\t{snapshot.state.value}\tfailures={snapshot.consecutive_failures}"
                print(line + (f"\t{snapshot.forced}" if snapshot.forced else ""))
        return 0
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.breakers",
        description="See and override the circuit breakers shared through Redis.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="each breaker's shared state and override")
    for name, what in (("open", "force open"), ("close", "force closed")):
        command = commands.add_parser(name, help=f"{what} on every replica, for a while")
        command.add_argument("name", choices=BREAKER_NAMES)
        command.add_argument("--for", dest="seconds", type=duration, required=True)
        command.add_argument("--reason", default="", help="shown in /health and the logs")
    for name, what in (("clear", "end an override"), ("reset", "end it and close the breaker")):
        commands.add_parser(name, help=what).add_argument("name", choices=BREAKER_NAMES)
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"the settings are refused:\n{error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args, settings))
    except (OSError, RedisError) as error:
        print(f"Redis did not answer: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
