"""A fake OpenAI API (chat completions and model list) speaking the real wire format."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.server import (
    FAULT_KEY,
    JSON_KEY,
    FakeServer,
    make_story_json,
    requested_paragraphs,
    word_count,
)

DEFAULT_MODELS = ("gpt-4o-mini",)
BAD_CONTENT = "Once upon a time there was a story that forgot to be JSON. The end."

_ERROR_KINDS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_denied", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    409: ("invalid_request_error", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
}


def _message_text(message: Any) -> str:
    """The text of a chat message whose content is a string or a list of parts."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text")
        )
    return ""


class FakeOpenAI(FakeServer):
    """``POST /v1/chat/completions`` and ``GET /v1/models``."""

    supported_faults: ClassVar[frozenset[str]] = FakeServer.supported_faults | {"bad_content"}

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        #: completions actually answered with a 200 (not hung, reset or garbled)
        self.replies_served = 0
        self._ids = 0

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    def _reset_state(self) -> None:
        self.replies_served = 0

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._chat_completions),
            web.get("/v1/models", self._models),
        ]

    def error_response(
        self, status: int, message: str | None = None, *, headers: dict[str, str] | None = None
    ) -> web.Response:
        if status >= 500:
            kind: tuple[str, str | None, str] = (
                "server_error",
                None,
                "The server had an error while processing your request. Sorry about that!",
            )
        else:
            kind = _ERROR_KINDS.get(status, ("invalid_request_error", None, f"HTTP {status}"))
        error_type, code, default_message = kind
        body = {
            "error": {
                "message": message or default_message,
                "type": error_type,
                "param": None,
                "code": code,
            }
        }
        all_headers = {"x-request-id": f"req_{uuid.uuid4().hex}"}
        all_headers.update(headers or {})
        return web.json_response(body, status=status, headers=all_headers)

    def unauthorized_response(self) -> web.Response:
        return self.error_response(
            401, "You didn't provide an API key (fake OpenAI: Authorization: Bearer <key>)."
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": model, "object": "model", "created": 0, "owned_by": "fake"}
                    for model in DEFAULT_MODELS
                ],
            },
            headers={"x-request-id": f"req_{uuid.uuid4().hex}"},
        )

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = request[JSON_KEY]
        if not isinstance(body, dict):
            return self.error_response(400, "We could not parse the JSON body of your request.")
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            return self.error_response(400, "you must provide a model parameter")
        if not isinstance(messages, list) or not messages:
            return self.error_response(400, "'messages' must be a non-empty array")
        if body.get("stream"):
            return self.error_response(400, "the fake OpenAI does not implement stream=true")

        texts = [
            _message_text(message)
            for message in messages
            if isinstance(message, dict) and message.get("role") in ("system", "developer", "user")
        ]
        user_texts = [
            _message_text(message)
            for message in messages
            if isinstance(message, dict) and message.get("role") == "user"
        ]
        last_user = user_texts[-1] if user_texts else ""
        fault = request[FAULT_KEY]
        if fault is not None and fault.kind == "bad_content":
            content = BAD_CONTENT
        else:
            content = make_story_json(last_user, requested_paragraphs(texts))

        prompt_tokens = max(1, sum(word_count(_message_text(m)) for m in messages))
        completion_tokens = max(1, word_count(content))
        with self._lock:
            self._ids += 1
            completion_id = f"chatcmpl-fake{self._ids:08d}"
            if fault is None or fault.kind in ("delay", "bad_content"):
                self.replies_served += 1
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake",
        }
        return web.Response(
            text=json.dumps(payload),
            content_type="application/json",
            headers={"x-request-id": f"req_{uuid.uuid4().hex}"},
        )
