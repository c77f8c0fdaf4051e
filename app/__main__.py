"""Start the service: `python -m app` runs uvicorn with settings read from the environment.

This is the container's exec-form `CMD` (which cannot expand variables), so
everything an operator tunes at run time is read here instead:

| variable               | default     | meaning                                                   |
|------------------------|-------------|-----------------------------------------------------------|
| HOST                   | 0.0.0.0     | address to bind                                           |
| PORT                   | 8000        | port to bind                                              |
| WEB_CONCURRENCY        | 1           | worker processes (scale pods, not workers, on Kubernetes) |
| FORWARDED_ALLOW_IPS    | see below   | peers whose X-Forwarded-For/-Proto uvicorn believes       |
| SHUTDOWN_GRACE_SECONDS | 35          | after SIGTERM, how long in-flight requests may finish     |
| LOG_LEVEL              | INFO        | uvicorn's own log level (the app reads it too)            |
| RELOAD                 | false       | restart on code changes (development only; 1 worker)      |

Proxy headers: the app decides who the client is from `TRUSTED_PROXIES` (rate
limits are keyed on it). uvicorn also rewrites the client address and scheme
from `X-Forwarded-*`, for peers in `FORWARDED_ALLOW_IPS`; unset, that follows
`TRUSTED_PROXIES`, or is `127.0.0.1` when both are unset, so the two layers
believe the same proxies. Never set it to `*` in production: any caller could
then choose its own address, and with it a fresh rate-limit quota.

Graceful shutdown: on SIGTERM uvicorn stops accepting connections, lets
in-flight requests run for up to `SHUTDOWN_GRACE_SECONDS`, then runs the app's
lifespan shutdown (pools closed). Whatever stops the process must wait longer
than that: compose's `stop_grace_period` and Kubernetes'
`terminationGracePeriodSeconds` (with its preStop sleep) are sized from it.
"""

from __future__ import annotations

from typing import Annotated, Any

import uvicorn
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

APP_IMPORT_PATH = "app.main:app"


class ServerSettings(BaseSettings):
    """How the HTTP server runs; the application's own settings live in app.core.config."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Binding every interface is the point inside a container; the host decides exposure.
    host: str = "0.0.0.0"  # noqa: S104
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    web_concurrency: Annotated[int, Field(ge=1, le=64)] = 1
    # Comma-separated addresses or networks; unset, TRUSTED_PROXIES or 127.0.0.1.
    forwarded_allow_ips: str | None = None
    # The app's own list of proxies (app.core.config.ProxySettings), read here as text.
    trusted_proxies: str = ""
    # At least REQUEST_DEADLINE_SECONDS (30) plus a database round: a rollout must
    # not cut off a request that is still within its deadline.
    shutdown_grace_seconds: Annotated[int, Field(ge=0, le=600)] = 35
    log_level: str = "INFO"
    reload: bool = False

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    def proxy_allow_list(self) -> str:
        """What uvicorn believes X-Forwarded-* from: one list with the app's by default."""
        for candidate in (self.forwarded_allow_ips, self.trusted_proxies):
            if candidate is not None and candidate.strip():
                return ",".join(part.strip() for part in candidate.split(",") if part.strip())
        return "127.0.0.1"

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for `uvicorn.run`, one place to read them from."""
        return {
            "host": self.host,
            "port": self.port,
            # uvicorn refuses reload with several workers; reload wins in development.
            "workers": 1 if self.reload else self.web_concurrency,
            "reload": self.reload,
            "proxy_headers": True,
            "forwarded_allow_ips": self.proxy_allow_list(),
            "timeout_graceful_shutdown": self.shutdown_grace_seconds,
            "log_level": self.log_level.lower(),
            # The app writes its own access log, with the request id and route.
            "access_log": False,
            "server_header": False,
            "lifespan": "on",
        }


def main() -> None:
    settings = ServerSettings()
    uvicorn.run(APP_IMPORT_PATH, **settings.uvicorn_options())


if __name__ == "__main__":
    main()
