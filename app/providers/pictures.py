"""The image model's picture: fetched from its output URL, checked, and moderated.

Replicate deletes a prediction's output files an hour after it was made, so the
picture is fetched as soon as the prediction succeeds and kept in our own store
(`app.services.illustrations`). Before it is kept, it is checked here:

- fetched through its own guard (`ResilientPictureFetcher`: the shared retry
  policy and `replicate` bulkhead, breaker `replicate:files`, the deadline),
  one HTTP attempt per call, `ILLUSTRATION_FETCH_TIMEOUT_SECONDS` each;
- at most `ILLUSTRATION_MAX_BYTES`, by `Content-Length` and while reading (a
  reply that lies about its length is cut off, not buffered);
- its media type is what its first bytes say (PNG, JPEG, WebP or GIF), never
  what the `Content-Type` header claims, and Pillow must read it as that same
  format; its width and height are read from the file, at most
  `ILLUSTRATION_MAX_DIMENSION` each.

A picture that fails a check is a `PictureRefusedError` (not retried: the same
URL gives the same bytes). OpenAI's moderation endpoint checks the picture too
(`OpenAIImageModerator`, through the `openai:moderation` guard) before it is
ever served; `app.services.illustrations` decides what a verdict does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Protocol

import httpx
import openai
from openai import AsyncOpenAI
from openai.types import ModerationImageURLInputParam
from PIL import Image

from app.providers.base import (
    ModerationVerdict,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderResponseError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from app.providers.openai import map_openai_error
from app.providers.resilient import Guard

NAME = "replicate"
_CHUNK = 64 * 1024
# Magic bytes -> (media type, Pillow's name of the format, file extension).
_PNG = ("image/png", "PNG", "png")
_JPEG = ("image/jpeg", "JPEG", "jpg")
_WEBP = ("image/webp", "WEBP", "webp")
_GIF = ("image/gif", "GIF", "gif")


class PictureRefusedError(ProviderRejectedError):
    """The reply is not a picture we keep (not an image, too large, unreadable)."""


@dataclass(frozen=True, slots=True)
class Picture:
    """A checked picture: its bytes, and what they were found to be."""

    data: bytes
    media_type: str
    extension: str
    width: int
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def sniff(data: bytes) -> tuple[str, str, str] | None:
    """(media type, Pillow format, extension) from the first bytes; None: not an image we keep."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _PNG
    if data.startswith(b"\xff\xd8\xff"):
        return _JPEG
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _WEBP
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _GIF
    return None


def inspect_picture(data: bytes, *, max_bytes: int, max_dimension: int) -> Picture:
    """The picture `data` holds, checked; `PictureRefusedError` otherwise."""
    if len(data) > max_bytes:
        raise PictureRefusedError(NAME, f"picture of {len(data)} bytes (at most {max_bytes})")
    kind = sniff(data)
    if kind is None:
        raise PictureRefusedError(NAME, "reply is not a PNG, JPEG, WebP or GIF picture")
    media_type, pillow_format, extension = kind
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                found, (width, height) = image.format, image.size
                if width > max_dimension or height > max_dimension:
                    raise PictureRefusedError(
                        NAME, f"picture of {width}x{height} (at most {max_dimension} a side)"
                    )
                image.verify()  # the structure of the whole file, without decoding it
    except PictureRefusedError:
        raise
    except Exception as error:  # Pillow raises many kinds for a broken file
        raise PictureRefusedError(NAME, f"unreadable picture: {error!r}") from error
    if found != pillow_format or width < 1 or height < 1:
        raise PictureRefusedError(NAME, f"picture starts as {pillow_format} but reads as {found}")
    return Picture(data, media_type, extension, width, height)


class PictureSource(Protocol):
    async def fetch(self, url: str) -> Picture: ...


