"""Container health probe: `python -m app.healthcheck` exits 0 when the service is live.

Docker's `HEALTHCHECK`, the compose health checks and the runbook all call this
module. It asks `GET /health/live` on this container (liveness never touches
Redis, the database or an upstream, so a dependency outage cannot make Docker
restart a healthy process) and exits 0 on a 200 within the timeout, 1 otherwise.

It imports nothing outside the standard library on purpose: the probe must keep
working when the application's own imports are broken, and must cost little
more than starting the interpreter. Environment:

- `PORT` (default 8000): the port the server listens on, as in `python -m app`.
- `HEALTHCHECK_URL`: the full URL to probe instead of `http://127.0.0.1:$PORT/health/live`.
- `HEALTHCHECK_TIMEOUT_SECONDS` (default 5): kept below Docker's `--timeout=10s`, so a
  hung server is reported by this probe rather than by Docker killing it.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit

DEFAULT_PORT = 8000
DEFAULT_TIMEOUT_SECONDS = 5.0
LIVENESS_PATH = "/health/live"


def probe_url(environ: Mapping[str, str]) -> str:
    explicit = environ.get("HEALTHCHECK_URL", "").strip()
    if explicit:
        return explicit
    port = environ.get("PORT", "").strip() or str(DEFAULT_PORT)
    return f"http://127.0.0.1:{port}{LIVENESS_PATH}"


def probe_timeout(environ: Mapping[str, str]) -> float:
    raw = environ.get("HEALTHCHECK_TIMEOUT_SECONDS", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        return DEFAULT_TIMEOUT_SECONDS
    return value if value > 0 else DEFAULT_TIMEOUT_SECONDS


def check(url: str, timeout: float) -> tuple[bool, str]:
    """One GET; healthy only on HTTP 200. Returns (healthy, a one-line reason)."""
    if urlsplit(url).scheme not in {"http", "https"}:
        return False, f"refusing to probe a non-HTTP URL: {url!r}"
    # No proxies: an HTTP_PROXY set for outbound calls must not reroute a local probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        return False, f"{url} answered {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return False, f"{url} unreachable: {error}"
    if status != 200:
        return False, f"{url} answered {status}"
    return True, f"{url} answered 200"


def main(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    healthy, reason = check(probe_url(env), probe_timeout(env))
    # Docker keeps the probe's output in `docker inspect`; one line is enough.
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
