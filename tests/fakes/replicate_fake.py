"""A fake Replicate HTTP API: predictions (text and image models) and output files.

The base URL has no ``/v1``: the official SDK appends ``/v1/...`` itself.

Lifecycle: a created prediction is ``starting``; each ``GET /v1/predictions/{id}``
advances it, and the ``steps_to_finish``-th GET after creation returns it terminal
(``succeeded``, or ``failed`` when a ``prediction_failed`` fault hit the create).
Intermediate GETs return ``processing`` with ``output: null``. ``Prefer: wait`` on
the create finishes the prediction at once.

Output files (``GET /files/{name}``): each finished image prediction gets a picture
of its own (a small WebP drawn with Pillow, different bytes each time), kept until
``delete_files()`` (Replicate deletes output files an hour after the prediction).
``picture_mode`` says what the next image predictions' files are: ``"webp"``,
``"not_image"`` (HTML declared as ``image/webp``), ``"noisy"`` (a valid but large
PNG), ``"huge"`` (a valid PNG 5000 pixels wide). ``hold_images`` keeps image
predictions ``processing`` until it is cleared (a picture that takes its time).
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from aiohttp import web
from PIL import Image

from tests.fakes.server import (
    FAULT_KEY,
    JSON_KEY,
    FakeServer,
    Fault,
    make_story_json,
    requested_paragraphs,
    word_count,
)

DEFAULT_IMAGE_MODELS = frozenset({"black-forest-labs/flux-schnell"})
DEFAULT_STEPS_TO_FINISH = 2
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
BAD_TEXT_TOKENS = ["Once", " upon", " a", " time,", " no", " JSON", " here."]

_TITLES = {
    400: "Bad Request",
    401: "Unauthenticated",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    422: "Input validation failed",
    429: "Request was throttled",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_TOKEN_RE = re.compile(r"\s*\S+")
PICTURE_MODES = frozenset({"webp", "not_image", "noisy", "huge"})


def make_picture(mode: str, seed: int) -> tuple[bytes, str]:
    """(bytes, declared Content-Type) of an output file in `mode` (PICTURE_MODES)."""
    rng = random.Random(seed)
    if mode == "not_image":
        return b"<html><body>502 Bad Gateway</body></html>" * 4, "image/webp"
    buffer = io.BytesIO()
    if mode == "noisy":
        image = Image.frombytes("RGB", (96, 96), rng.randbytes(96 * 96 * 3))
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    if mode == "huge":
        Image.new("RGB", (5000, 2), (1, 2, 3)).save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    Image.new("RGB", (64, 48), colour).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue(), "image/webp"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _prediction_id() -> str:
    value = uuid.uuid4().int
    letters = []
    for _ in range(26):
        value, digit = divmod(value, 26)
        letters.append(chr(ord("a") + digit))
    return "".join(letters)


def version_id(model: str) -> str:
    """The fake's (stable) version id of ``owner/name``."""
    return hashlib.sha256(model.encode()).hexdigest()


def text_tokens(text: str) -> list[str]:
    """Split ``text`` into word tokens whose concatenation is exactly ``text``."""
    tokens = _TOKEN_RE.findall(text)
    tail = text[len("".join(tokens)) :]
    if tail:
        tokens.append(tail)
    return tokens


