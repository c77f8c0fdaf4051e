"""Error reporting to Sentry, on only when `SENTRY_DSN` is set; nothing private leaves.

Children's prompts and credentials must never reach a third party, so before an
event or a transaction is sent:

- request bodies are never captured (`max_request_body_size="never"`), and any
  that got in are replaced; cookies and query strings are dropped;
- local variables of stack frames are not captured (a `request` or `body` local
  would carry the prompt in its repr), nor OpenAI prompts and completions in spans;
- every key that names a secret or a prompt (`authorization`, `api_key`, `token`,
  `prompt`, ... see `DENYLIST`) is filtered at any depth, headers included;
- strings that look like credentials (`sk-...`, `r8_...`, `Bearer ...`, the
  password of a URL such as `redis://:password@host`, with or without a user)
  are masked wherever they appear, messages and breadcrumbs included;
- pydantic's `input_value=...` in validation messages (the rejected input,
  which may be a prompt) becomes `input_value=[Filtered]`.
"""

from __future__ import annotations

import re
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.openai import OpenAIIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

from app.platform.config import Settings

__all__ = ["DENYLIST", "FILTERED", "init_sentry", "scrub_event", "shutdown_sentry"]

FILTERED = "[Filtered]"

# Lower case, compared with each key lower-cased and with '-' read as '_'.
DENYLIST = sorted(
    {k.lower().replace("-", "_") for k in DEFAULT_DENYLIST}
    | {
        "prompt",
        "prompts",
        "messages",
        "input",
        "api_token",
        "access_token",
        "refresh_token",
        "openai_api_key",
        "replicate_api_token",
        "idempotency_key",
        "dsn",
        "database_url",
        "redis_url",
        "x_api_key",
        "proxy_authorization",
    }
)
_DENIED = frozenset(DENYLIST)
_SECRET_PATTERN = re.compile(
    r"(?:\bsk-[A-Za-z0-9_\-]{6,}|\br8_[A-Za-z0-9]{6,}|(?i:bearer)\s+[A-Za-z0-9._~+/\-]+=*"
    # scheme://user:password@ and scheme://:password@ (Redis has no user by default)
    r"|\b(?i:[a-z][a-z0-9+.\-]*)://[^\s:/@]*:[^\s@]+@)"
)
# pydantic writes the rejected input as `input_value=<repr>, input_type=<type>`: a
# quoted repr up to its closing quote, anything else up to `, input_type=` or the
# end of the line (so a message cut short loses the rest of its line, not a prompt).
_INPUT_VALUE_PATTERN = re.compile(
    r"""input_value=(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|[^\n]*?)"""
    r"(?=, input_type=|$)",
    re.MULTILINE,
)


def _denied(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in _DENIED


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: FILTERED if _denied(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        # Sentry sends headers as [name, value] pairs too.
        if len(value) == 2 and _denied(value[0]) and isinstance(value[1], str):
            return [value[0], FILTERED]
        return [_scrub(item) for item in value]
    if isinstance(value, str):
        value = _INPUT_VALUE_PATTERN.sub(f"input_value={FILTERED}", value)
        return _SECRET_PATTERN.sub(FILTERED, value)
    return value


def scrub_event(event: dict[str, Any], hint: object = None) -> dict[str, Any]:
    """`before_send` / `before_send_transaction`: the event without bodies, prompts or keys."""
    request = event.get("request")
    if isinstance(request, dict):
        for private in ("data", "cookies", "query_string"):
            if private in request:
                request[private] = FILTERED
    scrubbed: dict[str, Any] = _scrub(event)
    return scrubbed


def init_sentry(settings: Settings, version: str) -> bool:
    """Start the Sentry client when `SENTRY_DSN` is set; returns whether it started."""
    cfg = settings.sentry
    if cfg.dsn is None or not cfg.dsn.get_secret_value():
        return False
    sentry_sdk.init(
        dsn=cfg.dsn.get_secret_value(),
        environment=cfg.environment or settings.app_env.value,
        release=cfg.release or f"{settings.service_name}@{version}",
        traces_sample_rate=cfg.traces_sample_rate,
        max_request_body_size="never",
        include_local_variables=False,
        # Off, though sentry-sdk enables it whenever `openai` is installed: it reports
        # every exception an SDK call raises, including the upstream failures the
        # ladder handles (the next rung serves), so an OpenAI outage paged as a crash
        # and spent the quota. Handled failures are metrics and log lines; Sentry
        # gets what the service did not handle.
        disabled_integrations=[OpenAIIntegration()],
        event_scrubber=EventScrubber(denylist=DENYLIST, recursive=True),
        before_send=scrub_event,  # type: ignore[arg-type]
        before_send_transaction=scrub_event,  # type: ignore[arg-type]
    )
    return True


def shutdown_sentry(timeout_seconds: float = 2.0) -> None:
    """Send what is queued (up to the timeout) and stop the client."""
    client = sentry_sdk.get_client()
    if client.is_active():
        client.close(timeout=timeout_seconds)
