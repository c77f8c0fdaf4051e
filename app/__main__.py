"""Start the service: `python -m app` runs uvicorn with settings read from the environment.

This is the container's exec-form `CMD` (which cannot expand variables), so
everything an operator tunes at run time is read here instead:

| variable                 | default   | meaning                                               |
|--------------------------|-----------|-------------------------------------------------------|
| HOST                     | 0.0.0.0   | address to bind                                       |
| PORT                     | 8000      | port to bind                                          |
| WEB_CONCURRENCY          | 1         | worker processes (on Kubernetes scale pods instead)   |
| FORWARDED_ALLOW_IPS      | see below | peers whose X-Forwarded-For/-Proto uvicorn believes   |
| SHUTDOWN_GRACE_SECONDS   | 35        | after SIGTERM, how long in-flight requests may finish |
| LOG_LEVEL                | INFO      | uvicorn's own log level (the app reads it too)        |
| RELOAD                   | false     | restart on code changes (development only; 1 worker)  |
| PROMETHEUS_MULTIPROC_DIR | unset     | metrics directory shared by the workers (see below)   |
| KEEP_ALIVE_TIMEOUT_SECONDS | 5       | an idle connection between requests is closed after   |
| REQUEST_READ_TIMEOUT_SECONDS | 10    | a request (head and body) must arrive within, or 408  |
| MAX_REQUEST_HEAD_BYTES   | 16384     | request line + headers above this: 400 from h11       |

Proxy headers: the app decides who the client is from `TRUSTED_PROXIES` (rate
limits are keyed on it). uvicorn can also rewrite the client address and scheme
from `X-Forwarded-*` before the app sees them, for peers in
`FORWARDED_ALLOW_IPS`; unset, that follows `TRUSTED_PROXIES` (each IPv4 entry
also in its IPv4-mapped IPv6 form, as a dual-stack socket reports it), so the
two layers believe the same proxies. With both unset uvicorn believes no proxy
at all (`proxy_headers=False`): not even loopback, or a caller on the same host
could name any address in `X-Forwarded-For` and get a fresh rate-limit quota
per name. Never set `FORWARDED_ALLOW_IPS` to `*` in production, for the same
reason.

Metrics with several workers: with `PROMETHEUS_MULTIPROC_DIR` set, the
directory is created if missing and emptied of prometheus-client's files
(`*.db`) before uvicorn starts, so counters of a previous run's workers do not
live on. `WEB_CONCURRENCY` > 1 without it starts with a warning: each worker
would then expose only its own figures, and a scrape reads one at random.

Slow and greedy clients: uvicorn serves HTTP/1.1 with h11 (not httptools, which
bounds no header size) through `app.http.server.DeadlineH11Protocol`: a request
head above `MAX_REQUEST_HEAD_BYTES` is a 400 from h11 before the app runs; a
connection that has not delivered its whole request `REQUEST_READ_TIMEOUT_SECONDS`
after opening (or after the request's first byte) gets 408 and is closed; one
idle between requests is closed after `KEEP_ALIVE_TIMEOUT_SECONDS`. Behind a
proxy that keeps upstream connections open longer than that (nginx ingress: 60
s), raise it above the proxy's, or the proxy may send a request on a connection
being closed. Header count and size within the head are the app's
(`MAX_HEADER_COUNT`, `MAX_HEADER_BYTES`: 431). Figures: `docs/security.md`.

Exit status: 0 after a clean stop; 3 (uvicorn's STARTUP_FAILURE) when the app's
startup fails, with one worker or several (uvicorn's supervisor alone would
exit 0 after stopping on a worker that failed to start), and when the app's
settings are invalid (checked here first: the supervisor would respawn workers
that fail on them forever).

Graceful shutdown: on SIGTERM uvicorn stops accepting connections, lets
in-flight requests run for up to `SHUTDOWN_GRACE_SECONDS`, then runs the app's
lifespan shutdown (pools closed). Whatever stops the process must wait longer
than that: compose's `stop_grace_period` and Kubernetes'
`terminationGracePeriodSeconds` (with its preStop sleep) are sized from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from ipaddress import IPv4Network, ip_network
from pathlib import Path
from typing import Annotated, Any, TypeVar

import uvicorn
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from uvicorn.config import STARTUP_FAILURE

from app.http.server import IMPORT_PATH as HTTP_PROTOCOL
from app.http.server import READ_TIMEOUT_ENV
from app.http.supervisor import Supervisor
from app.platform.config import Settings as AppSettings
from app.platform.logs import configure_logging, server_log_config

SettingsT = TypeVar("SettingsT", bound=BaseSettings)

APP_IMPORT_PATH = "app.main:app"

logger = logging.getLogger(__name__)


class ServerSettings(BaseSettings):
    """How the HTTP server runs; the application's own settings live in app.platform.config."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Binding every interface is the point inside a container; the host decides exposure.
    host: str = "0.0.0.0"  # noqa: S104
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    web_concurrency: Annotated[int, Field(ge=1, le=64)] = 1
    # Comma-separated addresses or networks; unset, TRUSTED_PROXIES; both unset, none.
    forwarded_allow_ips: str | None = None
    # The app's own list of proxies (app.platform.config.ProxySettings), read here as text.
    trusted_proxies: str = ""
    # At least REQUEST_DEADLINE_SECONDS (30) plus a database round: a rollout must
    # not cut off a request that is still within its deadline.
    shutdown_grace_seconds: Annotated[int, Field(ge=0, le=600)] = 35
    log_level: str = "INFO"
    reload: bool = False
    # Slow and idle clients (uvicorn's keep-alive timer wants whole seconds).
    keep_alive_timeout_seconds: Annotated[int, Field(ge=1, le=900)] = 5
    request_read_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    # Request line and headers, as h11 buffers them before the app sees a request.
    max_request_head_bytes: Annotated[int, Field(ge=4096, le=1024 * 1024)] = 16 * 1024

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    def proxy_allow_list(self) -> str | None:
        """What uvicorn believes X-Forwarded-* from (None: nobody); the app's list by default."""
        explicit = _entries(self.forwarded_allow_ips or "")
        if explicit:
            return ",".join(explicit)
        trusted = _entries(self.trusted_proxies)
        if not trusted:
            return None
        return ",".join([*trusted, *(m for e in trusted if (m := _ipv4_mapped(e)) is not None)])

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for `uvicorn.run`, one place to read them from."""
        allow_list = self.proxy_allow_list()
        return {
            "host": self.host,
            "port": self.port,
            # uvicorn refuses reload with several workers; reload wins in development.
            "workers": 1 if self.reload else self.web_concurrency,
            "reload": self.reload,
            # Trusting nobody is proxy_headers=False: uvicorn 0.54 reads a None list as
            # $FORWARDED_ALLOW_IPS or "127.0.0.1,::1", and trusts nobody with "" only
            # because its parser happens to never match an empty host.
            "proxy_headers": allow_list is not None,
            "forwarded_allow_ips": allow_list or "",
            "timeout_graceful_shutdown": self.shutdown_grace_seconds,
            "log_level": self.log_level.lower(),
            "log_config": server_log_config(self.log_level),
            # The app writes its own access log, with the request id and route.
            "access_log": False,
            "server_header": False,
            "lifespan": "on",
            "http": HTTP_PROTOCOL,
            "h11_max_incomplete_event_size": self.max_request_head_bytes,
            "timeout_keep_alive": self.keep_alive_timeout_seconds,
        }


def _entries(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ipv4_mapped(entry: str) -> str | None:
    """`10.0.0.0/8` as `::ffff:10.0.0.0/104`; None for anything but an IPv4 address or network."""
    try:
        network = ip_network(entry, strict=False)
    except ValueError:
        return None
    if not isinstance(network, IPv4Network):
        return None
    return f"::ffff:{network.network_address}/{96 + network.prefixlen}"


def prepare_multiprocess_metrics(
    settings: ServerSettings, environ: Mapping[str, str] = os.environ
) -> Path | None:
    """Create and empty `PROMETHEUS_MULTIPROC_DIR` before any worker starts.

    Read from the process environment, where prometheus-client reads it (not a
    setting of its own: a value in `.env` would reach this function but not the
    workers' prometheus-client). Only prometheus-client's files (`*.db`) are
    removed: they hold the values of processes that no longer exist; anything
    else in a mistakenly chosen directory stays. Returns the directory, or None.
    """
    configured = environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if not configured:
        if settings.web_concurrency > 1 and not settings.reload:
            logger.warning(
                "WEB_CONCURRENCY=%d without PROMETHEUS_MULTIPROC_DIR: each worker keeps "
                "its own metrics and /metrics shows whichever worker answers the scrape; "
                "set PROMETHEUS_MULTIPROC_DIR to an empty directory on a tmpfs",
                settings.web_concurrency,
            )
        return None
    directory = Path(configured)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        if stale.is_file():
            stale.unlink()
    return directory


def run_server(options: dict[str, Any]) -> int:
    """Runs uvicorn with `options`; returns the process's exit status.

    One worker: `uvicorn.run`, which itself exits with 3 when the app's startup
    fails. Several workers: uvicorn's supervisor, run here because `uvicorn.run`
    returns normally (status 0) after the supervisor stops on a worker whose
    startup failed, so a crash would look like a clean stop to whatever
    restarts the process. That case is 3 (uvicorn's STARTUP_FAILURE) here too.
    The supervisor is `app.http.supervisor.Supervisor` (refuses new connections
    once shutting down, forgets a killed worker's gauges).
    """
    if options["workers"] <= 1 or options["reload"]:
        uvicorn.run(APP_IMPORT_PATH, **options)
        return 0
    config = uvicorn.Config(APP_IMPORT_PATH, **options)
    supervisor = Supervisor(config, sockets=[config.bind_socket()])
    with contextlib.suppress(KeyboardInterrupt):
        supervisor.run()
    failed = [p.pid for p in supervisor.processes if p.exitcode == STARTUP_FAILURE]
    if failed:
        logger.error(
            "worker startup failed (pids %s): exiting with status %d", failed, STARTUP_FAILURE
        )
        return STARTUP_FAILURE
    return 0


def load_settings(kind: type[SettingsT]) -> SettingsT | None:
    """Reads settings once, here in the parent process; None (logged) when invalid.

    Invalid app settings fail every worker the same way at import, and uvicorn's
    supervisor respawns a worker that dies that way forever instead of exiting;
    invalid server settings (`PORT=abc`) would be a bare traceback. The log names
    each invalid field and why, never its value (it may be a secret).
    """
    try:
        return kind()
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}"
            for e in error.errors(include_input=False, include_url=False)
        )
        logger.error("invalid settings (%s): %s", error.title, problems)
        return None


def main() -> None:
    # JSON from the first line: settings errors and the supervisor's lines too.
    level = os.environ.get("LOG_LEVEL", "INFO").strip().upper()
    configure_logging(level if level in logging.getLevelNamesMapping() else "INFO")
    settings = load_settings(ServerSettings)
    if load_settings(AppSettings) is None or settings is None:
        sys.exit(STARTUP_FAILURE)
    prepare_multiprocess_metrics(settings)
    # For DeadlineH11Protocol, which uvicorn builds in each worker process.
    os.environ[READ_TIMEOUT_ENV] = str(settings.request_read_timeout_seconds)
    sys.exit(run_server(settings.uvicorn_options()))


if __name__ == "__main__":
    main()