class PictureFetcher:
    """One HTTP GET of an output file, read up to the cap, then checked."""

    name = NAME

    def __init__(self, client: httpx.AsyncClient, *, max_bytes: int, max_dimension: int) -> None:
        self._client = client
        self._max_bytes = max_bytes
        self._max_dimension = max_dimension

    @classmethod
    def build(cls, *, timeout_seconds: float, max_bytes: int, max_dimension: int) -> PictureFetcher:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 5.0)),
            follow_redirects=True,
            max_redirects=3,
            limits=httpx.Limits(max_connections=16),
        )
        return cls(client, max_bytes=max_bytes, max_dimension=max_dimension)

    async def fetch(self, url: str) -> Picture:
        if not url.startswith(("https://", "http://")):
            raise PictureRefusedError(NAME, "output is not an http(s) URL")
        try:
            async with self._client.stream("GET", url) as response:
                _raise_for_status(response)
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self._max_bytes:
                    raise PictureRefusedError(
                        NAME, f"picture of {declared} bytes (at most {self._max_bytes})"
                    )
                data = bytearray()
                async for chunk in response.aiter_bytes(_CHUNK):
                    data.extend(chunk)
                    if len(data) > self._max_bytes:
                        raise PictureRefusedError(
                            NAME, f"picture larger than {self._max_bytes} bytes"
                        )
        except httpx.TimeoutException as error:
            raise ProviderTimeoutError(NAME, "output file: no reply within the timeout") from error
        except httpx.TransportError as error:
            raise ProviderUnavailableError(NAME, f"output file: {error!r}") from error
        return inspect_picture(
            bytes(data), max_bytes=self._max_bytes, max_dimension=self._max_dimension
        )

    async def close(self) -> None:
        await self._client.aclose()


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 300:
        return
    message = f"output file: HTTP {status}"
    if status == 429:
        raise ProviderRateLimitedError(NAME, message, status_code=status)
    if status == 408 or status >= 500:
        raise ProviderUnavailableError(NAME, message, status_code=status)
    # 404/410: the file is gone (deleted upstream); no repeat brings it back.
    raise ProviderRejectedError(NAME, message, status_code=status)


class ResilientPictureFetcher:
    """The fetcher behind its guard (breaker `replicate:files`)."""

    def __init__(self, inner: PictureSource, guard: Guard) -> None:
        self._inner = inner
        self.guard = guard

    async def fetch(self, url: str) -> Picture:
        return await self.guard.run(lambda: self._inner.fetch(url))


class ImageModerator(Protocol):
    name: str

    async def moderate_image(self, picture: Picture) -> ModerationVerdict: ...


class OpenAIImageModerator:
    """`POST /v1/moderations` with the picture as an image input (a base64 data URL)."""

    name = "openai"

    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self._client = client
        self.model = model

    async def moderate_image(self, picture: Picture) -> ModerationVerdict:
        encoded = base64.b64encode(picture.data).decode("ascii")
        part: ModerationImageURLInputParam = {
            "type": "image_url",
            "image_url": {"url": f"data:{picture.media_type};base64,{encoded}"},
        }
        try:
            reply = await self._client.moderations.create(model=self.model, input=[part])
        except openai.OpenAIError as error:
            raise map_openai_error(error) from error
        except ValueError as error:
            raise ProviderResponseError("openai", f"unusable moderation reply: {error}") from error
        try:
            results = list(reply.results)
            if not results or any(not isinstance(r.flagged, bool) for r in results):
                raise ProviderResponseError("openai", "moderation reply without a verdict")
            categories = sorted(
                {
                    str(category)
                    for r in results
                    for category, hit in r.categories.model_dump(by_alias=True).items()
                    if hit is True
                }
            )
            flagged = any(r.flagged for r in results)
        except (AttributeError, TypeError, KeyError, ValueError) as error:
            raise ProviderResponseError("openai", f"moderation reply: {error!r}") from error
        return ModerationVerdict(flagged, "openai", tuple(categories))

    async def close(self) -> None:
        await self._client.close()


class ResilientImageModerator:
    """The image check behind the `openai:moderation` guard (shared with the text check)."""

    def __init__(self, inner: ImageModerator, guard: Guard) -> None:
        self._inner = inner
        self.guard = guard
        self.name = inner.name

    async def moderate_image(self, picture: Picture) -> ModerationVerdict:
        return await self.guard.run(lambda: self._inner.moderate_image(picture))