@dataclass
class FakePrediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    is_image: bool
    created_at: str
    outcome: str = "ok"  # "ok" | "failed" | "bad_content"
    failure: str | None = None
    status: str = "starting"
    polls: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    output: Any | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class FakeReplicate(FakeServer):
    """Replicate's prediction API with configurable image models."""

    supported_faults: ClassVar[frozenset[str]] = FakeServer.supported_faults | {
        "bad_content",
        "prediction_failed",
    }

    def __init__(
        self,
        *,
        image_models: set[str] | None = None,
        steps_to_finish: int = DEFAULT_STEPS_TO_FINISH,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.image_models: set[str] = set(
            DEFAULT_IMAGE_MODELS if image_models is None else image_models
        )
        self.default_steps_to_finish = steps_to_finish
        #: GETs of a prediction after its creation until it is terminal (0: at creation)
        self.steps_to_finish = steps_to_finish
        #: predictions created since the last reset()
        self.created_count = 0
        self._predictions: dict[str, FakePrediction] = {}
        #: output file name -> (bytes, declared Content-Type)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.picture_mode = "webp"
        self.hold_images = False
        #: GETs of output files since the last reset()
        self.file_requests = 0

    def _reset_state(self) -> None:
        self.steps_to_finish = self.default_steps_to_finish
        self.created_count = 0
        self._predictions.clear()
        self.files.clear()
        self.picture_mode = "webp"
        self.hold_images = False
        self.file_requests = 0

    def delete_files(self) -> None:
        """Every output file is gone (404), as Replicate does after an hour."""
        with self._lock:
            self.files.clear()

    def picture_bytes(self) -> list[bytes]:
        """The bytes of every output picture served so far, oldest first."""
        with self._lock:
            return [data for data, _ in self.files.values()]

    # --- inspection helpers for tests ---------------------------------------------

    def predictions(self) -> list[dict[str, Any]]:
        """Snapshots of every prediction, newest first (as ``GET /v1/predictions``)."""
        with self._lock:
            return [self._to_json(p) for p in reversed(self._predictions.values())]

    def prediction(self, prediction_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._predictions.get(prediction_id)
            return None if found is None else self._to_json(found)

    def version_id(self, model: str) -> str:
        """The version id this fake reports (and accepts) for ``owner/name``."""
        return version_id(model)

    # --- wire format ----------------------------------------------------------------

    def error_response(
        self, status: int, message: str | None = None, *, headers: dict[str, str] | None = None
    ) -> web.Response:
        title = _TITLES.get(status, "Error")
        detail = message or title
        if status == 429 and message is None:
            detail = "Request was throttled. Your rate limit resets in ~2s."
        return web.json_response(
            {"title": title, "detail": detail, "status": status},
            status=status,
            headers=headers,
            content_type="application/problem+json",
        )

    def unauthorized_response(self) -> web.Response:
        return self.error_response(401, "You did not pass a valid authentication token")

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/models/{owner}/{name}/predictions", self._create_for_model),
            web.post("/v1/predictions", self._create_for_version),
            web.get("/v1/predictions", self._list),
            web.get("/v1/predictions/{id}", self._get),
            web.post("/v1/predictions/{id}/cancel", self._cancel),
            web.get("/files/{name}", self._file),
        ]

    def _to_json(self, p: FakePrediction) -> dict[str, Any]:
        base = f"{self.base_url}/v1/predictions/{p.id}"
        return {
            "id": p.id,
            "model": p.model,
            "version": p.version,
            "input": p.input,
            "logs": "",
            "output": p.output,
            "data_removed": False,
            "error": p.error,
            "status": p.status,
            "created_at": p.created_at,
            "started_at": p.started_at,
            "completed_at": p.completed_at,
            "urls": {"get": base, "cancel": f"{base}/cancel", "stream": f"{base}/stream"},
            "metrics": dict(p.metrics),
        }

    # --- prediction state -------------------------------------------------------------

    @staticmethod
    def _apply_outcome(p: FakePrediction, fault: Fault | None) -> None:
        if fault is None or p.status in TERMINAL:
            return
        if fault.kind == "prediction_failed":
            p.outcome, p.failure = "failed", fault.error or "prediction failed"
        elif fault.kind == "bad_content":
            p.outcome = "bad_content"

    def _finish(self, p: FakePrediction) -> None:
        now = _now()
        p.started_at = p.started_at or now
        p.completed_at = now
        if p.outcome == "failed":
            p.status, p.error, p.output = "failed", p.failure, None
            p.metrics = {"predict_time": 0.1}
            return
        p.status = "succeeded"
        if p.is_image:
            name = f"{p.id}.txt" if p.outcome == "bad_content" else f"{p.id}.webp"
            if p.outcome != "bad_content":
                seed = int(hashlib.sha256(p.id.encode()).hexdigest()[:8], 16)
                self.files[name] = make_picture(self.picture_mode, seed)
            p.output = [f"{self.base_url}/files/{name}"]
            p.metrics = {"predict_time": 0.1, "image_count": 1}
            return
        prompt = str(p.input.get("prompt", ""))
        texts = [prompt, str(p.input.get("system_prompt", ""))]
        if p.outcome == "bad_content":
            tokens = list(BAD_TEXT_TOKENS)
        else:
            tokens = text_tokens(make_story_json(prompt, requested_paragraphs(texts)))
        p.output = tokens
        p.metrics = {
            "input_token_count": max(1, word_count(prompt)),
            "output_token_count": len(tokens),
            "predict_time": 0.1,
        }

    def _create(
        self, request: web.Request, model: str, version: str, model_input: Any
    ) -> web.StreamResponse:
        if not isinstance(model_input, dict):
            return self.error_response(422, "input is required and must be an object")
        is_image = model in self.image_models
        if not is_image and not isinstance(model_input.get("prompt"), str):
            return self.error_response(422, "input.prompt is required")
        prefer = request.headers.get("Prefer", "").strip().lower()
        with self._lock:
            p = FakePrediction(
                id=_prediction_id(),
                model=model,
                version=version,
                input=model_input,
                is_image=is_image,
                created_at=_now(),
            )
            self._apply_outcome(p, request[FAULT_KEY])
            if prefer == "wait" or prefer.startswith("wait=") or self.steps_to_finish <= 0:
                self._finish(p)
            self._predictions[p.id] = p
            self.created_count += 1
            payload = self._to_json(p)
        return web.json_response(payload, status=201)

    async def _create_for_model(self, request: web.Request) -> web.StreamResponse:
        body = request[JSON_KEY]
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        model_input = body.get("input") if isinstance(body, dict) else None
        return self._create(request, model, version_id(model), model_input)

    async def _create_for_version(self, request: web.Request) -> web.StreamResponse:
        body = request[JSON_KEY]
        if not isinstance(body, dict) or not isinstance(body.get("version"), str):
            return self.error_response(422, "version is required")
        ref: str = body["version"]
        if "/" in ref:  # "owner/name" or "owner/name:version"
            model, _, version = ref.partition(":")
            version = version or version_id(model)
        else:
            known = {version_id(m): m for m in self._known_models()}
            if ref not in known:
                return self.error_response(422, "Invalid version or not permitted")
            model, version = known[ref], ref
        return self._create(request, model, version, body.get("input"))

    def _known_models(self) -> set[str]:
        with self._lock:
            return set(self.image_models) | {p.model for p in self._predictions.values()}

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"previous": None, "next": None, "results": self.predictions()})

    def _not_found(self, prediction_id: str) -> web.Response:
        return self.error_response(404, f"Prediction {prediction_id} not found")

    async def _get(self, request: web.Request) -> web.StreamResponse:
        prediction_id = request.match_info["id"]
        with self._lock:
            p = self._predictions.get(prediction_id)
            if p is None:
                return self._not_found(prediction_id)
            self._apply_outcome(p, request[FAULT_KEY])
            if p.status not in TERMINAL:
                p.polls += 1
                if p.polls >= self.steps_to_finish and not (p.is_image and self.hold_images):
                    self._finish(p)
                else:
                    p.status = "processing"
                    p.started_at = p.started_at or _now()
            payload = self._to_json(p)
        return web.json_response(payload)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        prediction_id = request.match_info["id"]
        with self._lock:
            p = self._predictions.get(prediction_id)
            if p is None:
                return self._not_found(prediction_id)
            if p.status not in TERMINAL:
                p.status = "canceled"
                p.completed_at = _now()
            payload = self._to_json(p)
        return web.json_response(payload)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        with self._lock:
            self.file_requests += 1
            found = self.files.get(name)
        if found is not None:
            data, declared = found
            return web.Response(body=data, content_type=declared)
        if name.endswith(".txt"):
            return web.Response(text="this is not an image", content_type="text/plain")
        return self.error_response(404, f"File {name} not found")
