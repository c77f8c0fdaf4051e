"""Logging and request correlation.

Each request gets an id (the caller's `X-Request-ID` when it is a sane token, a
fresh one otherwise) held in a ContextVar, so every log line written while the
request runs carries it and every error body quotes it. Logs are one JSON object
per line, the shape log pipelines ingest without parsing rules.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Printable token, no spaces or separators a log parser would trip on.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(value: str | None) -> Any:
    """Set the id for the current context; returns the token to reset it with."""
    return _request_id.set(value)


def reset_request_id(token: Any) -> None:
    _request_id.reset(token)


def request_id_from(header_value: str | None) -> str:
    if header_value and _VALID_REQUEST_ID.match(header_value):
        return header_value
    return uuid.uuid4().hex


_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def server_log_config(level: str) -> dict[str, Any]:
    """`logging.config.dictConfig` for uvicorn (`log_config=`): JSON lines from the start.

    Without it uvicorn's supervisor and its start-up lines ("Started parent process",
    "Child process died") are plain text among the workers' JSON, which a log
    pipeline parsing JSON drops or mangles. The app's lifespan then re-applies
    `configure_logging` in each worker (same format).
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"handlers": ["stdout"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            # Our access log replaces uvicorn's (it knows the request id and the route).
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


def configure_logging(level: str) -> None:
    """Route the root logger (and uvicorn's) to JSON lines on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # One line per upstream call at INFO is noise next to our own request log.
    for name in ("httpx", "httpx2", "openai", "replicate"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # Our access log replaces uvicorn's (it knows the request id and the route).
    logging.getLogger("uvicorn.access").disabled = True
