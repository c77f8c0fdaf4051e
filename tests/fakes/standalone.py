"""Run a fake upstream as a process of its own, for the load test and by hand.

    python -m tests.fakes.standalone openai --port 8900
    python -m tests.fakes.standalone openai --port 8900 --delay 0.05
    python -m tests.fakes.standalone openai --port 8900 --status 500   # an upstream outage

It prints one line, `ready <base URL>`, once it listens, then serves until
SIGTERM or SIGINT. Point the service at it with `OPENAI_BASE_URL=<base URL>/v1`
and any `OPENAI_API_KEY`. Loopback only, like every fake.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.server import FakeServer, Fault

FAKES: dict[str, type[FakeServer]] = {"openai": FakeOpenAI}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.standalone")
    parser.add_argument("fake", choices=sorted(FAKES))
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    faults = parser.add_mutually_exclusive_group()
    faults.add_argument("--delay", type=float, help="answer every request after this many s")
    faults.add_argument("--status", type=int, help="answer every request with this 4xx/5xx")
    args = parser.parse_args(argv)

    server = FAKES[args.fake](host="127.0.0.1", port=args.port)
    if args.delay is not None:
        server.set_fault(Fault.delay(args.delay))
    elif args.status is not None:
        server.set_fault(Fault.status(args.status))
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    server.start()
    print(f"ready {server.base_url}", flush=True)
    try:
        stopped.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
