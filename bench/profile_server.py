"""Serve the app (uvicorn, one worker, the `python -m app` defaults) under cProfile.

    python -m bench.profile_server OUT.prof --port 8000

On SIGTERM or SIGINT the server stops as usual and the profile of its main
thread (the event loop: every request's Python work) is written to OUT.prof;
read it with `python -m pstats OUT.prof`. Work done in other threads (the
SQLite connection's thread, `asyncio.to_thread`) shows only as the time the
loop waited for it. Used by `bench.bench_hot_paths --profile`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import signal
from collections.abc import Iterator

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn's server, except that a stop signal is not re-raised once it has
    stopped (uvicorn's own handling would end the process before the profile is
    written)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop(signum: int, frame: object) -> None:
            self.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    config = uvicorn.Config(
        "app.main:app", host=args.host, port=args.port, access_log=False, log_level="warning"
    )
    server = _Server(config)
    profile = cProfile.Profile()
    profile.enable()
    try:
        server.run()
    finally:
        profile.disable()
        profile.dump_stats(args.out)


if __name__ == "__main__":
    main()
