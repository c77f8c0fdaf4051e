"""A fake OpenAI API (chat completions, moderations, model list) speaking the real wire format.

Moderations (``POST /v1/moderations``) flag an input that contains one of
``moderation_words`` (whole words, any case): ``DEFAULT_FLAGGED`` until a test
changes it (``flag_words``); ``reset()`` restores it. Every fault the fakes know
applies to it too (``path="/v1/moderations"``); ``bad_content`` answers a result
without a verdict (``"flagged": null``). ``story_extra`` adds a sentence to every
story a completion writes, so a test can make the story (and only the story)
contain a flagged word.

Image inputs (``{"type": "image_url", "image_url": {"url": ...}}``) must be an
http(s) URL or a ``data:image/...;base64,`` URL (else ``400``, as the API); an
image is flagged as ``violence`` while ``flag_images`` is set (the default
passes every picture), and counted in ``image_inputs()``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import Iterable
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
MODERATIONS = "/v1/moderations"
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"
#: word -> the moderation category it flags, until a test says otherwise
DEFAULT_FLAGGED: dict[str, str] = {
    "knife": "violence",
    "kill": "violence",
    "hurt": "violence",
    "gun": "violence",
    "blood": "violence/graphic",
    "sex": "sexual",
}
#: every category of OpenAI's moderation models, as the API names them
MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)

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


IMAGE_MARK = "\x00image:"
_DATA_URL = re.compile(r"^data:image/(png|jpeg|webp|gif);base64,([A-Za-z0-9+/=]+)$")


def _image_ok(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    if url.startswith(("https://", "http://")):
        return True
    match = _DATA_URL.match(url)
    if match is None:
        return False
    try:
        return bool(base64.b64decode(match.group(2), validate=True))
    except binascii.Error:
        return False


def _moderation_inputs(value: Any) -> list[str] | None:
    """The texts of a moderation ``input`` (a string, strings, or typed parts), or None.

    An image part is ``IMAGE_MARK`` + its URL; one that is not an image URL is None."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    texts: list[str] = []
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(str(item.get("text", "")))
        elif isinstance(item, dict) and item.get("type") == "image_url":
            image = item.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not _image_ok(url):
                return None
            texts.append(IMAGE_MARK + str(url))
        else:
            return None
    return texts


class FakeOpenAI(FakeServer):
    """``POST /v1/chat/completions``, ``POST /v1/moderations`` and ``GET /v1/models``."""

    supported_faults: ClassVar[frozenset[str]] = FakeServer.supported_faults | {"bad_content"}

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        #: completions actually answered with a 200 (not hung, reset or garbled)
        self.replies_served = 0
        #: moderations actually answered with a 200 (not hung, reset or garbled)
        self.moderations_served = 0
        #: word -> category: an input containing the word (whole, any case) is flagged
        self.moderation_words: dict[str, str] = dict(DEFAULT_FLAGGED)
        #: a sentence added to the first paragraph of every story (none when empty)
        self.story_extra = ""
        #: flag every image input (as violence)
        self.flag_images = False
        self._ids = 0

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    def _reset_state(self) -> None:
        self.replies_served = 0
        self.moderations_served = 0
        self.moderation_words = dict(DEFAULT_FLAGGED)
        self.story_extra = ""
        self.flag_images = False

    def flag_words(self, words: Iterable[str], category: str = "violence") -> None:
        """Moderation flags inputs containing any of ``words`` as ``category`` too."""
        if category not in MODERATION_CATEGORIES:
            raise ValueError(f"unknown moderation category {category!r}")
        with self._lock:
            self.moderation_words.update(dict.fromkeys(words, category))

    def moderation_inputs(self) -> list[str]:
        """Every text sent to ``/v1/moderations`` since the last reset, oldest first."""
        texts: list[str] = []
        for call in self.calls:
            if call.path == MODERATIONS and isinstance(call.json, dict):
                inputs = _moderation_inputs(call.json.get("input")) or []
                texts.extend(t for t in inputs if not t.startswith(IMAGE_MARK))
        return texts

    def image_inputs(self) -> list[str]:
        """The URL of every image sent to ``/v1/moderations`` since the last reset."""
        urls: list[str] = []
        for call in self.calls:
            if call.path == MODERATIONS and isinstance(call.json, dict):
                inputs = _moderation_inputs(call.json.get("input")) or []
                urls.extend(t.removeprefix(IMAGE_MARK) for t in inputs if t.startswith(IMAGE_MARK))
        return urls

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._chat_completions),
            web.post(MODERATIONS, self._moderations),
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
            if self.story_extra:
                story = json.loads(content)
                if story["paragraphs"]:
                    story["paragraphs"][0] += " " + self.story_extra
                content = json.dumps(story)

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

    async def _moderations(self, request: web.Request) -> web.StreamResponse:
        body = request[JSON_KEY]
        if not isinstance(body, dict):
            return self.error_response(400, "We could not parse the JSON body of your request.")
        model = body.get("model", DEFAULT_MODERATION_MODEL)
        if not isinstance(model, str) or not model:
            return self.error_response(400, "'model' must be a string")
        texts = _moderation_inputs(body.get("input"))
        if texts is None:
            return self.error_response(
                400, "'input' must be a string, an array of strings or an array of parts"
            )
        fault = request[FAULT_KEY]
        with self._lock:
            words = dict(self.moderation_words)
            flag_images = self.flag_images
            self._ids += 1
            moderation_id = f"modr-fake{self._ids:08d}"
            if fault is None or fault.kind in ("delay", "bad_content"):
                self.moderations_served += 1
        results = [self._moderation_result(text, words, flag_images) for text in texts]
        if fault is not None and fault.kind == "bad_content":
            for result in results:
                result["flagged"] = None
        payload = {"id": moderation_id, "model": model, "results": results}
        return web.Response(
            text=json.dumps(payload),
            content_type="application/json",
            headers={"x-request-id": f"req_{uuid.uuid4().hex}"},
        )

    @staticmethod
    def _moderation_result(text: str, words: dict[str, str], flag_images: bool) -> dict[str, Any]:
        if text.startswith(IMAGE_MARK):
            hits = {"violence"} if flag_images else set()
        else:
            hits = {
                category
                for word, category in words.items()
                if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE)
            }
        return {
            "flagged": bool(hits),
            "categories": {c: c in hits for c in MODERATION_CATEGORIES},
            "category_scores": {c: 0.97 if c in hits else 0.0002 for c in MODERATION_CATEGORIES},
            "category_applied_input_types": {c: ["text"] for c in MODERATION_CATEGORIES},
        }
